"""Copy the best model of a training run into the package as a bundled model.

Tunes the post-processing per modality on the run's own held-in validation split (never
on the MoNuSeg 2018 test split), then writes ``src/napari_medinst/models/<name>``. A
``--type-head-only`` run keeps the post-processing of the model it started from.

    .venv/bin/python scripts/bundle_model.py runs/default --name default
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from napari_medinst.model.folder import BUNDLED_MODELS
from napari_medinst.model.train import retune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="training run folder (has train_config.json, model/)")
    ap.add_argument("--name", default="default")
    args = ap.parse_args()
    target = BUNDLED_MODELS / args.name
    tmp = target.with_name(f".{args.name}.staging")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(args.run / "model", tmp)
    cfg = json.loads((args.run / "train_config.json").read_text())
    if cfg.get("type_head_only"):
        # only the type head learned: the maps, and so the parent's tuned
        # post-processing (which the run copied), are unchanged
        print("type-head-only run: keeping its parent's post-processing")
    else:
        retune(args.run, device="cpu", model_dir=tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    metrics = json.loads((target / "metrics.json").read_text())
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    print(f"bundled as {target}")


if __name__ == "__main__":
    main()
