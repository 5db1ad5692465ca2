"""Write a training run's last checkpoint as a model folder (the run's ``model/`` holds
the checkpoint with the best validation AJI at default settings; the last one may be
better once post-processing is tuned, so both can be compared).

    .venv/bin/python scripts/checkpoint_model.py runs/v5 runs/v5_last
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from napari_medinst.model.folder import load_model, load_weights_into, own_config, save_model_folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="training run folder (checkpoint.pt, model/)")
    ap.add_argument("out", type=Path, help="new run-like folder: train_config.json + model/")
    args = ap.parse_args()
    best = load_model(args.run / "model")
    ck = torch.load(args.run / "checkpoint.pt", map_location="cpu", weights_only=True)
    load_weights_into(best.net, ck["model"], args.run / "checkpoint.pt")
    history = json.loads(ck["history"])
    write_run_like(args.out, args.run, best, {"epoch": int(ck["epoch"]), "history": history})
    print(f"epoch {ck['epoch']} written to {args.out / 'model'}")


def write_run_like(out: Path, run: Path, model, metrics: dict) -> None:
    """``out/train_config.json`` (``run``'s) and ``out/model`` (``model``'s network and
    config): a folder that ``compare_tta.py`` and ``bundle_model.py`` take as a run."""
    out.mkdir(parents=True, exist_ok=False)
    shutil.copy(run / "train_config.json", out / "train_config.json")
    save_model_folder(out / "model", model.net, extra_config=own_config(model), metrics=metrics)


if __name__ == "__main__":
    main()
