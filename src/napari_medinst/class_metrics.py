"""Nucleus-type scores: per-class F1 (HoVer-Net's F_c), detection F1, per-class PQ, mPQ.

All of them start from the :class:`~napari_medinst.metrics.OverlapTable` of one image
and the class of each gt and predicted nucleus, and reduce it to counts that add up
over images (:class:`ClassCounts`), so a data set is scored by pooling counts, the
way HoVer-Net reports F_c on CoNSeP and CoNIC reports mPQ+.

Pairing: a gt and a predicted nucleus are a detected pair when their IoU is above 0.5
(the unique matching PQ uses). HoVer-Net pairs nuclei by centroid distance (within
12 px at 40x) for F_d and F_c; IoU > 0.5 is stricter for badly outlined nuclei and
needs no magnification-dependent radius. See ``docs/metrics.md``.

* Detection F1 ``f1_d = 2 TP / (2 TP + FP + FN)`` over all classes.
* For class c, among the detected pairs: ``TP_c`` both are c, ``TN_c`` neither is c,
  ``FP_c`` only the prediction is c, ``FN_c`` only the gt is c; among the unpaired:
  ``FP_d`` predictions of class c, ``FN_d`` gt nuclei of class c. Then
  ``F_c = 2 (TP_c + TN_c) / (2 (TP_c + TN_c) + 2 FP_c + 2 FN_c + FP_d + FN_d)``
  (Graham et al. 2019, eq. 5).
* PQ of class c: PQ of the gt nuclei of class c against the predicted nuclei of class
  c (matching within the class); mPQ: its mean over the classes present in the gt or
  the prediction (pooled over images: counts summed first, as mPQ+).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .metrics import OverlapTable, pq_from_counts, safe_ratio

__all__ = [
    "ClassCounts",
    "TypeScores",
    "centroid_pairs",
    "class_counts",
    "type_scores",
    "type_table",
]


@dataclass(frozen=True)
class ClassCounts:
    """The counts of one class in one image (or summed over images)."""

    tp_c: int = 0
    tn_c: int = 0
    fp_c: int = 0
    fn_c: int = 0
    fp_d: int = 0
    fn_d: int = 0
    pq_tp: int = 0
    pq_fp: int = 0
    pq_fn: int = 0
    pq_iou_sum: float = 0.0

    def __add__(self, other: ClassCounts) -> ClassCounts:
        return ClassCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def f1(self) -> float:
        """HoVer-Net's F_c."""
        t = self.tp_c + self.tn_c
        return safe_ratio(2 * t, 2 * t + 2 * self.fp_c + 2 * self.fn_c + self.fp_d + self.fn_d)

    @property
    def pq(self) -> float:
        return pq_from_counts(self.pq_tp, self.pq_fp, self.pq_fn, self.pq_iou_sum)[0]


@dataclass(frozen=True)
class TypeScores:
    """Type scores of an image or a data set (counts pooled)."""

    counts: dict[int, ClassCounts]
    det_tp: int
    det_fp: int
    det_fn: int

    @property
    def f1_d(self) -> float:
        return safe_ratio(2 * self.det_tp, 2 * self.det_tp + self.det_fp + self.det_fn)

    @property
    def mpq(self) -> float:
        return float(np.mean([c.pq for c in self.counts.values()])) if self.counts else 1.0

    def __add__(self, other: TypeScores) -> TypeScores:
        counts = dict(self.counts)
        for c, n in other.counts.items():
            counts[c] = counts.get(c, ClassCounts()) + n
        return TypeScores(
            counts,
            self.det_tp + other.det_tp,
            self.det_fp + other.det_fp,
            self.det_fn + other.det_fn,
        )

    def to_dict(self, names: Mapping[int, str] | None = None) -> dict[str, Any]:
        """``{"f1_d", "mpq", "classes": {name: {"f1", "pq", "n_gt", "n_pred"}}}``."""
        names = names or {}
        classes = {}
        for c in sorted(self.counts):
            n = self.counts[c]
            classes[names.get(c, str(c))] = {
                "f1": n.f1,
                "pq": n.pq,
                "n_gt": n.tp_c + n.fn_c + n.fn_d,
                "n_pred": n.tp_c + n.fp_c + n.fp_d,
            }
        return {"f1_d": self.f1_d, "mpq": self.mpq, "classes": classes}


def _classes_of(types: Any, ids: np.ndarray, what: str) -> np.ndarray:
    """Class of each id, from a mapping id -> class or an array indexed by id."""
    if isinstance(types, Mapping):
        try:
            return np.array([int(types[int(i)]) for i in ids], np.int64)
        except KeyError as exc:
            raise ValueError(f"{what}: no class for nucleus {exc.args[0]}") from None
    arr = np.asarray(types)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: expected a mapping or a 1-D integer array indexed by id")
    if ids.size and int(ids.max()) >= arr.size:
        raise ValueError(f"{what}: no class for nucleus {int(ids.max())}")
    return arr[ids].astype(np.int64)


