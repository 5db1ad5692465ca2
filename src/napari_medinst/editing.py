"""Editing nucleus label images: pure functions for ground-truth correction.

Every operation takes a 2-D instance label image (0 = background) and returns an
:class:`Edit`: the *new* image (the input is never modified) together with exactly
which pixels changed, their bounding box and the ids involved.  A GUI writes an edit
as one undoable step by setting only ``edit.indices`` to ``edit.values``.

Also here:

* the per-nucleus review status (``predicted`` / ``edited`` / ``verified``) and its
  CSV form (:func:`update_status`, :func:`status_columns`, :func:`status_to_csv`,
  :func:`status_from_csv`);
* :func:`outcome_image`, which paints each nucleus with its evaluation outcome
  (tp / fp / fn / split / merge) for the error overlay;
* :func:`rank_errors`, which orders the errors by how much fixing each one would
  raise a chosen metric (see its docstring for the estimate).

numpy / scipy / scikit-image only: nothing here imports napari or Qt.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import line as draw_line
from skimage.measure import label as label_components
from skimage.segmentation import watershed

from ._io import InputError, check_labels
from .metrics import (
    CATEGORIES,
    InstanceOutcomes,
    OverlapTable,
    aji_picks,
    pq_from_counts,
    safe_ratio,
)
from .targets import relabel_sequential as _relabel_sequential

__all__ = [
    "ERROR_KINDS",
    "OUTCOME_CODES",
    "RANK_METRICS",
    "STATUSES",
    "Edit",
    "ErrorItem",
    "delete",
    "delete_at",
    "error_bbox",
    "fill_holes",
    "join_along",
    "label_at",
    "largest_part",
    "merge",
    "next_free_id",
    "outcome_image",
    "present_ids",
    "rank_errors",
    "relabel_sequential",
    "remove_small",
    "split_by_line",
    "split_by_seeds",
    "status_columns",
    "status_from_csv",
    "status_to_csv",
    "update_status",
]

#: Review status of a ground-truth nucleus, in the order of the workflow.
STATUSES: tuple[str, ...] = ("predicted", "edited", "verified")

#: Pixel value of each outcome in :func:`outcome_image` (0 = no nucleus).
OUTCOME_CODES: dict[str, int] = {name: k for k, name in enumerate(CATEGORIES, start=1)}

#: The kinds of error listed by :func:`rank_errors`.
ERROR_KINDS: tuple[str, ...] = ("fp", "fn", "split", "merge")

#: Metrics :func:`rank_errors` can estimate the gain of.
RANK_METRICS: tuple[str, ...] = ("aji", "pq", "accuracy", "f1")


# ------------------------------------------------------------------------------ edits


@dataclass(frozen=True, eq=False)
class Edit:
    """The result of one editing operation.

    Attributes
    ----------
    labels : ndarray
        The edited label image (a new array, same shape and dtype as the input).
    indices : tuple of ndarray
        ``(rows, cols)`` of every pixel whose value changed (empty when nothing did).
    values : ndarray
        The new value of each of those pixels.
    region : tuple of slice or None
        Bounding box of the changed pixels; None when nothing changed.
    changed_ids : tuple of int
        Every non-zero id whose pixels changed (before or after the edit), sorted.
    new_ids : tuple of int
        Ids present after the edit but not before.
    removed_ids : tuple of int
        Ids present before the edit but not after.
    mapping : dict
        For :func:`relabel_sequential`: old id -> new id of every nucleus; empty otherwise.
    """

    labels: np.ndarray
    indices: tuple[np.ndarray, np.ndarray]
    values: np.ndarray
    region: tuple[slice, slice] | None
    changed_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    removed_ids: tuple[int, ...]
    mapping: dict[int, int] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        """Whether any pixel changed."""
        return self.region is not None

    @property
    def n_pixels(self) -> int:
        """Number of changed pixels."""
        return int(self.values.size)


def _as_labels(labels: np.ndarray) -> np.ndarray:
    """Validated 2-D label array (bool and whole-number floats are converted)."""
    return check_labels(labels)


def _make_edit(
    old: np.ndarray,
    new: np.ndarray,
    box: tuple[slice, slice] | None = None,
    mapping: dict[int, int] | None = None,
) -> Edit:
    """Describe the difference ``old -> new``; ``box`` bounds where it may differ."""
    if box is None:
        box = (slice(0, old.shape[0]), slice(0, old.shape[1]))
    diff = old[box] != new[box]
    rows, cols = np.nonzero(diff)
    rows = rows + (box[0].start or 0)
    cols = cols + (box[1].start or 0)
    values = new[rows, cols]
    if rows.size == 0:
        empty = np.zeros(0, np.intp)
        return Edit(new, (empty, empty.copy()), values, None, (), (), (), mapping or {})
    before = old[rows, cols]
    region = (
        slice(int(rows.min()), int(rows.max()) + 1),
        slice(int(cols.min()), int(cols.max()) + 1),
    )
    touched = np.union1d(before, values)
    touched = touched[touched != 0]
    # pixel counts of the touched ids before (one pass over ``old``) and after (by delta)
    count_old = _counts_of(old, touched)
    lost = np.searchsorted(touched, before[before != 0])
    gained = np.searchsorted(touched, values[values != 0])
    count_new = (
        count_old
        - np.bincount(lost, minlength=touched.size)
        + np.bincount(gained, minlength=touched.size)
    )
    return Edit(
        labels=new,
        indices=(rows, cols),
        values=values,
        region=region,
        changed_ids=tuple(int(i) for i in touched),
        new_ids=tuple(int(i) for i in touched[(count_new > 0) & (count_old == 0)]),
        removed_ids=tuple(int(i) for i in touched[(count_old > 0) & (count_new == 0)]),
        mapping=mapping or {},
    )


def _counts_of(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Pixel count of each of the sorted non-zero ``ids`` in ``labels``."""
    if ids.size == 0:
        return np.zeros(0, np.int64)
    flat = labels.ravel()
    top = int(ids[-1])
    if top <= 4 * flat.size + 1024:
        counts = np.bincount(flat.astype(np.intp, copy=False), minlength=top + 1)
        return counts[ids.astype(np.intp)].astype(np.int64)
    pos = np.searchsorted(ids, flat)
    hit = (pos < ids.size) & (ids[np.minimum(pos, ids.size - 1)] == flat)
    return np.bincount(pos[hit], minlength=ids.size).astype(np.int64)


