"""Accuracy of 1, 2 and 4 mirror passes on a training run's validation split.

For each setting the post-processing is tuned per modality on the validation images
(exactly as ``finalize`` does for the bundled defaults) and the tuned AJI / PQ are
printed, so the default number of passes is chosen on validation scores, never on the
test split.

    .venv/bin/python scripts/compare_tta.py runs/v5 [--model runs/v5/model] [--passes 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from napari_medinst.model.data import load_folder
from napari_medinst.model.folder import load_model
from napari_medinst.model.inference import pick_device
from napari_medinst.model.train import (
    TrainConfig,
    _predict_samples,
    split_samples,
    tune_postprocess,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="training run folder (with train_config.json)")
    ap.add_argument("--model", default=None, help="model folder (default: RUN/model)")
    ap.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    cfg = TrainConfig.from_dict(json.loads((args.run / "train_config.json").read_text()))
    samples = [s for spec in cfg.data for s in load_folder(spec, frozenset(cfg.exclude_splits))]
    _, val = split_samples(samples, cfg.val_fraction, cfg.val_label_sources)
    model = load_model(args.model or args.run / "model")
    device = pick_device("cpu")
    print(f"model {model.path}, {len(val)} validation images")
    for n in args.passes:
        line = [f"passes {n}:"]
        for modality in ("he", "fluorescence"):
            subset = [s for s in val if s.modality == modality]
            if not subset:
                continue
            t0 = time.perf_counter()
            maps = _predict_samples(model.net, subset, device, tta=n)
            t_net = time.perf_counter() - t0
            _params, scores = tune_postprocess(maps, subset)
            line.append(
                f"{modality} AJI {scores['aji']:.4f} PQ {scores['pq']:.4f} "
                f"obj {scores['objective']:.4f} (network {t_net:.1f} s)"
            )
        print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