def class_counts(
    table: OverlapTable,
    gt_types: Any,
    pred_types: Any,
    *,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> TypeScores:
    """Per-class counts of one image (see the module docstring).

    ``gt_types`` / ``pred_types``: mapping id -> class or array indexed by id; class 0
    ("no type") counts as a class of its own only if it occurs. ``pairs``: detected
    pairs as indices into ``table.gt_ids`` / ``table.pred_ids`` for F_d and F_c (e.g.
    :func:`centroid_pairs`, HoVer-Net's convention); default the IoU > 0.5 pairs.
    PQ always pairs by IoU > 0.5.
    """
    g = _classes_of(gt_types, table.gt_ids, "gt_types")
    p = _classes_of(pred_types, table.pred_ids, "pred_types")
    sel = table.pair_iou > 0.5  # unique pairs
    qi, qp = table.pair_gt_index[sel], table.pair_pred_index[sel]
    gi, pi = (qi, qp) if pairs is None else (np.asarray(pairs[0]), np.asarray(pairs[1]))
    g_paired = np.zeros(table.n_gt, bool)
    p_paired = np.zeros(table.n_pred, bool)
    g_paired[gi], p_paired[pi] = True, True
    gc, pc = g[gi], p[pi]
    qgc, qpc = g[qi], p[qp]
    counts = {}
    for c in np.union1d(g, p).tolist():
        both = (qgc == c) & (qpc == c)  # PQ within class c: IoU pairs both of class c
        n_g, n_p, tp = int((g == c).sum()), int((p == c).sum()), int(both.sum())
        counts[int(c)] = ClassCounts(
            tp_c=int(((gc == c) & (pc == c)).sum()),
            tn_c=int(((gc != c) & (pc != c)).sum()),
            fp_c=int(((gc != c) & (pc == c)).sum()),
            fn_c=int(((gc == c) & (pc != c)).sum()),
            fp_d=int(((p == c) & ~p_paired).sum()),
            fn_d=int(((g == c) & ~g_paired).sum()),
            pq_tp=tp,
            pq_fp=n_p - tp,
            pq_fn=n_g - tp,
            pq_iou_sum=float(table.pair_iou[sel][both].sum()),
        )
    n_pairs = int(gi.size)
    return TypeScores(counts, n_pairs, table.n_pred - n_pairs, table.n_gt - n_pairs)


def centroid_pairs(
    gt: np.ndarray, pred: np.ndarray, table: OverlapTable, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """HoVer-Net's detection pairing: one-to-one pairs of gt and predicted nuclei whose
    centroids are at most ``radius`` px apart, the total distance minimised; returned
    as indices into ``table.gt_ids`` / ``table.pred_ids``. (HoVer-Net uses 12 px at
    40x, i.e. 3 µm.)"""
    from scipy import ndimage as ndi
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial import cKDTree

    def centres(lab: np.ndarray, ids: np.ndarray) -> np.ndarray:
        if not ids.size:
            return np.zeros((0, 2))
        return np.asarray(ndi.center_of_mass(np.ones(lab.shape), lab, ids), float).reshape(-1, 2)

    cg, cp = centres(gt, table.gt_ids), centres(pred, table.pred_ids)
    if not len(cg) or not len(cp):
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    near = cKDTree(cg).sparse_distance_matrix(cKDTree(cp), radius, output_type="coo_matrix")
    if not near.nnz:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    big = radius * 10 + 1.0
    cost = np.full((len(cg), len(cp)), big)
    cost[near.row, near.col] = near.data
    rows, cols = linear_sum_assignment(cost)
    ok = cost[rows, cols] <= radius
    return rows[ok].astype(np.intp), cols[ok].astype(np.intp)


def type_scores(items: Iterable[TypeScores]) -> TypeScores:
    """Pool several images' counts into one :class:`TypeScores`."""
    total = TypeScores({}, 0, 0, 0)
    for s in items:
        total = total + s
    return total


def type_table(labels: np.ndarray, type_map: np.ndarray) -> np.ndarray:
    """Class of each nucleus (array indexed by label id; 0 for absent ids) from a
    per-pixel type map: the most frequent non-zero class under the nucleus.

    Raises ValueError for a map of another shape or one that is not whole classes 0-63.
    """
    if type_map.shape != labels.shape:
        raise ValueError(f"type map {type_map.shape} and labels {labels.shape} differ")
    if type_map.dtype.kind not in "ui" or (
        type_map.size and not int(type_map.min()) >= 0 and int(type_map.max()) <= 63
    ):
        raise ValueError(f"a type map holds whole classes 0-63, got {type_map.dtype}")
    n = int(labels.max()) + 1 if labels.size else 1
    k = int(type_map.max()) + 1 if type_map.size else 1
    fg = (labels > 0) & (type_map > 0)
    counts = np.zeros((n, k), np.int64)
    np.add.at(counts, (labels[fg].astype(np.int64), type_map[fg].astype(np.int64)), 1)
    table = counts.argmax(1).astype(np.uint8)
    table[counts.sum(1) == 0] = 0
    return table