def present_ids(labels: np.ndarray) -> np.ndarray:
    """Sorted non-zero ids present in ``labels`` (int64, or the image's dtype if huge)."""
    flat = np.asarray(labels).ravel()
    if flat.size == 0:
        return np.zeros(0, np.int64)
    top = int(flat.max())
    if top <= 0:
        return np.zeros(0, np.int64)
    if top <= 4 * flat.size + 1024 and int(flat.min()) >= 0:
        counts = np.bincount(flat.astype(np.intp, copy=False), minlength=top + 1)
        return np.flatnonzero(counts[1:]).astype(np.int64) + 1
    ids = np.unique(flat)
    return ids[ids > 0]


def largest_part(mask: np.ndarray) -> np.ndarray:
    """The largest connected part of ``mask`` (the first one on a tie; ``mask`` itself
    when it has at most one part)."""
    parts, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(parts.ravel())
    sizes[0] = 0
    return parts == int(np.argmax(sizes))


def next_free_id(labels: np.ndarray) -> int:
    """The smallest id above every id in use (1 for an empty image)."""
    arr = np.asarray(labels)
    return int(arr.max()) + 1 if arr.size else 1


def _point(labels: np.ndarray, point: Sequence[float]) -> tuple[int, int]:
    p = np.round(np.asarray(point, np.float64).reshape(-1)[-2:]).astype(np.int64)
    r, c = int(p[0]), int(p[1])
    if not (0 <= r < labels.shape[0] and 0 <= c < labels.shape[1]):
        raise ValueError(f"point ({r}, {c}) lies outside the image of shape {labels.shape}")
    return r, c


def label_at(labels: np.ndarray, point: Sequence[float]) -> int:
    """Id under ``point`` (row, col; rounded to the nearest pixel); 0 on background."""
    arr = np.asarray(labels)
    r, c = _point(arr, point)
    return int(arr[r, c])


