"""Nucleus-type scores of a model on a training run's validation split (typed images only).

Per image the model's maps (mirror passes as given) are post-processed with the model's
own H&E defaults at the image's own pixels, and the predicted classes are scored
against the annotated ones: detection F1, per-class F1 (HoVer-Net's F_c), per-class PQ
and mPQ, counts pooled over the images (see docs/metrics.md). Never run on a test split.

    .venv/bin/python scripts/evaluate_types.py runs/v5 [--model runs/v5/model] [--tta 4]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from napari_medinst.class_metrics import type_scores
from napari_medinst.model import type_head
from napari_medinst.model.data import load_folder
from napari_medinst.model.folder import load_model
from napari_medinst.model.inference import pick_device
from napari_medinst.model.train import (
    TrainConfig,
    _native_postprocessors,
    _predict_samples,
    split_samples,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="training run folder (with train_config.json)")
    ap.add_argument("--model", default=None, help="model folder (default: RUN/model)")
    ap.add_argument("--tta", type=int, default=4, choices=(1, 2, 4))
    args = ap.parse_args()
    cfg = TrainConfig.from_dict(json.loads((args.run / "train_config.json").read_text()))
    samples = [s for spec in cfg.data for s in load_folder(spec, frozenset(cfg.exclude_splits))]
    _, val = split_samples(samples, cfg.val_fraction, cfg.val_label_sources)
    typed = type_head.typed(val)
    model = load_model(args.model or args.run / "model")
    if not model.net.config.n_types:
        raise SystemExit(f"{model.path}: the model has no type head")
    maps = _predict_samples(model.net, typed, pick_device("cpu"), tta=args.tta)
    params = model.params_for("he")
    posts = _native_postprocessors(maps, typed)
    per_image, per_centre = type_head.type_counts(posts, typed, params)
    for s, counts, centre in zip(typed, per_image, per_centre, strict=True):
        print(
            f"{s.name}: F1_d {counts.f1_d:.3f} (centroid pairs {centre.f1_d:.3f}), "
            f"mPQ {counts.mpq:.3f}",
            flush=True,
        )
    names = {i: n for i, (n, _) in model.type_classes.items()}
    for what, items in (("IoU > 0.5 pairs", per_image), ("centroid pairs (3 µm)", per_centre)):
        pooled = type_scores(items).to_dict(names)
        print(f"pooled over {len(items)} images, {what}:")
        print(json.dumps(pooled, indent=2))


if __name__ == "__main__":
    main()
