"""Instance-segmentation metrics for nucleus label images (numpy/scipy only).

Everything starts from one pass over the pixels: :func:`overlap_table` builds a sparse
table of the intersections between ground-truth (gt) and predicted nuclei plus their
areas.  Every metric is then computed from that small table, never from per-nucleus
masks:

* :func:`match` -- one-to-one matching at an IoU threshold, with TP/FP/FN, precision,
  recall, F1 and the DSB 2018 / StarDist "accuracy" TP / (TP + FP + FN);
* average precision with COCO-style 101-point interpolation (:func:`pr_curve`,
  :func:`average_precision`);
* panoptic quality PQ = DQ x SQ (:func:`panoptic_quality`);
* AJI and AJI+ (:func:`aggregated_jaccard`);
* foreground Dice (:func:`foreground_dice`);
* per-nucleus outcomes tp / fp / fn / split / merge (:func:`instance_outcomes`);
* :func:`evaluate` (one image) and :func:`evaluate_dataset` / :func:`combine_scores`
  (mean over images and pooled counts).

Conventions (see ``docs/metrics.md``): label 0 is background; ids may be any
non-negative integers, with gaps.  A ratio whose denominator is zero (which only
happens when its numerator is zero too) is 1.0 -- "nothing to find and nothing
false" -- so no score is ever NaN.  Scores built from counts (accuracy, F1, DQ, AJI,
Dice) are 0 whenever there is anything to find or anything predicted but no
match.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from napari_medinst._io import InputError, check_labels

__all__ = [
    "CATEGORIES",
    "THRESHOLDS",
    "DatasetScores",
    "ImageScores",
    "InstanceOutcomes",
    "Matching",
    "OverlapTable",
    "aggregated_jaccard",
    "aji_picks",
    "average_precision",
    "combine_scores",
    "evaluate",
    "evaluate_dataset",
    "evaluate_table",
    "foreground_dice",
    "instance_outcomes",
    "match",
    "overlap_table",
    "panoptic_quality",
    "pq_from_counts",
    "pr_curve",
    "safe_ratio",
    "threshold_key",
]

#: IoU thresholds 0.50, 0.55, ..., 0.95 used for accuracy, AP and mAP.
THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))

#: Outcome categories used by :func:`instance_outcomes`.
CATEGORIES: tuple[str, ...] = ("tp", "fp", "fn", "split", "merge")

#: Number of recall sample points of the COCO-style interpolated AP.
RECALL_POINTS = 101

NO_SCORES_NOTE = (
    "no confidence scores given: AP at each threshold is precision x recall of the "
    "single operating point (all predictions kept)"
)
SCORES_NOTE = "area under the confidence-swept precision-recall curve, COCO 101-point"

_INT64_MAX = int(np.iinfo(np.int64).max)


# --------------------------------------------------------------------------- helpers


def safe_ratio(num: float, den: float) -> float:
    """``num / den`` as a float, with 0/0 (empty denominator) defined as 1.0."""
    return 1.0 if den == 0 else float(num) / float(den)


def threshold_key(threshold: float) -> str:
    """JSON key of a threshold: two decimals (``0.5`` -> ``"0.50"``) when exact."""
    text = f"{threshold:.2f}"
    return text if float(text) == threshold else repr(float(threshold))


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not 0.0 < t <= 1.0:
        raise ValueError(f"IoU threshold must be in (0, 1], got {threshold!r}")
    return t


def _check_thresholds(thresholds: Iterable[float]) -> tuple[float, ...]:
    ts = tuple(_check_threshold(t) for t in thresholds)
    if not ts:
        raise ValueError("at least one IoU threshold is needed")
    if len(set(ts)) != len(ts):
        raise ValueError(f"IoU thresholds must be distinct, got {ts}")
    return ts


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    arr.setflags(write=False)
    return arr


# ---------------------------------------------------------------------- overlap table


@dataclass(frozen=True, eq=False)
class OverlapTable:
    """Sparse gt x pred intersection table, built once per image pair.

    Attributes
    ----------
    gt_ids, pred_ids : ndarray
        Sorted ids of the nuclei present (background 0 excluded).  ``int64``, or
        ``uint64`` when an id does not fit in ``int64``.
    gt_areas, pred_areas : ndarray of int64
        Pixel count of each nucleus, aligned with the id arrays.
    pair_gt_index, pair_pred_index : ndarray of intp
        For every overlapping (gt, pred) pair, the index into ``gt_ids`` /
        ``pred_ids``; pairs are sorted by gt index, then pred index.  Pairs that do
        not overlap are absent.
    pair_inter : ndarray of int64
        Intersection pixel count of each pair (always > 0).
    pair_iou : ndarray of float64
        Intersection over union of each pair, in (0, 1].
    """

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    gt_areas: np.ndarray
    pred_areas: np.ndarray
    pair_gt_index: np.ndarray
    pair_pred_index: np.ndarray
    pair_inter: np.ndarray
    pair_iou: np.ndarray

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            _readonly(getattr(self, name))

    @property
    def n_gt(self) -> int:
        """Number of gt nuclei."""
        return int(self.gt_ids.size)

    @property
    def n_pred(self) -> int:
        """Number of predicted nuclei."""
        return int(self.pred_ids.size)

    @property
    def n_pairs(self) -> int:
        """Number of overlapping (gt, pred) pairs."""
        return int(self.pair_iou.size)

    @property
    def pair_union(self) -> np.ndarray:
        """Union pixel count of each pair."""
        return (
            self.gt_areas[self.pair_gt_index]
            + self.pred_areas[self.pair_pred_index]
            - self.pair_inter
        )


def overlap_table(
    gt: np.ndarray, pred: np.ndarray, ignore_mask: np.ndarray | None = None
) -> OverlapTable:
    """Build the sparse overlap table of two label images in one pass over the pixels.

    Parameters
    ----------
    gt, pred : ndarray
        2-D instance label images of the same shape; 0 is background, any other
        non-negative integer is a nucleus id (any integer dtype, gaps allowed).
    ignore_mask : ndarray of bool, optional
        Same shape; pixels where it is True are set to background in both images
        before anything is counted (a nucleus lying partly under the mask keeps
        only its visible pixels; one lying wholly under it disappears).

    Returns
    -------
    OverlapTable

    Raises
    ------
    napari_medinst._io.InputError
        If an image is not a 2-D non-negative integer label image.
    ValueError
        If the shapes differ (the message names both shapes).

    Notes
    -----
    The flattened images are cut into runs of pixels with a constant (gt, pred)
    pair; areas and intersections are sums of run lengths, so the only per-pixel
    work is one comparison pass.  Ids are compacted with a lookup table (or
    ``np.unique`` on the runs when ids are very large).
    """
    gt = check_labels(gt, "gt")
    pred = check_labels(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred shapes differ: gt {gt.shape}, pred {pred.shape}")
    if ignore_mask is not None:
        gt, pred = _apply_ignore_mask(gt, pred, ignore_mask)
    g_run, p_run, length = _runs(np.ravel(gt), np.ravel(pred))
    gt_ids, gt_areas, gi = _compact_ids(g_run, length)
    pred_ids, pred_areas, pi = _compact_ids(p_run, length)
    pair_g, pair_p, inter = _pair_sums(gi, pi, length, pred_ids.size)
    union = gt_areas[pair_g] + pred_areas[pair_p] - inter
    return OverlapTable(
        gt_ids=gt_ids,
        pred_ids=pred_ids,
        gt_areas=gt_areas,
        pred_areas=pred_areas,
        pair_gt_index=pair_g,
        pair_pred_index=pair_p,
        pair_inter=inter,
        pair_iou=inter / np.maximum(union, 1),
    )


def _apply_ignore_mask(
    gt: np.ndarray, pred: np.ndarray, ignore_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    mask = np.asarray(ignore_mask)
    if mask.shape != gt.shape:
        raise ValueError(f"ignore_mask shape {mask.shape} differs from the image shape {gt.shape}")
    if mask.dtype != bool:
        if not np.issubdtype(mask.dtype, np.integer):
            raise InputError(f"ignore_mask: must be boolean, got dtype {mask.dtype}")
        mask = mask != 0
    gt = gt.copy()
    pred = pred.copy()
    gt[mask] = 0
    pred[mask] = 0
    return gt, pred


def _runs(g: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut two flat arrays into runs of constant (g, p); return values and lengths."""
    n = g.size
    if n == 0:
        return g[:0], p[:0], np.zeros(0, np.int64)
    change = g[1:] != g[:-1]
    change |= p[1:] != p[:-1]
    starts = np.flatnonzero(change)
    starts += 1
    starts = np.concatenate((np.zeros(1, starts.dtype), starts))
    lengths = np.diff(starts, append=n).astype(np.int64, copy=False)
    return g[starts], p[starts], lengths


