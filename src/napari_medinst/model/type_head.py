"""Training the nucleus-type head alone, with the rest of the network frozen.

The starting model's segmentation (nuclear pixels, HV maps, contours, and so every
instance) stays exactly as it was: only the 1x1 type head (and the type branch, when the
network has one) learns, from the typed images
only, with its cross-entropy optionally weighted against class imbalance. Checkpoints
are chosen by mPQ on the typed validation images, and the post-processing defaults are
the starting model's, because the maps they were tuned on have not changed.

``napari-medinst train --init MODEL --type-head-only`` runs it (see
``docs/finetune.md``); :func:`type_counts` is also what ``scripts/evaluate_types.py``
reports.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..class_metrics import TypeScores, centroid_pairs, class_counts, type_table
from ..metrics import overlap_table
from ..postprocess import PostprocessParams
from .data import Sample
from .folder import LoadedModel, ModelError, load_model, own_config, save_model_folder
from .losses import LossWeights, type_loss
from .network import NucleusNet

__all__ = ["class_weights", "freeze_all_but_type_head", "head_loss", "type_counts"]

#: HoVer-Net pairs a predicted and a true nucleus for the type scores when their
#: centroids lie within 12 px at 40x, i.e. 3 µm.
CENTROID_PAIR_UM = 3.0


def typed(samples: list[Sample]) -> list[Sample]:
    """The samples whose nuclei carry classes."""
    return [s for s in samples if s.types is not None]


def class_weights(samples: list[Sample], n_classes: int, balance: float) -> torch.Tensor | None:
    """Per-class weights of the type cross-entropy, background first.

    Each class weighs ``share ** -balance``, where ``share`` is its fraction of the
    typed training pixels, scaled so that the mean weight per pixel is 1: 0 gives every
    class the same weight (None), 0.5 the inverse square root of its share, 1 its
    inverse. A class no pixel carries keeps weight 1.
    """
    if not balance or n_classes < 2:
        return None
    counts = np.zeros(n_classes, np.float64)
    for s in typed(samples):
        lut = np.asarray(s.types, np.int64).copy()
        lut[0] = 0
        per_pixel = lut[s.labels]
        counts += np.bincount(per_pixel[per_pixel < n_classes].ravel(), minlength=n_classes)
    if counts.sum() == 0:
        return None
    share = counts / counts.sum()
    w = np.where(counts > 0, np.maximum(share, 1e-9) ** -balance, 1.0)
    w /= float((share * w).sum())
    return torch.tensor(w, dtype=torch.float32)


def freeze_all_but_type_head(net: NucleusNet) -> list[torch.nn.Parameter]:
    """Freeze every weight but the type head's (and its branch's, if the network has
    one) and return those parameters.

    The network also has to stay in ``eval()`` mode while the head trains, so that
    batch normalisation neither uses batch statistics nor updates its running ones.
    """
    if net.head_type is None:
        raise ModelError(
            "--type-head-only needs a model with a type head: start from one (--init) or "
            "name the classes (--type-names)"
        )
    for p in net.parameters():
        p.requires_grad_(False)
    head = list(net.head_type.parameters())
    if net.type_branch is not None:
        head += list(net.type_branch.parameters())
    for p in head:
        p.requires_grad_(True)
    return head


def head_loss(
    net: NucleusNet,
    batch: dict[str, torch.Tensor],
    weights: LossWeights,
    class_w: torch.Tensor | None,
) -> torch.Tensor:
    """Type loss of one batch through the frozen features (no graph is kept for them)."""
    with torch.no_grad():
        y, context = net.features(batch["image"])
    loss, _ = type_loss(net.type_logits(y, context), batch["types"], weights, class_w)
    return loss


def type_counts(
    posts: list[tuple[Any, np.ndarray]],
    samples: list[Sample],
    params: PostprocessParams,
) -> tuple[list[TypeScores], list[TypeScores]]:
    """Per image, the type counts with IoU > 0.5 pairs and with HoVer-Net's centroid pairs.

    ``posts`` are ``(Postprocessor, labels)`` at each image's own pixels (as
    ``train._native_postprocessors`` makes them); the true classes come from each
    sample's native type map.
    """
    by_iou, by_centre = [], []
    for s, (pp, labels) in zip(samples, posts, strict=True):
        res = pp.run(params)
        gt_types = type_table(labels, s.native[1])
        found = [] if res.types is None else res.types.tolist()  # None: no nucleus found
        pred_types = dict(enumerate(found, start=1))
        table = overlap_table(labels, res.labels)
        by_iou.append(class_counts(table, gt_types, pred_types))
        near = centroid_pairs(labels, res.labels, table, CENTROID_PAIR_UM / pp.pixel_size)
        by_centre.append(class_counts(table, gt_types, pred_types, pairs=near))
    return by_iou, by_centre


def keep_postprocessing(model_dir, init: LoadedModel, history: list[dict[str, Any]]) -> None:
    """Give a head-only run's model folder the starting model's post-processing defaults
    (its maps are unchanged, so they stay the tuned ones) and the run's history."""
    model = load_model(model_dir)
    metrics = {
        **model.metrics,
        "history": history,
        "val_tuned": init.metrics.get("val_tuned", {}),
        "postprocess_from": str(init.path),
    }
    save_model_folder(
        model_dir,
        model.net,
        extra_config=own_config(model),
        postprocess=dict(init.postprocess),
        metrics=metrics,
    )