def _bbox(mask: np.ndarray, pad: int = 0) -> tuple[slice, slice] | None:
    rows = np.flatnonzero(mask.any(1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(0))
    return (
        slice(max(int(rows[0]) - pad, 0), min(int(rows[-1]) + 1 + pad, mask.shape[0])),
        slice(max(int(cols[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, mask.shape[1])),
    )


def _id_box(labels: np.ndarray, ids: Iterable[int], pad: int = 0) -> tuple[slice, slice] | None:
    """Bounding box (padded, clipped) of all pixels of ``ids``."""
    return _bbox(np.isin(labels, np.fromiter(ids, np.int64)), pad)


def delete(labels: np.ndarray, ids: Iterable[int]) -> Edit:
    """Set every pixel of ``ids`` to background."""
    old = _as_labels(labels)
    ids = [int(i) for i in ids if int(i) != 0]
    new = old.copy()
    box = _id_box(old, ids) if ids else None
    if box is None:
        return _make_edit(old, new, (slice(0, 0), slice(0, 0)))
    win = new[box]
    win[np.isin(win, ids)] = 0
    return _make_edit(old, new, box)


def delete_at(labels: np.ndarray, point: Sequence[float]) -> Edit:
    """Delete the nucleus under ``point`` (row, col); no change on background."""
    old = _as_labels(labels)
    target = label_at(old, point)
    return delete(old, [target] if target else [])


def merge(labels: np.ndarray, ids: Iterable[int], target: int | None = None) -> Edit:
    """Give all of ``ids`` one id: ``target``, by default the smallest of them.

    Raises
    ------
    ValueError
        If fewer than two distinct nuclei present in the image are given.
    """
    old = _as_labels(labels)
    wanted = sorted({int(i) for i in ids} - {0})
    present = present_ids(old)
    ids = [i for i in wanted if i in set(present.tolist())]
    if len(ids) < 2:
        raise ValueError(f"select at least two nuclei to merge (got {len(ids)})")
    target = ids[0] if target is None else int(target)
    if target <= 0:
        raise ValueError(f"the merged nucleus needs a positive id, got {target}")
    new = old.copy()
    box = _id_box(old, ids)
    win = new[box]
    win[np.isin(win, ids)] = target
    return _make_edit(old, new, box)


def join_along(labels: np.ndarray, line_points: Sequence[Sequence[float]]) -> Edit:
    """Join every nucleus a drawn stroke touches into one (the inverse of a cut line).

    The nuclei under the polyline (row, col vertices) take the smallest of their ids;
    background pixels closing a gap of one or two pixels between them join too (only
    where both sides are the joined nuclei, never another nucleus' pixels), so the
    result is one piece when the parts were separated by a thin line.

    Raises
    ------
    ValueError
        If the stroke touches fewer than two nuclei.
    """
    old = _as_labels(labels)
    path = _rasterise(np.asarray(line_points, np.float64), old.shape)
    ids = sorted({int(i) for i in np.unique(old[path])} - {0})
    if len(ids) < 2:
        raise ValueError(f"draw the stroke across the pieces to join (it touches {len(ids)})")
    box = _id_box(old, ids, pad=2)
    new = old.copy()
    win = new[box]
    union = np.isin(win, ids)
    closed = ndi.binary_closing(union, structure=np.ones((3, 3), bool), iterations=1)
    win[union | (closed & (win == 0))] = ids[0]
    return _make_edit(old, new, box)


def _new_ids(labels: np.ndarray, n: int) -> list[int]:
    start = next_free_id(labels)
    if start + n - 1 > np.iinfo(labels.dtype).max:
        raise ValueError(f"no free id left in a {labels.dtype} label image")
    return list(range(start, start + n))


def split_by_seeds(labels: np.ndarray, seeds: Sequence[Sequence[float]]) -> Edit:
    """Split the nucleus containing the seed points, one piece per seed.

    The nucleus is flooded from the seeds over its inverted distance transform
    (marker-controlled watershed), so the cuts fall on the necks between the seeds.
    The first seed's piece keeps the id; the others get new ids.

    Parameters
    ----------
    seeds : sequence of (row, col)
        At least two distinct pixels of one and the same nucleus.

    Raises
    ------
    ValueError
        If fewer than two distinct seeds are given, a seed lies on the background or
        outside the image, or the seeds lie in different nuclei.
    """
    old = _as_labels(labels)
    pts = [_point(old, s) for s in seeds]
    if len(set(pts)) < 2:
        raise ValueError("place two different seed points inside the nucleus to split")
    ids = {int(old[p]) for p in pts}
    if 0 in ids:
        raise ValueError("a seed point lies on the background; place both inside the nucleus")
    if len(ids) > 1:
        raise ValueError(
            f"the seed points lie in different nuclei ({', '.join(map(str, sorted(ids)))})"
        )
    target = ids.pop()
    box = _id_box(old, [target], pad=1)
    assert box is not None
    mask = old[box] == target
    markers = np.zeros(mask.shape, np.int32)
    r0, c0 = box[0].start, box[1].start
    for k, (r, c) in enumerate(pts, start=1):
        markers[r - r0, c - c0] = k
    dist = ndi.distance_transform_edt(mask)
    pieces = watershed(-dist, markers, mask=mask)
    new = old.copy()
    win = new[box]
    fresh = _new_ids(old, len(pts) - 1)
    for k, new_id in enumerate(fresh, start=2):
        win[pieces == k] = new_id
    return _make_edit(old, new, box)


def _rasterise(line_points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """8-connected pixel polyline through ``line_points`` (row, col), clipped to ``shape``."""
    pts = np.round(np.asarray(line_points, np.float64).reshape(-1, 2)).astype(np.int64)
    out = np.zeros(shape, bool)
    for (r0, c0), (r1, c1) in pairwise(pts):
        rr, cc = draw_line(int(r0), int(c0), int(r1), int(c1))
        keep = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
        out[rr[keep], cc[keep]] = True
    if len(pts) == 1:
        r, c = pts[0]
        if 0 <= r < shape[0] and 0 <= c < shape[1]:
            out[r, c] = True
    return out


def split_by_line(
    labels: np.ndarray, line_points: Sequence[Sequence[float]], *, min_piece: int = 3
) -> Edit:
    """Cut every nucleus that a drawn polyline crosses completely, and relabel the pieces.

    The polyline (vertices as row, col) is rasterised as an 8-connected pixel line,
    which separates the 4-connected pixels on its two sides.  Each nucleus the line
    cuts into two or more pieces of at least ``min_piece`` pixels is split: its largest
    piece keeps the id, the others get new ids, and the pixels on the line (and
    slivers smaller than ``min_piece``) join the nearest piece.  A nucleus the line
    only grazes is left unchanged.

    Raises
    ------
    ValueError
        If fewer than two vertices are given.
    """
    old = _as_labels(labels)
    pts = np.asarray(line_points, np.float64).reshape(-1, 2)
    if len(pts) < 2:
        raise ValueError("draw a line with at least two points to cut a nucleus")
    cut = _rasterise(pts, old.shape)
    crossed = np.unique(old[cut])
    crossed = crossed[crossed != 0]
    new = old.copy()
    next_id = next_free_id(old)
    boxes = []
    for target in crossed:
        box = _id_box(old, [int(target)])
        mask = old[box] == target
        pieces, n = ndi.label(mask & ~cut[box])
        if n < 2:
            continue
        sizes = np.bincount(pieces.ravel(), minlength=n + 1)
        sizes[0] = 0
        kept = np.flatnonzero(sizes >= max(min_piece, 1))
        if kept.size < 2:
            continue
        # every pixel of the nucleus joins its nearest kept piece
        keep_mask = np.isin(pieces, kept)
        _, (ir, ic) = ndi.distance_transform_edt(~keep_mask, return_indices=True)
        owner = pieces[ir, ic]
        owner[~mask] = 0
        largest = kept[np.argmax(sizes[kept])]
        win = new[box]
        for piece in kept:
            if piece == largest:
                continue
            if next_id > np.iinfo(old.dtype).max:
                raise ValueError(f"no free id left in a {old.dtype} label image")
            win[owner == piece] = next_id
            next_id += 1
        boxes.append(box)
    if not boxes:
        return _make_edit(old, new, (slice(0, 0), slice(0, 0)))
    union = (
        slice(min(b[0].start for b in boxes), max(b[0].stop for b in boxes)),
        slice(min(b[1].start for b in boxes), max(b[1].stop for b in boxes)),
    )
    return _make_edit(old, new, union)


_CROSS = ((0, 1), (1, 0), (0, -1), (-1, 0))


def fill_holes(labels: np.ndarray, max_size: int | None = None) -> Edit:
    """Fill the holes of every nucleus.

    A hole is a 4-connected background region that does not touch the image border
    and whose neighbouring pixels all belong to one single nucleus; it is filled
    with that nucleus' id.  A gap enclosed by two or more touching nuclei is not a
    hole of either and stays background.  With ``max_size``, larger holes are kept.
    """
    old = _as_labels(labels)
    bg, n = ndi.label(old == 0)
    new = old.copy()
    if n == 0:
        return _make_edit(old, new, (slice(0, 0), slice(0, 0)))
    border = np.unique(np.concatenate((bg[0], bg[-1], bg[:, 0], bg[:, -1])))
    inner = np.ones(n + 1, bool)
    inner[border] = False
    inner[0] = False
    if max_size is not None:
        inner &= np.bincount(bg.ravel(), minlength=n + 1) <= max_size
    if not inner.any():
        return _make_edit(old, new, (slice(0, 0), slice(0, 0)))
    comps, neighbours = [], []
    h, w = old.shape
    for dr, dc in _CROSS:
        src = (slice(max(-dr, 0), h - max(dr, 0)), slice(max(-dc, 0), w - max(dc, 0)))
        dst = (slice(max(dr, 0), h - max(-dr, 0)), slice(max(dc, 0), w - max(-dc, 0)))
        comp, lab = bg[src], old[dst]
        at = inner[comp] & (lab != 0)
        comps.append(comp[at])
        neighbours.append(lab[at])
    comp = np.concatenate(comps).astype(np.int64)
    lab = np.concatenate(neighbours).astype(np.int64)
    pairs = np.unique(np.stack((comp, lab)), axis=1)
    n_owner = np.bincount(pairs[0], minlength=n + 1)
    single = np.flatnonzero((n_owner == 1) & inner)
    if single.size == 0:
        return _make_edit(old, new, (slice(0, 0), slice(0, 0)))
    owner_of = np.zeros(n + 1, old.dtype)
    sel = np.isin(pairs[0], single)
    owner_of[pairs[0][sel]] = pairs[1][sel].astype(old.dtype)
    holes = owner_of[bg]
    fill = holes != 0
    new[fill] = holes[fill]
    return _make_edit(old, new, _bbox(fill))


def remove_small(labels: np.ndarray, min_size: int) -> Edit:
    """Remove every connected piece of a nucleus smaller than ``min_size`` pixels.

    Pieces are 8-connected regions of one id, so this removes small nuclei as well as
    stray fragments of larger ones (e.g. left behind by painting), while the main
    body of a nucleus of at least ``min_size`` pixels is kept.
    """
    if min_size < 0:
        raise ValueError(f"minimum size must be >= 0, got {min_size}")
    old = _as_labels(labels)
    new = old.copy()
    if min_size <= 1 or not old.any():
        return _make_edit(old, new, (slice(0, 0), slice(0, 0)))
    pieces = label_components(old, background=0, connectivity=2)
    sizes = np.bincount(pieces.ravel())
    small = sizes < min_size
    small[0] = False
    drop = small[pieces]
    new[drop] = 0
    return _make_edit(old, new, _bbox(drop))


def relabel_sequential(labels: np.ndarray) -> Edit:
    """Renumber the nuclei 1..N in the order of their old ids (dtype kept).

    ``Edit.mapping`` maps every old id to its new id.
    """
    old = _as_labels(labels)
    seq, old_ids = _relabel_sequential(old)
    if old_ids.size and int(old_ids.size) > np.iinfo(old.dtype).max:
        raise ValueError(f"{old_ids.size} nuclei do not fit in a {old.dtype} label image")
    new = seq.astype(old.dtype, copy=False)
    mapping = {int(o): k for k, o in enumerate(old_ids.tolist(), start=1)}
    return _make_edit(old, new, mapping=mapping)


# ----------------------------------------------------------------------------- status


def update_status(
    status: Mapping[int, str],
    ids: Iterable[int],
    *,
    edited: Iterable[int] = (),
    default: str = "predicted",
) -> dict[int, str]:
    """Status of every nucleus in ``ids``, after the nuclei in ``edited`` changed.

    Known ids keep their status from ``status``; unknown ids get ``default``; ids in
    ``edited`` become ``"edited"`` (a verified nucleus that is changed again must be
    verified again).  Ids not in ``ids`` are dropped.
    """
    if default not in STATUSES:
        raise ValueError(f"unknown status {default!r}; expected one of {STATUSES}")
    edited = {int(i) for i in edited}
    out = {}
    for i in ids:
        i = int(i)
        if i == 0:
            continue
        out[i] = "edited" if i in edited else str(status.get(i, default))
    return out


def status_columns(status: Mapping[int, str]) -> dict[str, np.ndarray]:
    """Columns ``index``, ``label`` (both the nucleus id) and ``status``, sorted by id."""
    ids = np.array(sorted(int(i) for i in status), np.int64)
    return {
        "index": ids,
        "label": ids.copy(),
        "status": np.array([status[int(i)] for i in ids], dtype=object),
    }


def status_to_csv(status: Mapping[int, str]) -> str:
    """CSV text with the header ``label,status`` and one row per nucleus, by id."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["label", "status"])
    for i in sorted(int(k) for k in status):
        writer.writerow([i, status[i]])
    return buf.getvalue()


def status_from_csv(text: str, name: str = "status table") -> dict[int, str]:
    """Parse :func:`status_to_csv` output.

    Raises
    ------
    InputError
        If the header lacks ``label`` / ``status``, an id is not a positive integer,
        or a status is unknown.
    """
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not {"label", "status"} <= set(reader.fieldnames):
        raise InputError(f"{name}: expected the columns 'label' and 'status'")
    out: dict[int, str] = {}
    for line, row in enumerate(reader, start=2):
        try:
            i = int(str(row["label"]).strip())
        except ValueError:
            msg = f"{name}, line {line}: label {row['label']!r} is not an integer"
            raise InputError(msg) from None
        s = str(row["status"]).strip()
        if i <= 0:
            raise InputError(f"{name}, line {line}: label must be positive, got {i}")
        if s not in STATUSES:
            raise InputError(
                f"{name}, line {line}: unknown status {s!r}; expected one of {', '.join(STATUSES)}"
            )
        out[i] = s
    return out


# -------------------------------------------------------------------------- outcomes


def _lookup(labels: np.ndarray, ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values[k]`` where ``labels == ids[k]``, 0 elsewhere (ids sorted)."""
    out_dtype = values.dtype
    if ids.size == 0 or labels.size == 0:
        return np.zeros(labels.shape, out_dtype)
    top = int(labels.max())
    if top <= 4 * labels.size + 1024:
        lut = np.zeros(top + 1, out_dtype)
        keep = ids <= top
        lut[ids[keep].astype(np.intp)] = values[keep]
        return lut[labels]
    pos = np.clip(np.searchsorted(ids, labels), 0, ids.size - 1)
    return np.where(ids[pos] == labels, values[pos], 0).astype(out_dtype)


def outcome_image(gt: np.ndarray, pred: np.ndarray, outcomes: InstanceOutcomes) -> np.ndarray:
    """Paint each nucleus with its outcome code (:data:`OUTCOME_CODES`), uint8.

    Ground-truth nuclei are painted with their own category (tp, fn, split, merge);
    then merged predictions, then false-positive predictions on top, so that a false
    positive lying on a ground-truth nucleus stays visible.  0 where there is nothing.
    """
    gt = check_labels(gt, "gt")
    pred = check_labels(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred shapes differ: gt {gt.shape}, pred {pred.shape}")
    names = np.array(sorted(OUTCOME_CODES), dtype="<U5")
    name_codes = np.array([OUTCOME_CODES[n] for n in names], np.uint8)

    def to_codes(categories: np.ndarray) -> np.ndarray:
        if categories.size == 0:
            return np.zeros(0, np.uint8)
        return name_codes[np.searchsorted(names, categories)]

    out = _lookup(gt, np.asarray(outcomes.gt_ids), to_codes(np.asarray(outcomes.gt_category)))
    p_codes = to_codes(np.asarray(outcomes.pred_category))
    for kind in ("merge", "fp"):
        keep = p_codes == OUTCOME_CODES[kind]
        if keep.any():
            painted = _lookup(pred, np.asarray(outcomes.pred_ids)[keep], p_codes[keep])
            np.copyto(out, painted, where=painted != 0)
    return out


@dataclass(frozen=True)
class ErrorItem:
    """One error to review: what it is, the nuclei involved and the estimated gain.

    ``gt_ids`` / ``pred_ids`` are the ground-truth and predicted nuclei involved (a
    split lists the gt nucleus and its pieces; a merge the prediction and the gt
    nuclei it covers); ``gain`` is the estimated rise of the ranking metric when the
    error is fixed; ``area`` the pixel count of the nuclei involved.
    """

    kind: str
    gt_ids: tuple[int, ...]
    pred_ids: tuple[int, ...]
    gain: float
    area: int

    @property
    def label(self) -> str:
        """Short text such as ``"FP pred 12"`` or ``"split gt 4 (3 pieces)"``."""
        if self.kind == "fp":
            return f"FP pred {self.pred_ids[0]}"
        if self.kind == "fn":
            return f"FN gt {self.gt_ids[0]}"
        if self.kind == "split":
            return f"split gt {self.gt_ids[0]} ({len(self.pred_ids)} pieces)"
        return f"merge pred {self.pred_ids[0]} ({len(self.gt_ids)} nuclei)"


def _count_score(metric: str, tp: int, fp: int, fn: int, iou_sum: float) -> float:
    """Accuracy, F1 or PQ from counts, with the conventions of :mod:`metrics`."""
    if metric == "accuracy":
        return safe_ratio(tp, tp + fp + fn)
    if metric == "f1":
        return safe_ratio(2 * tp, 2 * tp + fp + fn)
    return pq_from_counts(tp, fp, fn, iou_sum)[0]


class _Counts:
    """Count-based scores (PQ, accuracy, F1) under a fixed one-to-one matching."""

    def __init__(self, metric: str, table: OverlapTable, outcomes: InstanceOutcomes) -> None:
        self.metric = metric
        if metric == "pq":
            sel = table.pair_iou > 0.5
            g, p, iou = table.pair_gt_index[sel], table.pair_pred_index[sel], table.pair_iou[sel]
        else:
            g = np.flatnonzero(outcomes.gt_partner != 0)
            p = np.searchsorted(table.pred_ids, outcomes.gt_partner[g])
            iou = outcomes.gt_iou[g]
        self.g_partner = dict(zip(g.tolist(), p.tolist(), strict=True))
        self.p_partner = dict(zip(p.tolist(), g.tolist(), strict=True))
        self.iou = dict(zip(g.tolist(), iou.tolist(), strict=True))
        self.tp = len(self.g_partner)
        self.fp = table.n_pred - self.tp
        self.fn = table.n_gt - self.tp
        self.iou_sum = float(iou.sum())
        self.base = _count_score(metric, self.tp, self.fp, self.fn, self.iou_sum)

    def gain(self, gts: Iterable[int], preds: Iterable[int]) -> float:
        """Score rise when predictions ``preds`` are removed and the gt nuclei ``gts``
        (indices) get a perfect prediction each."""
        tp, fp, fn, iou = self.tp, self.fp, self.fn, self.iou_sum
        gts, preds = set(gts), set(preds)
        for p in preds:
            g = self.p_partner.get(p)
            if g is None:
                fp -= 1
            else:  # its gt partner loses the match
                tp, fn, iou = tp - 1, fn + 1, iou - self.iou[g]
        for g in gts:
            p = self.g_partner.get(g)
            if p is not None and p not in preds:  # replaced: the old partner is left as FP
                tp, fn, fp, iou = tp - 1, fn + 1, fp + 1, iou - self.iou[g]
            tp, fn, iou = tp + 1, fn - 1, iou + 1.0  # now unmatched: give it a perfect match
        return _count_score(self.metric, tp, fp, fn, iou) - self.base


class _Aji:
    """AJI sums with each gt nucleus' pick (see metrics.aggregated_jaccard)."""

    def __init__(self, table: OverlapTable) -> None:
        g, p = table.pair_gt_index, table.pair_pred_index
        first = aji_picks(table)
        self.gt_areas = table.gt_areas
        self.pred_areas = table.pred_areas
        self.pick = np.full(table.n_gt, -1, np.intp)
        self.pick[g[first]] = p[first]
        self.c = np.zeros(table.n_gt, np.int64)
        self.u = table.gt_areas.astype(np.int64).copy()
        inter = table.pair_inter[first]
        self.c[g[first]] = inter
        self.u[g[first]] = table.gt_areas[g[first]] + table.pred_areas[p[first]] - inter
        self.pickers = np.bincount(self.pick[self.pick >= 0], minlength=table.n_pred)
        self.by_pred: dict[int, list[int]] = {}
        for gi in np.flatnonzero(self.pick >= 0).tolist():
            self.by_pred.setdefault(int(self.pick[gi]), []).append(gi)
        self.total_c = int(self.c.sum())
        self.total_u = int(self.u.sum() + table.pred_areas[self.pickers == 0].sum())
        self.base = safe_ratio(self.total_c, self.total_u)

    def gain(self, gts: Iterable[int], preds: Iterable[int]) -> float:
        gts, preds = set(gts), set(preds)
        dc = du = 0
        for p in preds:
            takers = [g for g in self.by_pred.get(p, []) if g not in gts]
            if self.pickers[p] == 0:
                du -= int(self.pred_areas[p])
            for g in takers:  # left without a partner (a re-pick is not estimated)
                dc -= int(self.c[g])
                du += int(self.gt_areas[g]) - int(self.u[g])
        for g in gts:
            dc += int(self.gt_areas[g]) - int(self.c[g])
            du += int(self.gt_areas[g]) - int(self.u[g])
        for p in {int(self.pick[g]) for g in gts if self.pick[g] >= 0} - preds:
            if all(g in gts for g in self.by_pred[p]):  # nobody else picks it any more
                du += int(self.pred_areas[p])
        return safe_ratio(self.total_c + dc, self.total_u + du) - self.base


def rank_errors(
    table: OverlapTable, outcomes: InstanceOutcomes, metric: str = "aji"
) -> list[ErrorItem]:
    """The errors of an evaluation, sorted by the estimated gain of fixing each.

    Errors come from :func:`~napari_medinst.metrics.instance_outcomes`: every false
    positive prediction, false negative gt nucleus, split gt nucleus (with the
    predictions lying in it) and merging prediction (with the gt nuclei it covers).

    **Fixing** an error means: the predictions involved are removed and each gt
    nucleus involved gets a perfect prediction (a FP is deleted; a FN is drawn; a
    split's pieces are replaced by the whole nucleus; a merge is replaced by the
    separate nuclei).  The gain is the metric after that change minus the metric now,
    with everything else unchanged:

    * ``"aji"``: the AJI sums C and U are updated for the nuclei involved -- a fixed
      gt nucleus contributes ``|G|`` to both; a removed prediction nobody picked
      leaves U; a gt nucleus whose pick is removed is counted as unmatched (not
      re-matched to its second-best prediction), and a prediction no longer picked
      by anyone is added to U.  Exact for isolated errors.
    * ``"pq"`` (IoU > 0.5 matching), ``"accuracy"``, ``"f1"`` (the outcomes'
      matching at their IoU threshold): TP / FP / FN and the IoU sum are updated
      (a fixed gt nucleus is matched with IoU 1); other matches are kept.

    Ties are broken by the larger area, then by kind and id, so the order is stable.

    Returns
    -------
    list of ErrorItem
    """
    if metric not in RANK_METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(RANK_METRICS)}")
    if outcomes.gt_ids.size != table.n_gt or outcomes.pred_ids.size != table.n_pred:
        raise ValueError("the outcomes do not belong to this overlap table")
    scorer = _Aji(table) if metric == "aji" else _Counts(metric, table, outcomes)
    g_cat, p_cat = np.asarray(outcomes.gt_category), np.asarray(outcomes.pred_category)
    g, p, inter = table.pair_gt_index, table.pair_pred_index, table.pair_inter
    groups: list[tuple[str, list[int], list[int]]] = []
    groups += [("fp", [], [int(i)]) for i in np.flatnonzero(p_cat == "fp")]
    groups += [("fn", [int(i)], []) for i in np.flatnonzero(g_cat == "fn")]
    lies = (g_cat[g] == "split") & (p_cat[p] == "split") & (2 * inter >= table.pred_areas[p])
    for gi in np.flatnonzero(g_cat == "split"):
        groups.append(("split", [int(gi)], sorted(int(x) for x in p[lies & (g == gi)])))
    covers = (p_cat[p] == "merge") & (g_cat[g] == "merge") & (2 * inter >= table.gt_areas[g])
    for pi in np.flatnonzero(p_cat == "merge"):
        groups.append(("merge", sorted(int(x) for x in g[covers & (p == pi)]), [int(pi)]))
    items = []
    for kind, gts, preds in groups:
        area = int(table.gt_areas[gts].sum() + table.pred_areas[preds].sum())
        items.append(
            ErrorItem(
                kind=kind,
                gt_ids=tuple(int(table.gt_ids[i]) for i in gts),
                pred_ids=tuple(int(table.pred_ids[i]) for i in preds),
                gain=float(scorer.gain(gts, preds)),
                area=area,
            )
        )
    kind_order = {k: n for n, k in enumerate(ERROR_KINDS)}
    items.sort(
        key=lambda e: (-round(e.gain, 12), -e.area, kind_order[e.kind], e.gt_ids, e.pred_ids)
    )
    return items


def error_bbox(
    gt: np.ndarray, pred: np.ndarray, item: ErrorItem
) -> tuple[tuple[float, float], tuple[slice, slice]] | None:
    """Centre (row, col) and bounding box of the nuclei of an error; None if gone."""
    mask = np.zeros(np.shape(gt), bool)
    if item.gt_ids:
        mask |= np.isin(gt, item.gt_ids)
    if item.pred_ids:
        mask |= np.isin(pred, item.pred_ids)
    box = _bbox(mask)
    if box is None:
        return None
    centre = ((box[0].start + box[0].stop - 1) / 2.0, (box[1].start + box[1].stop - 1) / 2.0)
    return centre, box
