"""A review queue that needs no ground truth, and what a reviewer has looked at.

:func:`review_scores` ranks predicted nuclei by how likely each is wrong, from what
the model and the post-processing already computed; :class:`Coverage` records which
parts of the image a reviewer has looked at, so a tile is known to be done.

Per nucleus, five cues, each turned into a score in [0, 1]:

``"tta"`` -- **TTA disagreement**: mean standard deviation of the nuclear
    probability across the four mirror passes (:attr:`Maps.tta_std
    <napari_medinst.model.inference.Maps.tta_std>`) over the nucleus and the ring of
    pixels around it, from 0 at ``SCALES["tta"][0]`` to 1 at ``SCALES["tta"][1]``.
    0 when the maps were computed without it.
``"prob"`` -- **low probability**: mean ``1 - prob`` inside the nucleus, from 0 at
    ``SCALES["prob"][0]`` to 1 at ``SCALES["prob"][1]``.
``"split"`` -- **weak boundary**: of the boundaries the nucleus shares with touching
    neighbours (at least :data:`MIN_SHARED` pixel pairs), the one with the lowest mean
    boundary energy; 1 at or below ``SCALES["split"][0]``, 0 at or above
    ``SCALES["split"][1]``. A cut where the HV maps and contour see no boundary
    suggests one nucleus split in two.
``"merge"`` -- **two basins inside**: the nucleus' pixels (less its outer pixel
    ring) whose boundary energy is below :data:`BASIN_ENERGY` -- stricter than the
    marker threshold -- form connected basins; the area of the second largest over
    that of the largest, from 0 at ``SCALES["merge"][0]`` to 1 at
    ``SCALES["merge"][1]``. Two clear low-energy centres separated by a ridge suggest
    two nuclei merged into one.
``"shape"`` -- **odd size/shape**: robust z-scores against this image's own nuclei
    (median and MAD) of log area (either way), eccentricity (high) and how well an
    ellipse with the same second moments is filled (low; a concave or dumbbell shape
    fills it less); the largest, from 0 at ``SCALES["shape"][0]`` to 1 at
    ``SCALES["shape"][1]``.

Each score rises linearly between its two :data:`SCALES`: for the default model on
the MoNuSeg *training* tiles (never the test split), the median of the raw value over
all predicted nuclei and its 95th percentile (5th and median for the boundary
energy), rounded. The **risk** is their weighted mean ``sum_k w_k s_k / sum_k w_k``
(:data:`WEIGHTS`, all 1), in [0, 1]. On those tiles the mean put more true errors in
the top 10 % of the queue than any cue alone and than a noisy-OR (which saturates:
too many nuclei reach 1 on some cue); ``benchmarks/bench_review.py`` prints each cue
alone and the queue without each. A cue is named as a **reason** when its weighted
score is at least :data:`REASON_MIN`, strongest first.

numpy / scipy only: nothing here imports napari or Qt.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ._io import check_labels
from .targets import hv_energy

__all__ = [
    "FEATURES",
    "REASONS",
    "SCALES",
    "WEIGHTS",
    "Coverage",
    "ReviewQueue",
    "combine",
    "review_scores",
]

#: The cues, in the order their columns appear in :attr:`ReviewQueue.features`.
FEATURES: tuple[str, ...] = ("tta", "prob", "split", "merge", "shape")

#: Text shown for each cue.
REASONS: dict[str, str] = {
    "tta": "TTA disagreement",
    "prob": "low probability",
    "split": "weak boundary",
    "merge": "boundary inside",
    "shape": "odd size/shape",
}

#: Raw values where each cue's score leaves 0 and reaches 1 (``"split"``: reaches 1 at
#: the first, 0 at the second: low energy is suspect).
SCALES: dict[str, tuple[float, float]] = {
    "tta": (0.04, 0.15),
    "prob": (0.16, 0.41),
    "split": (0.30, 0.67),
    "merge": (0.05, 0.3),
    "shape": (1.0, 9.0),
}

#: Weight of each cue in the risk (a weighted mean).
WEIGHTS: dict[str, float] = {"tta": 1.0, "prob": 1.0, "split": 1.0, "merge": 1.0, "shape": 1.0}

#: Least weighted score for a cue to be listed as a reason.
REASON_MIN = 0.5
#: Least number of touching pixel pairs for a shared boundary to count.
MIN_SHARED = 3
#: Boundary energy below which a pixel inside a nucleus belongs to a basin.
BASIN_ENERGY = 0.05
#: Sobel size and contour weight of the energy when the caller gives none.
_ENERGY_SOBEL, _ENERGY_CONTOUR = 5, 0.5


@dataclass(frozen=True, eq=False)
class ReviewQueue:
    """Predicted nuclei ordered by risk, most likely wrong first.

    Attributes
    ----------
    ids : ndarray of int64
        Nucleus ids in queue order.
    risk : ndarray of float64
        Risk in [0, 1] of each, aligned with ``ids`` (non-increasing).
    reasons : tuple of tuple of str
        The cues that raised each risk, strongest first (may be empty).
    features : dict of str to ndarray
        Score in [0, 1] of every cue of :data:`FEATURES`, aligned with ``ids``.
    centroids : ndarray, shape (n, 2)
        (row, col) centre of mass of each nucleus.
    boxes : ndarray of int64, shape (n, 4)
        ``(r0, r1, c0, c1)`` bounding box (end exclusive) of each nucleus.
    """

    ids: np.ndarray
    risk: np.ndarray
    reasons: tuple[tuple[str, ...], ...]
    features: dict[str, np.ndarray] = field(default_factory=dict)
    centroids: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))

    def __len__(self) -> int:
        return int(self.ids.size)

    @property
    def message(self) -> str:
        """One line for the user: how many nuclei are queued, or why none are."""
        if not len(self):
            return "No predicted nuclei: nothing to review."
        return f"{len(self)} nuclei queued, highest risk {self.risk[0]:.2f}."

    def position(self, nucleus_id: int) -> int | None:
        """Place of ``nucleus_id`` in the queue; None if it is not in it."""
        hit = np.flatnonzero(self.ids == int(nucleus_id))
        return int(hit[0]) if hit.size else None

    def row_text(self, k: int) -> str:
        """``"id 12 · 0.83 · low probability, weak boundary"`` for place ``k``."""
        why = ", ".join(self.reasons[k]) or "-"
        return f"id {int(self.ids[k])} · {self.risk[k]:.2f} · {why}"


# --------------------------------------------------------------------------- helpers


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted present ids and an int32 image of 1-based indices into them (0 = none)."""
    flat = labels.ravel()
    top = int(flat.max()) if flat.size else 0
    if top <= 4 * flat.size + 1024:
        present = np.bincount(flat.astype(np.intp, copy=False), minlength=top + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present).astype(np.int64)
        lut = np.zeros(top + 1, np.int32)
        lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
        return ids, lut[labels]
    ids, inverse = np.unique(labels, return_inverse=True)
    if ids.size and ids[0] == 0:
        return ids[1:].astype(np.int64), inverse.reshape(labels.shape).astype(np.int32)
    return ids.astype(np.int64), (inverse.reshape(labels.shape) + 1).astype(np.int32)