def _id_dtype(vmax: int) -> type:
    return np.uint64 if vmax > _INT64_MAX else np.int64


def _compact_ids(
    values: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Present non-zero ids, their areas, and each run's id index (-1 for background)."""
    if values.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.intp)
    vmax = int(values.max())
    if vmax <= max(1 << 16, 4 * values.size):
        idx = values.astype(np.intp, copy=False)
        areas_all = np.bincount(idx, weights=lengths, minlength=vmax + 1)
        ids = np.flatnonzero(areas_all[1:]) + 1
        lut = np.full(vmax + 1, -1, np.intp)
        lut[ids] = np.arange(ids.size)
        return ids.astype(np.int64), areas_all[ids].astype(np.int64), lut[idx]
    uniq, inv = np.unique(values, return_inverse=True)
    areas = np.bincount(inv.ravel(), weights=lengths).astype(np.int64)
    inv = inv.ravel().astype(np.intp)
    if uniq[0] == 0:
        uniq, areas, inv = uniq[1:], areas[1:], inv - 1
    return uniq.astype(_id_dtype(vmax)), areas, inv


def _pair_sums(
    gi: np.ndarray, pi: np.ndarray, lengths: np.ndarray, n_pred: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum run lengths per (gt index, pred index) pair of overlapping runs."""
    both = (gi >= 0) & (pi >= 0)
    code = gi[both].astype(np.int64) * max(n_pred, 1) + pi[both]
    if code.size == 0:
        empty = np.zeros(0, np.intp)
        return empty, empty.copy(), np.zeros(0, np.int64)
    uniq, inv = np.unique(code, return_inverse=True)
    inter = np.bincount(inv.ravel(), weights=lengths[both]).astype(np.int64)
    return (uniq // max(n_pred, 1)).astype(np.intp), (uniq % max(n_pred, 1)).astype(np.intp), inter


def _subtable(table: OverlapTable, gt_keep: np.ndarray, pred_keep: np.ndarray) -> OverlapTable:
    """The table restricted to the gt and pred nuclei selected by boolean masks."""
    g_new = np.cumsum(gt_keep) - 1
    p_new = np.cumsum(pred_keep) - 1
    keep = gt_keep[table.pair_gt_index] & pred_keep[table.pair_pred_index]
    return OverlapTable(
        gt_ids=table.gt_ids[gt_keep],
        pred_ids=table.pred_ids[pred_keep],
        gt_areas=table.gt_areas[gt_keep],
        pred_areas=table.pred_areas[pred_keep],
        pair_gt_index=g_new[table.pair_gt_index[keep]].astype(np.intp),
        pair_pred_index=p_new[table.pair_pred_index[keep]].astype(np.intp),
        pair_inter=table.pair_inter[keep],
        pair_iou=table.pair_iou[keep],
    )


# --------------------------------------------------------------------------- matching


def _max_weight_matching(
    rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, *, cardinality_first: bool
) -> np.ndarray:
    """Indices of the edges of an optimal one-to-one matching of a sparse bipartite graph.

    Each edge ``k`` joins ``rows[k]`` and ``cols[k]`` (each pair at most once) with
    weight ``weights[k]`` in (0, 1].  Returns the sorted indices of a matching of
    maximum total weight, or -- with ``cardinality_first`` -- of maximum size and,
    among those, maximum total weight.  Isolated edges are taken directly; only the
    rest goes to the sparse assignment solver.
    """
    if rows.size == 0:
        return np.zeros(0, np.intp)
    deg_r = np.bincount(rows)[rows]
    deg_c = np.bincount(cols)[cols]
    simple = (deg_r == 1) & (deg_c == 1)
    rest = np.flatnonzero(~simple)
    chosen = np.flatnonzero(simple)
    if rest.size:
        picked = _sparse_assignment(
            rows[rest], cols[rest], weights[rest], cardinality_first=cardinality_first
        )
        chosen = np.concatenate((chosen, rest[picked]))
    return np.sort(chosen)


def _sparse_assignment(
    rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, *, cardinality_first: bool
) -> np.ndarray:
    """Optimal (not necessarily full) bipartite matching via a full one on a doubled graph.

    Left vertices are the rows plus one mirror per column; right vertices are the
    columns plus one mirror per row.  Besides the real edges (row, col) there are
    (row, row'), (col', col) and a mirror (col', row') for every real edge.  Every
    matching of the original graph extends to a perfect matching of this one using
    only constant-cost extra edges, so a minimum-cost perfect matching with cost
    ``base - weight`` on real edges is a maximum-weight matching of the original.
    """
    r_ids, r = np.unique(rows, return_inverse=True)
    c_ids, c = np.unique(cols, return_inverse=True)
    r, c = r.ravel(), c.ravel()
    nr, nc, ne = r_ids.size, c_ids.size, rows.size
    w = weights.astype(np.float64)
    if cardinality_first:
        # one more matched edge outweighs any possible gain in total weight (<= min(nr, nc))
        w = w + (min(nr, nc) + 1)
    base = float(w.max()) + 1.0
    left = np.concatenate((r, np.arange(nr), nr + np.arange(nc), nr + c))
    right = np.concatenate((c, nc + np.arange(nr), np.arange(nc), nc + r))
    cost = np.concatenate((base - w, np.full(nr + nc + ne, base)))
    graph = sparse.csr_array((cost, (left, right)), shape=(nr + nc, nr + nc))
    row_ind, col_ind = min_weight_full_bipartite_matching(graph)
    real = (row_ind < nr) & (col_ind < nc)
    codes = r.astype(np.int64) * nc + c
    order = np.argsort(codes)
    wanted = row_ind[real].astype(np.int64) * nc + col_ind[real]
    return order[np.searchsorted(codes[order], wanted)]


@dataclass(frozen=True, eq=False)
class Matching:
    """One-to-one matching of gt and predicted nuclei at one IoU threshold.

    Attributes
    ----------
    threshold : float
        A pair may match when its IoU >= ``threshold``.
    n_gt, n_pred : int
        Number of gt / predicted nuclei.
    tp, fp, fn : int
        Matched pairs, unmatched predictions, unmatched gt nuclei.
    precision, recall, f1, accuracy : float
        ``TP/(TP+FP)``, ``TP/(TP+FN)``, ``2TP/(2TP+FP+FN)`` and
        ``TP/(TP+FP+FN)`` (the DSB 2018 / StarDist "accuracy", often called AP
        there); a 0/0 ratio is 1.0.
    mean_matched_iou : float
        Mean IoU of the matched pairs (1.0 when both images are empty, 0.0 when
        nothing matched otherwise).
    matched_gt_index, matched_pred_index : ndarray of intp
        Indices into the table's ``gt_ids`` / ``pred_ids`` of the matched pairs.
    matched_gt_ids, matched_pred_ids : ndarray
        Ids of the matched pairs.
    matched_iou : ndarray of float64
        IoU of the matched pairs.
    """

    threshold: float
    n_gt: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    accuracy: float
    mean_matched_iou: float
    matched_gt_index: np.ndarray = field(repr=False)
    matched_pred_index: np.ndarray = field(repr=False)
    matched_gt_ids: np.ndarray = field(repr=False)
    matched_pred_ids: np.ndarray = field(repr=False)
    matched_iou: np.ndarray = field(repr=False)

    def pairs(self) -> list[tuple[int, int, float]]:
        """Matched pairs as ``(gt id, pred id, iou)`` tuples of Python numbers."""
        return [
            (int(g), int(p), float(i))
            for g, p, i in zip(
                self.matched_gt_ids, self.matched_pred_ids, self.matched_iou, strict=True
            )
        ]


def match(table: OverlapTable, threshold: float = 0.5, priority: Any = None) -> Matching:
    """Match gt and predicted nuclei one-to-one at an IoU threshold.

    A pair is a candidate when its IoU >= ``threshold``.  The matching has maximum
    cardinality and, among those, maximum total IoU.  For ``threshold > 0.5`` every
    nucleus has at most one candidate (IoU > 0.5 leaves room for a single
    partner), so candidates are matches; ties (possible only at ``threshold <=
    0.5``, e.g. two predictions each covering exactly half of a gt nucleus) are
    resolved by an optimal assignment.

    Parameters
    ----------
    table : OverlapTable
    threshold : float, default 0.5
        IoU threshold in (0, 1].
    priority : array of float, optional
        One value per prediction (in ``table.pred_ids`` order), e.g. its confidence:
        among equally good matchings, the one pairing higher-priority predictions
        wins. This makes AP independent of the ids in the exact-0.5 tie case, as
        COCO's score-ordered matching is.

    Returns
    -------
    Matching
    """
    threshold = _check_threshold(threshold)
    cand = np.flatnonzero(table.pair_iou >= threshold)
    return _matching_from(table, threshold, cand, priority)


def _matching_from(
    table: OverlapTable, threshold: float, cand: np.ndarray, priority: Any = None
) -> Matching:
    weights = table.pair_iou[cand]
    if priority is not None and cand.size:
        p = np.asarray(priority, np.float64)
        rank = np.argsort(np.argsort(p, kind="stable"), kind="stable") / max(1, p.size)
        weights = weights + 1e-7 * rank[table.pair_pred_index[cand]]
    picked = _max_weight_matching(
        table.pair_gt_index[cand],
        table.pair_pred_index[cand],
        weights,
        cardinality_first=True,
    )
    sel = cand[picked]
    gi, pi, iou = table.pair_gt_index[sel], table.pair_pred_index[sel], table.pair_iou[sel]
    tp, n_gt, n_pred = int(sel.size), table.n_gt, table.n_pred
    fp, fn = n_pred - tp, n_gt - tp
    return Matching(
        threshold=threshold,
        n_gt=n_gt,
        n_pred=n_pred,
        tp=tp,
        fp=fp,
        fn=fn,
        precision=safe_ratio(tp, n_pred),
        recall=safe_ratio(tp, n_gt),
        f1=safe_ratio(2 * tp, 2 * tp + fp + fn),
        accuracy=safe_ratio(tp, tp + fp + fn),
        mean_matched_iou=_mean_iou(float(iou.sum()), tp, n_gt + n_pred),
        matched_gt_index=_readonly(gi),
        matched_pred_index=_readonly(pi),
        matched_gt_ids=_readonly(table.gt_ids[gi]),
        matched_pred_ids=_readonly(table.pred_ids[pi]),
        matched_iou=_readonly(iou),
    )


def _mean_iou(iou_sum: float, tp: int, n_objects: int) -> float:
    """Mean matched IoU: 1.0 when there are no objects at all, 0.0 when none matched."""
    if tp:
        return iou_sum / tp
    return 1.0 if n_objects == 0 else 0.0


# ---------------------------------------------------------------- average precision


def _score_array(scores: Any, pred_ids: np.ndarray) -> np.ndarray:
    """Confidence score of every predicted nucleus, validated (finite, none missing)."""
    values = _values_for_ids(scores, pred_ids, "scores", np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"scores: not finite for prediction ids {_few(pred_ids[bad])}")
    return values


def _values_for_ids(source: Any, ids: np.ndarray, what: str, dtype: type) -> np.ndarray:
    """Look up ``source[id]`` for every id (``source``: mapping id -> value or array)."""
    if isinstance(source, Mapping):
        missing = [int(i) for i in ids if int(i) not in source]
        if missing:
            raise ValueError(f"{what}: no value for ids {_few(missing)}")
        try:
            return np.array([source[int(i)] for i in ids], dtype=dtype).reshape(ids.size)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what}: values must be numbers ({exc})") from exc
    arr = np.asarray(source)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a mapping id -> value or a 1-D array indexed by id")
    if ids.size and int(ids.max()) >= arr.size:
        missing = ids[ids >= arr.size]
        raise ValueError(f"{what}: array of length {arr.size} has no value for ids {_few(missing)}")
    try:
        return arr[ids.astype(np.intp)].astype(dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: values must be numbers ({exc})") from exc


def _few(ids: Iterable[Any], limit: int = 5) -> str:
    ids = [int(i) for i in ids]
    text = ", ".join(str(i) for i in ids[:limit])
    return text + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _pr_counts(scores: np.ndarray, hits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative TP, number kept and score threshold at each distinct score (descending)."""
    order = np.argsort(-scores, kind="stable")
    s, h = scores[order], hits[order]
    tp = np.cumsum(h, dtype=np.int64)
    last = np.append(s[1:] != s[:-1], True)
    return tp[last], np.flatnonzero(last) + 1, s[last]


def _ap_101(tp: np.ndarray, kept: np.ndarray, n_gt: int) -> float:
    """COCO 101-point interpolated AP of a PR curve given by cumulative counts."""
    precision = tp / kept
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    # first curve point whose recall tp/n_gt reaches k/100, compared exactly in integers
    pos = np.searchsorted(100 * tp, np.arange(RECALL_POINTS) * n_gt, side="left")
    sampled = np.where(pos < tp.size, envelope[np.minimum(pos, tp.size - 1)], 0.0)
    return float(sampled.mean())


def _ap_from_hits(n_gt: int, scores: np.ndarray | None, hits: np.ndarray) -> float:
    """AP of one class at one threshold from per-prediction TP flags."""
    n_pred = int(hits.size)
    if n_gt == 0:
        return 1.0 if n_pred == 0 else 0.0
    if n_pred == 0:
        return 0.0
    if scores is None:
        tp = int(hits.sum())
        return (tp / n_pred) * (tp / n_gt)
    tp, kept, _ = _pr_counts(scores, hits)
    return _ap_101(tp, kept, n_gt)


def _pred_hits(table: OverlapTable, matching: Matching) -> np.ndarray:
    hits = np.zeros(table.n_pred, bool)
    hits[matching.matched_pred_index] = True
    return hits


def pr_curve(
    table: OverlapTable, scores: Any, threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve swept over the prediction confidence.

    The one-to-one matching at ``threshold`` (see :func:`match`) is computed once
    on all predictions; keeping the predictions with score >= s, the TP count is
    the number of kept matched predictions.  One point per distinct score.

    Parameters
    ----------
    table : OverlapTable
    scores : mapping pred id -> float, or array indexed by pred id, or None
        Confidence of every predicted nucleus.  None gives every prediction the
        score 1.0 (a single point).
    threshold : float, default 0.5

    Returns
    -------
    recall, precision, thresholds : ndarray of float64
        One entry per distinct score, from the highest score down; ``thresholds``
        holds that score.  Recall is 1.0 when there is no gt nucleus.  Empty when
        there is no prediction.
    """
    s = np.ones(table.n_pred) if scores is None else _score_array(scores, table.pred_ids)
    matching = match(table, threshold, priority=s)
    if table.n_pred == 0:
        empty = np.zeros(0)
        return empty, empty.copy(), empty.copy()
    tp, kept, thr = _pr_counts(s, _pred_hits(table, matching))
    recall = tp / table.n_gt if table.n_gt else np.ones(tp.size)
    return recall.astype(np.float64), tp / kept, thr.astype(np.float64)


def average_precision(table: OverlapTable, scores: Any = None, threshold: float = 0.5) -> float:
    """Average precision of one image at one IoU threshold (no classes).

    With scores: area under the :func:`pr_curve` with COCO 101-point
    interpolation -- the precision is replaced by its running maximum from the
    right (monotone envelope) and sampled at recall 0, 0.01, ..., 1; a recall level
    never reached counts 0.  Without scores (``None``): precision x recall of the
    single operating point.  No gt nucleus: 1.0 if there is no prediction either,
    else 0.0.
    """
    s = None if scores is None else _score_array(scores, table.pred_ids)
    matching = match(table, threshold, priority=s)
    return _ap_from_hits(table.n_gt, s, _pred_hits(table, matching))


@dataclass(frozen=True, eq=False)
class _ClassDetections:
    """What AP needs of one class of one image; pooled over images by concatenation."""

    n_gt: int
    scores: np.ndarray | None  # (n_pred,) confidences, or None
    hits: np.ndarray  # (n_thresholds, n_pred) bool: prediction matched at threshold


def _merge_detections(items: Sequence[_ClassDetections], use_scores: bool) -> _ClassDetections:
    return _ClassDetections(
        n_gt=sum(d.n_gt for d in items),
        scores=np.concatenate([d.scores for d in items]) if use_scores else None,
        hits=np.concatenate([d.hits for d in items], axis=1),
    )


def _ap_per_threshold(detections: Mapping[Any, _ClassDetections], n_thresholds: int) -> list[float]:
    """AP per threshold: mean over classes present in gt (all classes if none is)."""
    if not detections:  # typed, and no nucleus at all
        return [1.0] * n_thresholds
    evaluated = [d for d in detections.values() if d.n_gt > 0]
    if not evaluated:
        merged = _merge_detections(list(detections.values()), use_scores=False)
        return [_ap_from_hits(0, None, merged.hits[k]) for k in range(n_thresholds)]
    return [
        float(np.mean([_ap_from_hits(d.n_gt, d.scores, d.hits[k]) for d in evaluated]))
        for k in range(n_thresholds)
    ]


def _class_map(detections: Mapping[Any, _ClassDetections], n_thresholds: int) -> dict[int, float]:
    return {
        int(c): float(
            np.mean([_ap_from_hits(d.n_gt, d.scores, d.hits[k]) for k in range(n_thresholds)])
        )
        for c, d in detections.items()
        if c is not None and d.n_gt > 0
    }


def _detections(
    table: OverlapTable,
    matchings: Sequence[Matching],
    scores: np.ndarray | None,
    gt_types: Any,
    pred_types: Any,
) -> dict[Any, _ClassDetections]:
    if gt_types is None:
        hits = np.stack([_pred_hits(table, m) for m in matchings])
        return {None: _ClassDetections(table.n_gt, scores, hits.reshape(len(matchings), -1))}
    g_cls = _values_for_ids(gt_types, table.gt_ids, "gt_types", np.int64)
    p_cls = _values_for_ids(pred_types, table.pred_ids, "pred_types", np.int64)
    out = {}
    for c in np.union1d(g_cls, p_cls):
        p_keep = p_cls == c
        sub = _subtable(table, g_cls == c, p_keep)
        prio = None if scores is None else scores[p_keep]
        hits = [_pred_hits(sub, match(sub, m.threshold, priority=prio)) for m in matchings]
        out[int(c)] = _ClassDetections(
            sub.n_gt,
            None if scores is None else scores[p_keep],
            np.stack(hits).reshape(len(matchings), -1),
        )
    return out


# ----------------------------------------------------------------- PQ, AJI, Dice


def _pq_counts(table: OverlapTable) -> tuple[int, int, int, float]:
    """TP, FP, FN and matched-IoU sum of the strict IoU > 0.5 matching (unique)."""
    sel = table.pair_iou > 0.5
    tp = int(sel.sum())
    return tp, table.n_pred - tp, table.n_gt - tp, float(table.pair_iou[sel].sum())


def pq_from_counts(tp: int, fp: int, fn: int, iou_sum: float) -> tuple[float, float, float]:
    """(pq, dq, sq) from counts; all 1.0 when there is nothing at all."""
    dq = safe_ratio(tp, tp + 0.5 * fp + 0.5 * fn)
    sq = _mean_iou(iou_sum, tp, tp + fp + fn)
    return dq * sq, dq, sq


def panoptic_quality(table: OverlapTable) -> tuple[float, float, float]:
    """Panoptic quality (Kirillov et al. 2019) of one image, single class.

    Matches are the pairs with IoU > 0.5 (strict; they are unique).
    ``DQ = TP / (TP + FP/2 + FN/2)``, ``SQ`` = mean IoU of the matches and
    ``PQ = DQ * SQ``.  Both images empty: all 1.0; nothing matched otherwise: all 0.0.

    Returns
    -------
    pq, dq, sq : float
    """
    return pq_from_counts(*_pq_counts(table))


def aji_picks(table: OverlapTable) -> np.ndarray:
    """Pair index of the prediction each gt nucleus takes in AJI (one per overlapped gt).

    Highest IoU; ties go to the larger intersection (equal IoU and intersection mean
    equal areas, so the choice changes neither C nor U: the result is id-independent).
    """
    g, p = table.pair_gt_index, table.pair_pred_index
    order = np.lexsort((p, -table.pair_inter, -table.pair_iou, g))
    return order[np.append(True, g[order][1:] != g[order][:-1])] if order.size else order


def _aji_sums(table: OverlapTable) -> tuple[int, int]:
    """Kumar AJI numerator C and denominator U (best-IoU prediction per gt, reusable)."""
    g, p = table.pair_gt_index, table.pair_pred_index
    first = aji_picks(table)
    inter = table.pair_inter[first]
    union = table.gt_areas[g[first]] + table.pred_areas[p[first]] - inter
    covered = np.zeros(table.n_gt, bool)
    covered[g[first]] = True
    used = np.zeros(table.n_pred, bool)
    used[p[first]] = True
    c = int(inter.sum())
    u = int(union.sum() + table.gt_areas[~covered].sum() + table.pred_areas[~used].sum())
    return c, u


def _aji_plus_sums(table: OverlapTable) -> tuple[int, int]:
    """AJI+ numerator and denominator (one-to-one, total IoU maximised)."""
    # equal total IoU: prefer larger intersections, so the result does not depend on ids
    tiebreak = 1e-9 * table.pair_inter / max(1, int(table.pair_inter.max(initial=0)))
    sel = _max_weight_matching(
        table.pair_gt_index,
        table.pair_pred_index,
        table.pair_iou + tiebreak,
        cardinality_first=False,
    )
    g, p = table.pair_gt_index[sel], table.pair_pred_index[sel]
    inter = table.pair_inter[sel]
    union = table.gt_areas[g] + table.pred_areas[p] - inter
    g_free = np.ones(table.n_gt, bool)
    g_free[g] = False
    p_free = np.ones(table.n_pred, bool)
    p_free[p] = False
    c = int(inter.sum())
    u = int(union.sum() + table.gt_areas[g_free].sum() + table.pred_areas[p_free].sum())
    return c, u


def aggregated_jaccard(table: OverlapTable) -> tuple[float, float]:
    """AJI (Kumar et al. 2017) and AJI+ (Graham et al. 2019) of one image.

    AJI: every gt nucleus G takes the prediction P of highest IoU among those that
    overlap it (a prediction may be taken by several gt nuclei);
    ``C += |G & P|``, ``U += |G | P|``.  A gt nucleus overlapping nothing adds
    ``|G|`` to U; every prediction never taken adds its area to U.  AJI = C / U.

    AJI+: the same sums over a one-to-one assignment of overlapping pairs that
    maximises the total IoU, so a prediction is never counted twice in U.

    Both images empty: 1.0.  Returns ``(aji, aji_plus)``.
    """
    c, u = _aji_sums(table)
    c2, u2 = _aji_plus_sums(table)
    return safe_ratio(c, u), safe_ratio(c2, u2)


def foreground_dice(table: OverlapTable) -> float:
    """Dice ``2|A & B| / (|A| + |B|)`` of the binary foregrounds (1.0 if both empty)."""
    inter = int(table.pair_inter.sum())
    return safe_ratio(2 * inter, int(table.gt_areas.sum() + table.pred_areas.sum()))


# ------------------------------------------------------------------------ outcomes


@dataclass(frozen=True, eq=False)
class InstanceOutcomes:
    """Per-nucleus outcome of a matching at one IoU threshold.

    Categories (see :func:`instance_outcomes`): ``"tp"``, ``"fp"`` (predictions
    only), ``"fn"`` (gt only), ``"split"`` and ``"merge"`` (both).

    Attributes
    ----------
    threshold : float
    gt_ids, pred_ids : ndarray
        All gt / predicted ids, sorted.
    gt_partner, pred_partner : ndarray
        Id of the matched partner, 0 when unmatched.
    gt_iou, pred_iou : ndarray of float64
        IoU with the matched partner, 0.0 when unmatched.
    gt_category, pred_category : ndarray of str
    """

    threshold: float
    gt_ids: np.ndarray
    gt_partner: np.ndarray
    gt_iou: np.ndarray
    gt_category: np.ndarray
    pred_ids: np.ndarray
    pred_partner: np.ndarray
    pred_iou: np.ndarray
    pred_category: np.ndarray

    @property
    def counts(self) -> dict[str, int]:
        """Counts: ``tp`` (pairs), ``fp``, ``fn``, ``split_gt``, ``split_pred``,
        ``merge_gt``, ``merge_pred``."""
        g, p = self.gt_category, self.pred_category
        return {
            "tp": int(np.count_nonzero(g == "tp")),
            "fp": int(np.count_nonzero(p == "fp")),
            "fn": int(np.count_nonzero(g == "fn")),
            "split_gt": int(np.count_nonzero(g == "split")),
            "split_pred": int(np.count_nonzero(p == "split")),
            "merge_gt": int(np.count_nonzero(g == "merge")),
            "merge_pred": int(np.count_nonzero(p == "merge")),
        }


def instance_outcomes(table: OverlapTable, threshold: float = 0.5) -> InstanceOutcomes:
    """Classify every gt and predicted nucleus after matching at ``threshold``.

    * ``"tp"``: matched (see :func:`match`).
    * ``"split"``: an unmatched gt nucleus G in which at least two unmatched
      predictions *lie* (P lies in G when ``|P & G| >= |P| / 2``); G and those
      predictions are "split".
    * ``"merge"``: an unmatched prediction P that covers at least half of each of
      two or more unmatched gt nuclei (``|P & G| >= |G| / 2``); P and those gt
      nuclei are "merge".  Merge is decided after split and wins when both apply.
    * otherwise ``"fn"`` (unmatched gt) or ``"fp"`` (unmatched prediction).

    Matched nuclei are never re-labelled.

    Returns
    -------
    InstanceOutcomes
    """
    m = match(table, threshold)
    g_partner = np.zeros(table.n_gt, table.pred_ids.dtype)
    p_partner = np.zeros(table.n_pred, table.gt_ids.dtype)
    g_iou, p_iou = np.zeros(table.n_gt), np.zeros(table.n_pred)
    g_partner[m.matched_gt_index] = m.matched_pred_ids
    p_partner[m.matched_pred_index] = m.matched_gt_ids
    g_iou[m.matched_gt_index] = m.matched_iou
    p_iou[m.matched_pred_index] = m.matched_iou
    g_cat = np.full(table.n_gt, "fn", dtype="<U5")
    p_cat = np.full(table.n_pred, "fp", dtype="<U5")
    g_cat[m.matched_gt_index] = "tp"
    p_cat[m.matched_pred_index] = "tp"
    _mark_split_merge(table, g_cat, p_cat)
    return InstanceOutcomes(
        threshold=m.threshold,
        gt_ids=_readonly(table.gt_ids.copy()),
        gt_partner=_readonly(g_partner),
        gt_iou=_readonly(g_iou),
        gt_category=_readonly(g_cat),
        pred_ids=_readonly(table.pred_ids.copy()),
        pred_partner=_readonly(p_partner),
        pred_iou=_readonly(p_iou),
        pred_category=_readonly(p_cat),
    )


def _mark_split_merge(table: OverlapTable, g_cat: np.ndarray, p_cat: np.ndarray) -> None:
    g, p, inter = table.pair_gt_index, table.pair_pred_index, table.pair_inter
    free = (g_cat[g] != "tp") & (p_cat[p] != "tp")
    lies_in = free & (2 * inter >= table.pred_areas[p])
    split_gt = np.bincount(g[lies_in], minlength=table.n_gt) >= 2
    split_pairs = lies_in & split_gt[g]
    g_cat[split_gt] = "split"
    p_cat[p[split_pairs]] = "split"
    covers = free & (2 * inter >= table.gt_areas[g])
    merge_pred = np.bincount(p[covers], minlength=table.n_pred) >= 2
    merge_pairs = covers & merge_pred[p]
    p_cat[merge_pred] = "merge"
    g_cat[g[merge_pairs]] = "merge"


# ------------------------------------------------------------------------ one image


@dataclass(frozen=True, eq=False)
class ImageScores:
    """All scores of one image, plus the raw sums needed to pool images.

    Per-threshold values are dicts keyed by the threshold (float).  ``ap`` is the
    per-threshold AP (mean over classes when types are given) and ``map`` its mean
    over thresholds.  ``has_scores`` says whether confidences were given;
    ``ap_note`` says in words what ``ap`` is.  ``class_map`` maps each class
    present in gt to its mAP (empty without types).

    Raw sums: ``tp``/``fp``/``fn`` per threshold; ``pq_tp``, ``pq_fp``,
    ``pq_fn``, ``pq_iou_sum`` (IoU > 0.5 matching); ``aji_c``/``aji_u`` and
    ``aji_plus_c``/``aji_plus_u``; ``dice_inter`` (|A & B|) and ``dice_sum``
    (|A| + |B|).
    """

    n_gt: int
    n_pred: int
    thresholds: tuple[float, ...]
    tp: dict[float, int]
    fp: dict[float, int]
    fn: dict[float, int]
    precision: dict[float, float]
    recall: dict[float, float]
    f1: dict[float, float]
    accuracy: dict[float, float]
    ap: dict[float, float]
    map: float
    pq: float
    dq: float
    sq: float
    aji: float
    aji_plus: float
    dice: float
    has_scores: bool
    ap_note: str
    pq_tp: int
    pq_fp: int
    pq_fn: int
    pq_iou_sum: float
    aji_c: int
    aji_u: int
    aji_plus_c: int
    aji_plus_u: int
    dice_inter: int
    dice_sum: int
    class_map: dict[int, float] = field(default_factory=dict)
    detections: dict[Any, _ClassDetections] = field(default_factory=dict, repr=False)
    #: per-class F1 / PQ counts (:class:`~napari_medinst.class_metrics.TypeScores`),
    #: None without types
    types: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``n_gt``, ``n_pred``, per-threshold ``accuracy``, ``ap``,
        ``precision``, ``recall``, ``f1`` (keys "0.50", ...), ``map``, ``pq``,
        ``dq``, ``sq``, ``aji``, ``aji_plus``, ``dice``; plain Python numbers."""
        per = {
            key: {threshold_key(t): float(v) for t, v in getattr(self, key).items()}
            for key in ("accuracy", "ap", "precision", "recall", "f1")
        }
        scalars = {
            key: float(getattr(self, key))
            for key in ("map", "pq", "dq", "sq", "aji", "aji_plus", "dice")
        }
        return {"n_gt": int(self.n_gt), "n_pred": int(self.n_pred), **per, **scalars}


def evaluate(
    gt: np.ndarray,
    pred: np.ndarray,
    *,
    scores: Any = None,
    gt_types: Any = None,
    pred_types: Any = None,
    ignore_mask: np.ndarray | None = None,
    thresholds: Iterable[float] = THRESHOLDS,
) -> ImageScores:
    """Compute every metric of one predicted label image against its ground truth.

    Parameters
    ----------
    gt, pred : ndarray
        2-D instance label images of equal shape (0 = background).
    scores : mapping pred id -> float, or array indexed by pred id, optional
        Confidence of each predicted nucleus, for AP.  Without it AP is
        precision x recall of the single operating point (``has_scores=False``).
    gt_types, pred_types : mapping id -> int class, or array indexed by id, optional
        Give both or neither.  With types, AP/mAP are computed per class (matching
        only within a class) and averaged over the classes present in gt; the
        other scores ignore types.
    ignore_mask : ndarray of bool, optional
        Pixels set to background in both images before anything else.
    thresholds : iterable of float, default :data:`THRESHOLDS`

    Returns
    -------
    ImageScores

    Notes
    -----
    Edge cases (never NaN): both images empty -> every score 1.0.  No gt but some
    predictions -> precision 0, recall 1, accuracy/F1/AP/PQ/AJI/Dice 0.  No
    prediction but some gt -> precision 1, recall 0, accuracy/F1/AP/PQ/AJI/Dice 0.
    """
    thresholds = _check_thresholds(thresholds)
    table = overlap_table(gt, pred, ignore_mask=ignore_mask)
    return evaluate_table(
        table, scores=scores, gt_types=gt_types, pred_types=pred_types, thresholds=thresholds
    )


def evaluate_table(
    table: OverlapTable,
    *,
    scores: Any = None,
    gt_types: Any = None,
    pred_types: Any = None,
    thresholds: Iterable[float] = THRESHOLDS,
) -> ImageScores:
    """:func:`evaluate` on an already built :class:`OverlapTable`."""
    thresholds = _check_thresholds(thresholds)
    if (gt_types is None) != (pred_types is None):
        raise ValueError("give both gt_types and pred_types, or neither")
    s = None if scores is None else _score_array(scores, table.pred_ids)
    matchings = [match(table, t, priority=s) for t in thresholds]
    detections = _detections(table, matchings, s, gt_types, pred_types)
    ap = _ap_per_threshold(detections, len(thresholds))
    pq_tp, pq_fp, pq_fn, pq_iou = _pq_counts(table)
    pq, dq, sq = pq_from_counts(pq_tp, pq_fp, pq_fn, pq_iou)
    aji_c, aji_u = _aji_sums(table)
    ajip_c, ajip_u = _aji_plus_sums(table)
    dice_inter = int(table.pair_inter.sum())
    dice_sum = int(table.gt_areas.sum() + table.pred_areas.sum())

    def per(attr: str) -> dict[float, Any]:
        return {m.threshold: getattr(m, attr) for m in matchings}

    return ImageScores(
        n_gt=table.n_gt,
        n_pred=table.n_pred,
        thresholds=thresholds,
        tp=per("tp"),
        fp=per("fp"),
        fn=per("fn"),
        precision=per("precision"),
        recall=per("recall"),
        f1=per("f1"),
        accuracy=per("accuracy"),
        ap=dict(zip(thresholds, ap, strict=True)),
        map=float(np.mean(ap)),
        pq=pq,
        dq=dq,
        sq=sq,
        aji=safe_ratio(aji_c, aji_u),
        aji_plus=safe_ratio(ajip_c, ajip_u),
        dice=safe_ratio(2 * dice_inter, dice_sum),
        has_scores=s is not None,
        ap_note=SCORES_NOTE if s is not None else NO_SCORES_NOTE,
        pq_tp=pq_tp,
        pq_fp=pq_fp,
        pq_fn=pq_fn,
        pq_iou_sum=pq_iou,
        aji_c=aji_c,
        aji_u=aji_u,
        aji_plus_c=ajip_c,
        aji_plus_u=ajip_u,
        dice_inter=dice_inter,
        dice_sum=dice_sum,
        class_map=_class_map(detections, len(thresholds)),
        detections=detections,
        types=None if gt_types is None else _type_counts(table, gt_types, pred_types),
    )


def _type_counts(table: OverlapTable, gt_types: Any, pred_types: Any) -> Any:
    from .class_metrics import class_counts  # (it builds on this module)

    return class_counts(table, gt_types, pred_types)


# ---------------------------------------------------------------------- a dataset


@dataclass(frozen=True, eq=False)
class DatasetScores:
    """Scores of a set of images.

    Attributes
    ----------
    images : tuple of ImageScores
        Per-image scores, in input order.
    mean : dict
        Mean over images of every per-image score (same keys as
        :meth:`ImageScores.to_dict`; ``n_gt``/``n_pred`` are mean counts).
    pooled : dict
        Scores of the counts summed over images: ``n_gt``, ``n_pred`` (totals),
        per-threshold ``tp``, ``fp``, ``fn``, ``accuracy``, ``ap``, ``precision``,
        ``recall``, ``f1``; ``map``, ``pq``, ``dq``, ``sq``, ``aji`` (sum C / sum
        U), ``aji_plus`` and ``dice``.  Pooled AP ranks all predictions of all
        images together (COCO style); when any image lacks scores it is the pooled
        precision x recall.
    """

    images: tuple[ImageScores, ...]
    mean: dict[str, Any]
    pooled: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """``{"images": [...], "mean": {...}, "pooled": {...}}``, JSON-ready."""
        return {
            "images": [s.to_dict() for s in self.images],
            "mean": self.mean,
            "pooled": self.pooled,
        }


def evaluate_dataset(
    pairs: Iterable[Any], *, thresholds: Iterable[float] = THRESHOLDS
) -> DatasetScores:
    """Evaluate several images and summarise them (mean and pooled).

    Parameters
    ----------
    pairs : iterable
        Each item is a ``(gt, pred)`` tuple of label arrays, a mapping with keys
        ``gt``, ``pred`` and optionally ``scores``, ``gt_types``, ``pred_types``,
        ``ignore_mask``, or an already computed :class:`ImageScores`.
    thresholds : iterable of float, default :data:`THRESHOLDS`

    Returns
    -------
    DatasetScores
    """
    thresholds = _check_thresholds(thresholds)
    images = []
    for item in pairs:
        if isinstance(item, ImageScores):
            images.append(item)
        elif isinstance(item, Mapping):
            kwargs = dict(item)
            gt, pred = kwargs.pop("gt"), kwargs.pop("pred")
            images.append(evaluate(gt, pred, thresholds=thresholds, **kwargs))
        else:
            gt, pred = item
            images.append(evaluate(gt, pred, thresholds=thresholds))
    return combine_scores(images)


def combine_scores(images: Sequence[ImageScores]) -> DatasetScores:
    """Mean and pooled scores of already evaluated images (see :class:`DatasetScores`).

    Raises
    ------
    ValueError
        If ``images`` is empty, the images used different thresholds, or typed and
        untyped images are mixed.
    """
    images = tuple(images)
    if not images:
        raise ValueError("no images to evaluate")
    if len({s.thresholds for s in images}) != 1:
        raise ValueError("all images must be evaluated at the same IoU thresholds")
    if len({None in s.detections for s in images}) != 1:
        raise ValueError("cannot pool images with and without nucleus types")
    return DatasetScores(images=images, mean=_mean_dict(images), pooled=_pooled_dict(images))


def _mean_dict(images: Sequence[ImageScores]) -> dict[str, Any]:
    dicts = [s.to_dict() for s in images]
    out: dict[str, Any] = {}
    for key, value in dicts[0].items():
        if isinstance(value, dict):
            out[key] = {k: float(np.mean([d[key][k] for d in dicts])) for k in value}
        else:
            out[key] = float(np.mean([d[key] for d in dicts]))
    return out


def _pooled_dict(images: Sequence[ImageScores]) -> dict[str, Any]:
    thresholds = images[0].thresholds
    out: dict[str, Any] = {
        "n_gt": sum(s.n_gt for s in images),
        "n_pred": sum(s.n_pred for s in images),
    }
    for key in ("tp", "fp", "fn"):
        out[key] = {threshold_key(t): sum(getattr(s, key)[t] for s in images) for t in thresholds}
    per: dict[str, dict[str, float]] = {k: {} for k in ("accuracy", "precision", "recall", "f1")}
    for t in thresholds:
        k = threshold_key(t)
        tp, fp, fn = out["tp"][k], out["fp"][k], out["fn"][k]
        per["accuracy"][k] = safe_ratio(tp, tp + fp + fn)
        per["precision"][k] = safe_ratio(tp, tp + fp)
        per["recall"][k] = safe_ratio(tp, tp + fn)
        per["f1"][k] = safe_ratio(2 * tp, 2 * tp + fp + fn)
    ap = _ap_per_threshold(_pooled_detections(images), len(thresholds))
    pq, dq, sq = pq_from_counts(
        sum(s.pq_tp for s in images),
        sum(s.pq_fp for s in images),
        sum(s.pq_fn for s in images),
        sum(s.pq_iou_sum for s in images),
    )
    out.update(
        accuracy=per["accuracy"],
        ap={threshold_key(t): float(v) for t, v in zip(thresholds, ap, strict=True)},
        precision=per["precision"],
        recall=per["recall"],
        f1=per["f1"],
        map=float(np.mean(ap)),
        pq=pq,
        dq=dq,
        sq=sq,
        aji=safe_ratio(sum(s.aji_c for s in images), sum(s.aji_u for s in images)),
        aji_plus=safe_ratio(sum(s.aji_plus_c for s in images), sum(s.aji_plus_u for s in images)),
        dice=safe_ratio(2 * sum(s.dice_inter for s in images), sum(s.dice_sum for s in images)),
    )
    if images[0].types is not None:
        from .class_metrics import type_scores

        out["types"] = type_scores(s.types for s in images).to_dict()
    return out


def _pooled_detections(images: Sequence[ImageScores]) -> dict[Any, _ClassDetections]:
    use_scores = all(s.has_scores for s in images)
    classes: dict[Any, list[_ClassDetections]] = {}
    for s in images:
        for c, d in s.detections.items():
            classes.setdefault(c, []).append(d)
    return {c: _merge_detections(items, use_scores) for c, items in classes.items()}
