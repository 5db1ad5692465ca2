"""Keep instance ids (and so their colours) stable when a segmentation is redone.

A labels layer colours each nucleus by its id. When the post-processing runs again with
another threshold or another marker, most nuclei come out the same or almost the same,
but the watershed numbers them afresh, so every colour would change. :func:`carry_ids`
finds, for each new nucleus, the old one it matches (intersection over union above
``min_iou``) and gives it that nucleus' id; the other new nuclei get ids that no old
nucleus had. An IoU above 0.5 makes the match one-to-one: each of the two nuclei then
covers more than half of the other.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["carry_ids", "relabel"]

#: Above this many (new x old) id pairs, the overlap counts are sorted instead of binned.
_DENSE_PAIRS = 4_000_000


def _present(counts: np.ndarray) -> np.ndarray:
    """The non-zero ids whose pixel count is positive."""
    ids = np.flatnonzero(counts)
    return ids[ids > 0]


def _pair_counts(n_idx: np.ndarray, o_idx: np.ndarray, n_new: int, n_old: int):
    """(new index, old index, pixels) of every pair of overlapping nuclei."""
    code = n_idx * np.int64(n_old) + o_idx
    if code.size == 0:
        return code, code, code
    if n_new * n_old <= _DENSE_PAIRS:
        counts = np.bincount(code, minlength=n_new * n_old)
        code = np.flatnonzero(counts)
        counts = counts[code]
    else:
        code, counts = np.unique(code, return_counts=True)
    return code // n_old, code % n_old, counts


def carry_ids(
    old: np.ndarray,
    new: np.ndarray,
    fixed: Iterable[int] = (),
    min_iou: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """New ids for the nuclei of ``new`` so that those matching a nucleus of ``old`` keep its id.

    Parameters
    ----------
    old, new : ndarray of non-negative int
        The labels before and after the re-run, of the same shape (0 is background).
    fixed : iterable of int
        Ids of ``new`` that must not change (e.g. nuclei a user corrected); no other
        nucleus gets one of them.
    min_iou : float
        A new nucleus takes the id of the old nucleus it overlaps with an intersection
        over union above this (at least 0.5, which makes the match unique).

    Returns
    -------
    src, dst : ndarray of uint32
        Every id of ``new`` (increasing, fixed ones included) and the id it takes.
        Unmatched nuclei take the smallest ids used by no old nucleus, no fixed one and
        no match.

    Raises
    ------
    ValueError
        If the shapes differ or ``min_iou`` is below 0.5.
    """
    if old.shape != new.shape:
        raise ValueError(f"labels of shape {new.shape} cannot be matched to {old.shape}")
    if not 0.5 <= min_iou < 1.0:
        raise ValueError(f"min_iou must be in [0.5, 1), got {min_iou}")
    o, n = old.reshape(-1), new.reshape(-1)
    fg = (o != 0) | (n != 0)  # the pixels of some nucleus, old or new: a small part
    o, n = o[fg].astype(np.intp), n[fg].astype(np.intp)
    area_n, area_o = np.bincount(n), np.bincount(o)
    new_ids, old_ids = _present(area_n), _present(area_o)
    dst = new_ids.astype(np.int64)
    keep = np.isin(new_ids, np.fromiter(fixed, np.int64))
    matched = np.zeros(new_ids.size, bool)
    i, j, inter = _overlaps(n, o, new_ids, old_ids)
    union = area_n[new_ids[i]] + area_o[old_ids[j]] - inter
    hit = (inter > min_iou * union) & ~keep[i] & ~np.isin(old_ids[j], new_ids[keep])
    dst[i[hit]] = old_ids[j[hit]]
    matched[i[hit]] = True
    fresh = ~matched & ~keep
    taken = np.union1d(old_ids, dst[~fresh])
    pool = np.arange(1, taken.size + int(fresh.sum()) + 1, dtype=np.int64)
    dst[fresh] = np.setdiff1d(pool, taken, assume_unique=True)[: int(fresh.sum())]
    return new_ids.astype(np.uint32), dst.astype(np.uint32)


def _overlaps(n: np.ndarray, o: np.ndarray, new_ids: np.ndarray, old_ids: np.ndarray):
    """(index in ``new_ids``, index in ``old_ids``, pixels) of every overlapping pair."""
    both = (o != 0) & (n != 0)
    lut_n = np.zeros(int(new_ids.max(initial=0)) + 1, np.intp)
    lut_n[new_ids] = np.arange(new_ids.size)
    lut_o = np.zeros(int(old_ids.max(initial=0)) + 1, np.intp)
    lut_o[old_ids] = np.arange(old_ids.size)
    return _pair_counts(lut_n[n[both]], lut_o[o[both]], new_ids.size, old_ids.size)


def relabel(labels: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """``labels`` (uint32) with each id ``src[k]`` replaced by ``dst[k]``; others become 0.

    Parameters
    ----------
    labels : ndarray of non-negative int
        The labels to relabel (not changed).
    src, dst : ndarray of int
        Every non-zero id of ``labels`` and its new id.

    Returns
    -------
    ndarray of uint32
        A new array.
    """
    if src.size == 0:
        return labels.astype(np.uint32, copy=True)
    lut = np.zeros(int(src.max()) + 1, np.uint32)
    lut[src] = dst
    return lut[labels]
