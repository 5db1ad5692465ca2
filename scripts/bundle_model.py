"""Copy the best model of a training run into the package as a bundled model.

Tunes the post-processing per modality on the run's own held-in validation split (never
on the MoNuSeg 2018 test split), then writes ``src/napari_medinst/models/<name>``.

    .venv/bin/python scripts/bundle_model.py runs/default --name default
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from napari_medinst.model.data import load_folder
from napari_medinst.model.folder import BUNDLED_MODELS
from napari_medinst.model.inference import pick_device
from napari_medinst.model.train import TrainConfig, finalize, split_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="training run folder (has train_config.json, model/)")
    ap.add_argument("--name", default="default")
    args = ap.parse_args()
    cfg = TrainConfig.from_dict(json.loads((args.run / "train_config.json").read_text()))
    samples = [s for spec in cfg.data for s in load_folder(spec, frozenset(cfg.exclude_splits))]
    _, val = split_samples(samples, cfg.val_fraction)
    history = json.loads((args.run / "model" / "metrics.json").read_text()).get("history", [])
    target = BUNDLED_MODELS / args.name
    tmp = target.with_name(f".{args.name}.staging")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(args.run / "model", tmp)
    finalize(tmp, val, pick_device("cpu"), history)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    metrics = json.loads((target / "metrics.json").read_text())
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    print(f"bundled as {target}")


if __name__ == "__main__":
    main()