def _ramp(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """0 at ``lo``, 1 at ``hi``, linear between, clipped."""
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _mean_by(idx: np.ndarray, values: np.ndarray, n: int, where: np.ndarray) -> np.ndarray:
    """Mean of ``values`` per index 1..n over the pixels ``where`` (0 where none)."""
    at = idx[where]
    s = np.bincount(at, weights=values[where], minlength=n + 1)[1:]
    c = np.bincount(at, minlength=n + 1)[1:]
    return np.divide(s, c, out=np.zeros(n), where=c > 0)


def _ring(idx: np.ndarray) -> np.ndarray:
    """Each nucleus' pixels plus the background pixels touching it (largest index wins)."""
    grown = ndi.grey_dilation(idx, size=(3, 3), mode="nearest")
    return np.where(idx > 0, idx, grown)


def _moments(idx: np.ndarray, n: int):
    """Area, centroid and central second moments per index 1..n."""
    rows, cols = np.nonzero(idx)
    at = idx[rows, cols]
    area = np.bincount(at, minlength=n + 1)[1:].astype(np.float64)
    r = np.bincount(at, weights=rows, minlength=n + 1)[1:] / area
    c = np.bincount(at, weights=cols, minlength=n + 1)[1:] / area
    dr, dc = rows - r[at - 1], cols - c[at - 1]
    mrr = np.bincount(at, weights=dr * dr, minlength=n + 1)[1:] / area + 1 / 12
    mcc = np.bincount(at, weights=dc * dc, minlength=n + 1)[1:] / area + 1 / 12
    mrc = np.bincount(at, weights=dr * dc, minlength=n + 1)[1:] / area
    return area, np.stack([r, c], 1), (mrr, mcc, mrc)


def _robust_z(x: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD); zeros when the spread is nil."""
    med = np.median(x)
    mad = 1.4826 * np.median(np.abs(x - med))
    return (x - med) / mad if mad > 1e-9 else np.zeros_like(x)


def _shape_z(area: np.ndarray, moments) -> np.ndarray:
    """Largest of the size, eccentricity and ellipse-fill z-scores (see the module)."""
    mrr, mcc, mrc = moments
    half = (mrr + mcc) / 2
    root = np.sqrt(((mrr - mcc) / 2) ** 2 + mrc**2)
    l1, l2 = half + root, np.maximum(half - root, 1e-9)
    ecc = np.sqrt(1 - l2 / l1)
    fill = area / (4 * np.pi * np.sqrt(l1 * l2))  # the moment ellipse's area is 4 pi sqrt(l1 l2)
    return np.maximum.reduce([np.abs(_robust_z(np.log(area))), _robust_z(ecc), -_robust_z(fill)])


def _pairs(idx: np.ndarray, energy: np.ndarray) -> tuple[np.ndarray, ...]:
    """Touching pairs (a < b), their number of touching pixel pairs and summed energy."""
    keys, sums = [], []
    n1 = np.int64(idx.max()) + 1
    for a, b, ea, eb in (
        (idx[:, :-1], idx[:, 1:], energy[:, :-1], energy[:, 1:]),
        (idx[:-1], idx[1:], energy[:-1], energy[1:]),
    ):
        m = (a != b) & (a > 0) & (b > 0)
        lo, hi = np.minimum(a[m], b[m]), np.maximum(a[m], b[m])
        keys.append(lo.astype(np.int64) * n1 + hi)
        sums.append(np.maximum(ea[m], eb[m]))
    key = np.concatenate(keys)
    uniq, inv = np.unique(key, return_inverse=True)
    count = np.bincount(inv, minlength=uniq.size)
    total = np.bincount(inv, weights=np.concatenate(sums), minlength=uniq.size)
    return uniq // n1, uniq % n1, count, total


def _weakest_shared(idx: np.ndarray, energy: np.ndarray, n: int) -> np.ndarray:
    """Per index 1..n the lowest mean energy along a shared boundary (inf: none)."""
    out = np.full(n + 1, np.inf)
    a, b, count, total = _pairs(idx, energy)
    keep = count >= MIN_SHARED
    mean = total[keep] / count[keep]
    np.minimum.at(out, a[keep], mean)
    np.minimum.at(out, b[keep], mean)
    return out[1:]


def _interior(idx: np.ndarray, steps: int = 2) -> np.ndarray:
    """Pixels whose 4-neighbourhood, ``steps`` times over, is all the same nucleus."""
    inside = idx > 0
    for _ in range(steps):
        same = inside.copy()
        same[1:] &= inside[:-1] & (idx[1:] == idx[:-1])
        same[:-1] &= inside[1:] & (idx[:-1] == idx[1:])
        same[:, 1:] &= inside[:, :-1] & (idx[:, 1:] == idx[:, :-1])
        same[:, :-1] &= inside[:, 1:] & (idx[:, :-1] == idx[:, 1:])
        inside = same
    return inside


def _second_basin(idx: np.ndarray, energy: np.ndarray, n: int) -> np.ndarray:
    """Per index 1..n: area of the second largest low-energy basin over the largest."""
    comps, m = ndi.label(_interior(idx, 1) & (energy < BASIN_ENERGY))
    if m == 0:
        return np.zeros(n)
    size = np.bincount(comps.ravel(), minlength=m + 1)[1:]
    owner = np.zeros(m + 1, np.int64)
    owner[comps.ravel()] = idx.ravel()  # a basin lies inside one nucleus
    owner = owner[1:]
    order = np.lexsort((-size, owner))
    own, sz = owner[order], size[order]
    first = np.r_[True, own[1:] != own[:-1]]
    second = np.r_[False, ~first[1:] & first[:-1]]
    largest, runner_up = np.zeros(n + 1), np.zeros(n + 1)
    largest[own[first]] = sz[first]
    runner_up[own[second]] = sz[second]
    return (runner_up / np.maximum(largest, 1))[1:]


def _boxes(idx: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((n, 4), np.int64)
    for k, sl in enumerate(ndi.find_objects(idx, max_label=n)):
        if sl is not None:
            out[k] = (sl[0].start, sl[0].stop, sl[1].start, sl[1].stop)
    return out


# ---------------------------------------------------------------------------- queue


def _cue_scores(idx, n, prob, tta_std, energy) -> tuple[dict[str, np.ndarray], Any]:
    """Every cue's score per index 1..n, and the (area, centroids) on the way."""
    area, centroids, moments = _moments(idx, n)
    inside = idx > 0
    lo, hi = SCALES["prob"]
    scores = {"prob": _ramp(_mean_by(idx, 1.0 - prob, n, inside), lo, hi)}
    if tta_std is None:
        scores["tta"] = np.zeros(n)
    else:
        ring = _ring(idx)
        scores["tta"] = _ramp(_mean_by(ring, tta_std, n, ring > 0), *SCALES["tta"])
    weakest = _weakest_shared(idx, energy, n)
    lo, hi = SCALES["split"]
    scores["split"] = np.where(np.isfinite(weakest), _ramp(-weakest, -hi, -lo), 0.0)
    lo, hi = SCALES["merge"]
    scores["merge"] = _ramp(_second_basin(idx, energy, n), lo, hi)
    lo, hi = SCALES["shape"]
    scores["shape"] = _ramp(_shape_z(area, moments), lo, hi) if n >= 5 else np.zeros(n)
    return {k: scores[k] for k in FEATURES}, centroids


def combine(scores: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None):
    """Weighted mean ``sum_k w_k s_k / sum_k w_k`` of cue scores, in [0, 1].

    Parameters
    ----------
    scores : mapping of str to ndarray
        Score in [0, 1] of each cue (any subset of :data:`FEATURES`).
    weights : mapping of str to float, optional
        Non-negative weight of each cue; :data:`WEIGHTS` by default, 0 for a cue
        not named. Only the cues in ``scores`` count.

    Raises
    ------
    ValueError
        If a weight is negative or the weights of the given cues are all 0.
    """
    weights = WEIGHTS if weights is None else weights
    w = {name: float(weights.get(name, 0.0)) for name in scores}
    if any(not v >= 0 for v in w.values()) or sum(w.values()) <= 0:
        raise ValueError(f"weights must be >= 0 and not all 0, got {w}")
    total = sum(w[name] * np.asarray(s, np.float64) for name, s in scores.items())
    return total / sum(w.values())


def _energy_of(maps: Any, energy: np.ndarray | None) -> np.ndarray:
    if energy is not None:
        return np.asarray(energy, np.float32)
    contour = getattr(maps, "contour", None)
    return hv_energy(np.asarray(maps.hv, np.float32), _ENERGY_SOBEL, contour, _ENERGY_CONTOUR)


def review_scores(
    labels: np.ndarray,
    maps: Any,
    *,
    energy: np.ndarray | None = None,
    weights: Mapping[str, float] | None = None,
) -> ReviewQueue:
    """Order the predicted nuclei by how likely each is wrong (see the module for the cues).

    Parameters
    ----------
    labels : (H, W) int array
        Predicted instances (0 = background; any ids, gaps allowed). Not modified.
    maps : Maps
        The network's maps at the labels' resolution: ``prob``, ``hv``, ``contour``
        and, when computed with ``tta_std=True``, ``tta_std``.
    energy : (H, W) array, optional
        Boundary energy the post-processing used (``PostprocessResult.energy``);
        computed from ``maps`` (Sobel size 5, contour weight 0.5) when omitted.
    weights : mapping of str to float, optional
        Weight of each cue in the noisy-OR; :data:`WEIGHTS` by default.

    Returns
    -------
    ReviewQueue
        Empty (``len == 0``, with a :attr:`~ReviewQueue.message`) when there is no
        nucleus; ties are ordered by id.

    Raises
    ------
    ValueError
        If the labels are not a 2-D label image or the maps' shape differs.
    """
    labels = check_labels(labels, "labels")
    prob = np.asarray(maps.prob, np.float32)
    if prob.shape != labels.shape:
        raise ValueError(f"labels of shape {labels.shape} do not match maps of shape {prob.shape}")
    ids, idx = _compact(labels)
    n = int(ids.size)
    if n == 0:
        return ReviewQueue(
            ids=ids, risk=np.zeros(0), reasons=(), features={k: np.zeros(0) for k in FEATURES}
        )
    tta_std = getattr(maps, "tta_std", None)
    scores, centroids = _cue_scores(idx, n, prob, tta_std, _energy_of(maps, energy))
    weights = dict(WEIGHTS if weights is None else weights)
    if tta_std is None:  # no disagreement map: that cue is left out, not counted as 0
        weights["tta"] = 0.0
    risk = combine(scores, weights)
    order = np.lexsort((ids, -risk))
    weighted = np.stack([float(weights.get(k, 0.0)) * scores[k] for k in FEATURES], 1)
    reasons = tuple(
        tuple(REASONS[FEATURES[j]] for j in np.argsort(-row, kind="stable") if row[j] >= REASON_MIN)
        for row in weighted[order]
    )
    return ReviewQueue(
        ids=ids[order],
        risk=risk[order],
        reasons=reasons,
        features={k: v[order] for k, v in scores.items()},
        centroids=centroids[order],
        boxes=_boxes(idx, n)[order],
    )


# ------------------------------------------------------------------------- coverage


class Coverage:
    """Which parts of an image a reviewer has looked at.

    Parameters
    ----------
    labels : (H, W) int array
        The instances under review; fractions are of their foreground and nuclei.

    Attributes
    ----------
    viewed : (H, W) bool ndarray
        Pixels inside any box looked at so far.
    boxes : list of tuple
        ``(r0, r1, c0, c1)`` of each box added (clipped to the image), in order.
    """

    #: Share of a nucleus' pixels that must have been seen for it to count as reviewed.
    NUCLEUS_SEEN = 0.5

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = check_labels(labels, "labels")
        self.viewed = np.zeros(self.labels.shape, bool)
        self.boxes: list[tuple[int, int, int, int]] = []
        self._ids, self._idx = _compact(self.labels)
        self._areas = np.bincount(self._idx.ravel(), minlength=self._ids.size + 1)[1:]

    def add_box(self, r0: float, r1: float, c0: float, c1: float) -> bool:
        """Mark the box rows ``r0:r1``, columns ``c0:c1`` (clipped) as seen.

        Returns
        -------
        bool
            Whether it added any pixel not seen before.
        """
        h, w = self.labels.shape
        r0, r1 = int(max(np.floor(r0), 0)), int(min(np.ceil(r1), h))
        c0, c1 = int(max(np.floor(c0), 0)), int(min(np.ceil(c1), w))
        if r1 <= r0 or c1 <= c0:
            return False
        win = self.viewed[r0:r1, c0:c1]
        new = not bool(win.all())
        win[...] = True
        self.boxes.append((r0, r1, c0, c1))
        return new

    @property
    def area_fraction(self) -> float:
        """Share of the foreground pixels seen (1.0 when there is no foreground)."""
        fg = self._idx > 0
        total = int(np.count_nonzero(fg))
        return 1.0 if total == 0 else int(np.count_nonzero(fg & self.viewed)) / total

    @property
    def nucleus_fraction(self) -> float:
        """Share of the nuclei at least :attr:`NUCLEUS_SEEN` seen (1.0 when none)."""
        n = int(self._ids.size)
        if n == 0:
            return 1.0
        seen = np.bincount(self._idx[self.viewed], minlength=n + 1)[1:]
        return float(np.count_nonzero(seen >= self.NUCLEUS_SEEN * self._areas)) / n

    def seen_ids(self) -> np.ndarray:
        """Ids of the nuclei counted as reviewed."""
        n = int(self._ids.size)
        seen = np.bincount(self._idx[self.viewed], minlength=n + 1)[1:]
        return self._ids[(seen >= self.NUCLEUS_SEEN * self._areas) & (self._areas > 0)]
