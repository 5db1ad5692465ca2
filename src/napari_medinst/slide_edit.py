"""Correct a region of a whole-slide result and write it back into its store.

A ``segment-slide`` store (:mod:`.slide_engine`) holds hours of a pathologist's review once
it is corrected, so every write here keeps the store whole and the edits safe:

* :func:`read_region` returns the labels of a box of the store's level 0 (the working
  level), **grown** so that every nucleus touching the box is whole, with the review status
  of its nuclei. Nuclei that touch only the grown margin and cross its edge are **locked**:
  they are shown but must come back unchanged (an edit of one is refused, naming it).
* :func:`write_region` writes an edited region back: only the changed pixels; ids not in the
  region as read are new nuclei and are renumbered from the store's ``next_id`` (kept in the
  root attributes under :data:`EDIT_KEY`), so ids stay unique over the slide across any
  number of edits; the table rows (``chunks/<k>.npy`` and ``nuclei.csv``, same columns and
  units as the engine's) of deleted nuclei are removed and those of changed or new nuclei
  recomputed; the coarser pyramid levels are updated where the pixels changed; the review
  status of each nucleus goes to ``review.csv`` (``label,status``; nuclei without a row are
  ``predicted``), which later writes keep.

Crash safety: a write takes a lock file (:data:`LOCK`), checks that the store still holds
the region as it was read (a hash: nobody wrote there meanwhile), then writes a *journal*
(:data:`JOURNAL`: the region before and after, the new table rows, the statuses; fsync'd and
renamed into place), applies it, and deletes it. Every step of the apply can run again with
the same result, so when the process dies at any moment the next :func:`read_region`,
:func:`write_region` or :func:`recover` applies the leftover journal: nothing is lost and
nothing is half-written.

Bad input (an ``incomplete`` store, a box outside the labels, a stale ``original``, an
``edited`` array of the wrong shape or type, an edited locked nucleus) raises a one-line
:class:`~._io.InputError` before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import slide_engine as se
from ._io import InputError, _atomic_write, _fsync_dir, _pid_alive, bytes_writer
from .editing import STATUSES, status_from_csv, status_to_csv
from .recovery import labels_sha256
from .slide import _zarr

__all__ = ["EDIT_KEY", "JOURNAL", "LOCK", "MAX_REGION_PIXELS", "REVIEW_CSV", "SlideRegion",
           "WriteResult", "read_region", "recover", "write_region"]  # fmt: skip

#: Root attribute of the store with the edit state: ``next_id``, ``edits``, ``max_side``.
EDIT_KEY = "napari_medinst_edits"
#: The review status table of the store (``label,status``; absent ids are ``predicted``).
REVIEW_CSV = "review.csv"
#: The journal of a write in progress (applied again when found).
JOURNAL = "edit-journal.npz"
#: The lock file a writer holds (``pid@host``).
LOCK = "edit.lock"
#: The largest region (grown) read or written at once, px of level 0.
MAX_REGION_PIXELS = 16_000_000
DEFAULT_STATUS = "predicted"


@dataclass
class SlideRegion:
    """A region of a slide result, as :func:`read_region` read it.

    Attributes
    ----------
    store : Path
    box : tuple of int
        ``(r0, r1, c0, c1)`` at level 0 of the labels: the requested box grown so that
        every nucleus touching it is whole (give this box to :func:`write_region`).
    requested : tuple of int
        The box asked for.
    labels : ndarray
        The labels of ``box`` (the store's dtype).
    status : dict
        Review status of every nucleus in ``labels``.
    locked : frozenset of int
        Nuclei crossing the edge of ``box``: they must come back unchanged.
    sha256 : str
        :func:`~.recovery.labels_sha256` of ``labels``.
    pixel_size : float
        µm per px of the labels' level 0 (the layer scale).
    """

    store: Path
    box: tuple[int, int, int, int]
    requested: tuple[int, int, int, int]
    labels: np.ndarray
    status: dict[int, str]
    locked: frozenset[int]
    sha256: str
    pixel_size: float

    @property
    def origin_um(self) -> tuple[float, float]:
        """Where the region's first pixel lies on the slide (µm from level 0's origin)."""
        return self.box[0] * self.pixel_size, self.box[2] * self.pixel_size


@dataclass
class WriteResult:
    """What :func:`write_region` wrote.

    Attributes
    ----------
    labels : ndarray
        The region as it is now in the store (new ids renumbered).
    status : dict
        Review status of every nucleus in ``labels``.
    new_ids : dict
        Id in ``edited`` -> id in the store, for every new nucleus.
    added, deleted, changed : int
        New nuclei, nuclei removed, and nuclei whose outline changed.
    """

    labels: np.ndarray
    status: dict[int, str]
    new_ids: dict[int, int]
    added: int
    deleted: int
    changed: int


# ---------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class _Store:
    out: Path
    shape: tuple[int, int]
    chunk: int
    dtype: np.dtype
    levels: int
    px: float

    @property
    def n_chunks(self) -> tuple[int, int]:
        return (-(-self.shape[0] // self.chunk), -(-self.shape[1] // self.chunk))


def _root_attrs(out: Path) -> dict:
    try:
        attrs = json.loads((out / ".zattrs").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        attrs = None
    if not isinstance(attrs, dict) or not isinstance(attrs.get(se.STORE_KEY), dict):
        raise InputError(f"{out}: not a store written by napari-medinst segment-slide")
    return attrs


def _open_store(store: str | os.PathLike) -> _Store:
    """The store's geometry; refuses anything but a complete ``segment-slide`` store."""
    out = Path(store).expanduser()
    if not out.is_dir():
        raise InputError(f"{out}: no such slide result (a .zarr folder)")
    meta = _root_attrs(out)[se.STORE_KEY]
    status = meta.get("status")
    if status != "complete":
        raise InputError(f"{out}: the slide result is {status or 'incomplete'}, not complete; "
                         "finish it (segment-slide --resume) before editing it")  # fmt: skip
    try:
        plan = meta["plan"]
        return _Store(out=out, shape=(int(plan["shape"][0]), int(plan["shape"][1])),
                      chunk=int(plan["chunk"]), dtype=np.dtype(plan["dtype"]),
                      levels=int(meta["label_levels"]), px=float(meta["scale_um"][0]))  # fmt: skip
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise InputError(f"{out}: the slide result's attributes are damaged ({exc!r})") from None


def _level(st: _Store, i: int, mode: str = "r"):
    return _zarr().open_array(str(se.labels_path(st.out) / str(i)), mode=mode)


def _check_box(st: _Store, box) -> tuple[int, int, int, int]:
    try:
        r0, r1, c0, c1 = (int(v) for v in box)
        if any(int(v) != v for v in box):
            raise ValueError
    except (TypeError, ValueError):
        raise InputError(f"box: expected four whole numbers (r0, r1, c0, c1), got {box!r}") \
            from None  # fmt: skip
    h, w = st.shape
    if not (0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w):
        raise InputError(f"box {(r0, r1, c0, c1)}: outside the labels of {st.out.name} "
                         f"({h} x {w} px) or empty")  # fmt: skip
    mpx = (r1 - r0) * (c1 - c0) / 1e6
    if mpx > MAX_REGION_PIXELS / 1e6:
        raise InputError(f"box {(r0, r1, c0, c1)}: {mpx:.1f} Mpx, more than the "
                         f"{MAX_REGION_PIXELS / 1e6:.0f} Mpx a region may hold")  # fmt: skip
    return r0, r1, c0, c1


# -------------------------------------------------------------------------- the tables


def _chunk_file(st: _Store, k: int) -> Path:
    return st.out / "chunks" / f"{k:06d}.npy"


def _chunks_meeting(st: _Store, box) -> list[int]:
    """Chunks (row-major numbers) that meet ``box`` (clipped to the labels)."""
    n0, n1 = st.n_chunks
    c = st.chunk
    i0, i1 = max(0, box[0] // c), min(n0, -(-box[1] // c))
    j0, j1 = max(0, box[2] // c), min(n1, -(-box[3] // c))
    return [i * n1 + j for i in range(i0, i1) for j in range(j0, j1)]


def _load_table(st: _Store, k: int) -> np.ndarray:
    try:
        return np.load(_chunk_file(st, k), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{_chunk_file(st, k)}: unreadable table of chunk {k} ({exc})") from None


def _reach(st: _Store, attrs: dict) -> int:
    """The largest nucleus side (px): how far a nucleus' table row lies from its pixels."""
    side = int(attrs.get(EDIT_KEY, {}).get("max_side", 0))
    for path in (st.out / "records").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            side = max(side, int(json.loads(path.read_text()).get("max_side", 0)))
    return side + 2


def _grow(box, by: int) -> tuple[int, int, int, int]:
    return box[0] - by, box[1] + by, box[2] - by, box[3] + by


def _rows_near(st: _Store, box, reach: int) -> tuple[np.ndarray, list[int]]:
    """Table rows of every nucleus whose pixels may meet ``box``, and the chunks read."""
    ks = _chunks_meeting(st, _grow(box, reach))
    tables = [_load_table(st, k) for k in ks]
    rows = np.concatenate(tables) if tables else np.zeros(0, se._TABLE)
    return rows, ks


def _bboxes(rows: np.ndarray, px: float) -> np.ndarray:
    """(n, 4) int64 ``r0, r1, c0, c1`` of the rows' bounding boxes (px of level 0)."""
    cols = ("bbox_y0_um", "bbox_y1_um", "bbox_x0_um", "bbox_x1_um")
    return np.stack([np.rint(rows[c] / px) for c in cols], axis=-1).astype(np.int64).reshape(-1, 4)


def _meets(bb: np.ndarray, box) -> np.ndarray:
    return (bb[:, 0] < box[1]) & (box[0] < bb[:, 1]) & (bb[:, 2] < box[3]) & (box[2] < bb[:, 3])


def _inside(bb: np.ndarray, box) -> np.ndarray:
    rows = (bb[:, 0] >= box[0]) & (bb[:, 1] <= box[1])
    return rows & (bb[:, 2] >= box[2]) & (bb[:, 3] <= box[3])


def _grown(st: _Store, box, bb: np.ndarray) -> tuple[int, int, int, int]:
    """``box`` grown to hold the bounding box of every nucleus that meets it."""
    hit = bb[_meets(bb, box)]
    if not hit.size:
        return box
    lo, hi = hit.min(axis=0), hit.max(axis=0)
    return (max(0, min(box[0], int(lo[0]))), min(st.shape[0], max(box[1], int(hi[1]))),
            max(0, min(box[2], int(lo[2]))), min(st.shape[1], max(box[3], int(hi[3]))))  # fmt: skip


def _locked(labels: np.ndarray, box, rows: np.ndarray, bb: np.ndarray) -> frozenset[int]:
    """Nuclei of ``labels`` that cross the edge of ``box``.

    Those whose table bounding box is not inside ``box``, and (never expected: every
    painted nucleus has a row) any id on the region's border without a row.
    """
    out = set(rows["id"][_meets(bb, box) & ~_inside(bb, box)].tolist())
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    known = set(rows["id"].tolist())
    out.update(int(i) for i in np.unique(border) if i and int(i) not in known)
    present = set(np.unique(labels).tolist())
    return frozenset(int(i) for i in out if i in present)


# ------------------------------------------------------------------------- review table


def _read_review(out: Path) -> dict[int, str]:
    path = out / REVIEW_CSV
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return status_from_csv(text, str(path))


def _check_status(status: Mapping | None) -> dict[int, str]:
    out: dict[int, str] = {}
    for key, value in (status or {}).items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise InputError(f"status: id {key!r} is not a whole number") from None
        if str(value) not in STATUSES:
            raise InputError(f"status: nucleus {i}: unknown status {value!r}; expected one of "
                             f"{', '.join(STATUSES)}")  # fmt: skip
        out[i] = str(value)
    return out


# ---------------------------------------------------------------------------- the lock


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold :data:`LOCK` (one writer at a time); a lock of a dead process here is taken over."""
    path = out / LOCK
    me = f"{os.getpid()}@{socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _stale_lock(path):
                holder = _lock_holder(path)
                raise InputError(f"{out}: another process ({holder}) is writing to this slide "
                                 f"result; try again when it is done (or delete {LOCK} if that "
                                 "process is gone)") from None  # fmt: skip
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        except OSError as exc:
            raise InputError(f"{out}: cannot write to the slide result ({exc.strerror or exc})") \
                from None  # fmt: skip
        with os.fdopen(fd, "w") as fh:
            fh.write(me)
        break
    else:
        raise InputError(f"{out}: cannot take the lock {LOCK}; try again")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if _lock_holder(path) == me:
                path.unlink()


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "?"
    except OSError:
        return "?"


#: An empty lock older than this (s) is stale: its writer fills it right after creating it
#: and so must have died in between.
EMPTY_LOCK_S = 10.0


def _stale_lock(path: Path) -> bool:
    holder = _lock_holder(path)
    if holder == "?":
        try:
            return time.time() - path.stat().st_mtime > EMPTY_LOCK_S
        except OSError:
            return True  # gone meanwhile: free
    pid, _, host = holder.partition("@")
    return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))


# -------------------------------------------------------------------------- reading


def read_region(store: str | os.PathLike, box) -> SlideRegion:
    """The labels of ``box`` (grown so its nuclei are whole) and their review status.

    Parameters
    ----------
    store : path-like
        A complete ``segment-slide`` store (``.zarr``).
    box : sequence of int
        ``(r0, r1, c0, c1)`` at level 0 of the labels (the working level; half-open).

    Returns
    -------
    SlideRegion
        Its ``box`` is the grown box; nuclei crossing that box's edge are ``locked``.

    Raises
    ------
    InputError
        The store is not a complete slide result, the box lies outside its labels or
        is larger than :data:`MAX_REGION_PIXELS`, or another process is writing.
    """
    st = _open_store(store)
    requested = _check_box(st, box)
    with _lock(st.out):
        _recover(st)
        attrs = _root_attrs(st.out)
        reach = _reach(st, attrs)  # the grown box is within one nucleus of the requested one
        rows, _ = _rows_near(st, requested, 2 * reach)
        bb = _bboxes(rows, st.px)
        grown = _check_box(st, _grown(st, requested, bb))
        labels = np.asarray(_level(st, 0)[grown[0] : grown[1], grown[2] : grown[3]])
        review = _read_review(st.out)
    ids = [int(i) for i in np.unique(labels) if i]
    return SlideRegion(store=st.out, box=grown, requested=requested, labels=labels,
                       status={i: review.get(i, DEFAULT_STATUS) for i in ids},
                       locked=_locked(labels, grown, rows, bb), sha256=labels_sha256(labels),
                       pixel_size=st.px)  # fmt: skip


# -------------------------------------------------------------------------- writing


def _int_labels(arr, name: str, shape: tuple[int, int]) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.shape != shape:
        raise InputError(f"{name}: shape {arr.shape} differs from the region's {shape}")
    if arr.dtype == bool or arr.dtype.kind not in "ui":
        raise InputError(f"{name}: labels must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
        raise InputError(f"{name}: labels contain negative values (min {int(arr.min())})")
    return arr


def write_region(
    store: str | os.PathLike,
    box,
    original: np.ndarray,
    edited: np.ndarray,
    status: Mapping[int, str] | None = None,
) -> WriteResult:
    """Write an edited region back into a slide result (see the module for the rules).

    Parameters
    ----------
    store : path-like
        The complete ``segment-slide`` store the region was read from.
    box : sequence of int
        The region's box (``SlideRegion.box``: the grown one).
    original : ndarray
        The labels as read (``SlideRegion.labels``); the store must still hold them.
    edited : ndarray
        The corrected labels, same shape, any non-negative integer type. Ids not in
        ``original`` are new nuclei: they get new ids unique over the slide.
    status : mapping, optional
        Review status (``predicted`` / ``edited`` / ``verified``) by id of ``edited``;
        nuclei not given keep the store's, and a changed nucleus is never ``predicted``.

    Returns
    -------
    WriteResult

    Raises
    ------
    InputError
        The store is not complete, the box lies outside its labels, ``original`` no longer
        matches the store, ``edited`` has the wrong shape or type, a locked nucleus (one
        crossing the region's edge) was changed, the store has no free ids left, or
        another process is writing. Nothing is written then.
    """
    st = _open_store(store)
    box = _check_box(st, box)
    shape = (box[1] - box[0], box[3] - box[2])
    original = _int_labels(original, "original", shape)
    edited = _int_labels(edited, "edited", shape)
    status = _check_status(status)
    with _lock(st.out):
        why = ("an interrupted write was just finished" if _recover(st)
               else "written meanwhile by someone else?")  # fmt: skip
        current = np.asarray(_level(st, 0)[box[0] : box[1], box[2] : box[3]])
        if labels_sha256(current) != labels_sha256(original):
            raise InputError(f"{st.out}: the region {box} changed since it was read ({why}); "
                             "read it again and redo the edit there")  # fmt: skip
        journal, result = _prepare(st, box, current, edited, status)
        if journal is None:
            return result
        _write_journal(st, journal)
        _apply(st, journal)
        _drop_journal(st)
    return result


def _next_id(st: _Store, attrs: dict) -> int:
    """The first free id: kept in the attributes, else above every id of the table."""
    kept = attrs.get(EDIT_KEY, {}).get("next_id")
    if kept:
        return int(kept)
    top = 0
    for k in range(st.n_chunks[0] * st.n_chunks[1]):
        ids = _load_table(st, k)["id"]
        top = max(top, int(ids.max()) if ids.size else 0)
    return top + 1


def _renumber(st: _Store, edited: np.ndarray, new: np.ndarray, first: int) -> np.ndarray:
    """``edited`` in the store's dtype, the ids ``new`` (sorted) numbered from ``first``."""
    if new.size and first + new.size - 1 > np.iinfo(st.dtype).max:
        raise InputError(f"{st.out}: no free ids left for {new.size} new nuclei (the labels are "
                         f"{st.dtype}, the next id is {first})")  # fmt: skip
    final = edited.astype(np.uint64)
    if new.size:
        where = np.isin(edited, new)
        final[where] = first + np.searchsorted(new, edited[where]).astype(np.uint64)
    return final.astype(st.dtype)


def _measure(final, ids, origin, px, old: dict, original) -> np.ndarray:
    """Table rows (the engine's columns and units) of the nuclei ``ids`` of ``final``."""
    rows = np.zeros(ids.size, se._TABLE)
    if not ids.size:
        return rows
    rr, cc = np.nonzero(np.isin(final, ids))
    k = np.searchsorted(ids, final[rr, cc])
    n = np.bincount(k, minlength=ids.size)
    big = np.iinfo(np.int64).max
    y0, x0 = np.full(ids.size, big), np.full(ids.size, big)
    y1, x1 = np.full(ids.size, -1), np.full(ids.size, -1)
    np.minimum.at(y0, k, rr), np.minimum.at(x0, k, cc)
    np.maximum.at(y1, k, rr), np.maximum.at(x1, k, cc)
    r0, c0 = origin
    rows["id"] = ids
    rows["centroid_y_um"] = (np.bincount(k, rr, ids.size) / n + r0 + 0.5) * px
    rows["centroid_x_um"] = (np.bincount(k, cc, ids.size) / n + c0 + 0.5) * px
    rows["bbox_y0_um"], rows["bbox_x0_um"] = (y0 + r0) * px, (x0 + c0) * px
    rows["bbox_y1_um"], rows["bbox_x1_um"] = (y1 + 1 + r0) * px, (x1 + 1 + c0) * px
    rows["area_um2"] = n * px * px
    for j, i in enumerate(ids.tolist()):
        row = old.get(i)
        if row is None:  # a new nucleus: no model score; the type of what it was drawn over
            src = old.get(_majority(original[rr[k == j], cc[k == j]]))
            rows["score"][j], rows["type"][j] = np.nan, -1 if src is None else src["type"]
        else:
            rows["score"][j], rows["type"][j] = row["score"], row["type"]
    return rows


def _majority(values: np.ndarray) -> int:
    """The most frequent non-zero value (0 when there is none)."""
    values = values[values != 0]
    if not values.size:
        return 0
    ids, counts = np.unique(values, return_counts=True)
    return int(ids[counts.argmax()])


def _present(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels)
    return ids[ids != 0].astype(np.uint64)


def _prepare(st: _Store, box, original, edited, status: dict[int, str]):
    """The journal of a write (None when nothing changes) and its :class:`WriteResult`."""
    attrs = _root_attrs(st.out)
    before, new = _present(original), np.setdiff1d(_present(edited), _present(original))
    first = _next_id(st, attrs) if new.size else 0
    final = _renumber(st, edited, new, first)
    new_ids = {int(a): first + j for j, a in enumerate(new.tolist())}
    changed = original != final
    touched = np.union1d(_present(original[changed]), _present(final[changed]))
    rows, ks = _rows_near(st, box, _reach(st, attrs))
    _refuse_locked(st, box, touched, _locked(original, box, rows, _bboxes(rows, st.px)))
    after = _present(final)
    old = {int(r["id"]): r for r in rows}
    remeasured = np.intersect1d(touched, after)
    fresh = _measure(final, remeasured, (box[0], box[2]), st.px, old, original)
    statuses = {new_ids.get(i, i): s for i, s in status.items()}
    review = _read_review(st.out)
    updates = _review_updates(review, after, touched, statuses)
    deleted = np.setdiff1d(np.intersect1d(touched, before), after)
    updates.update({int(i): None for i in deleted})
    result = WriteResult(labels=final, new_ids=new_ids, added=int(new.size),
                         deleted=int(deleted.size),
                         changed=int(np.intersect1d(remeasured, before).size),
                         status={int(i): updates.get(int(i)) or review.get(int(i), DEFAULT_STATUS)
                                 for i in after})  # fmt: skip
    if not touched.size and all(review.get(i, DEFAULT_STATUS) == (s or DEFAULT_STATUS)
                                for i, s in updates.items()):  # fmt: skip
        return None, result
    e = attrs.get(EDIT_KEY, {})
    bb = _bboxes(fresh, st.px)
    side = int(max((bb[:, 1] - bb[:, 0]).max(), (bb[:, 3] - bb[:, 2]).max())) if bb.size else 0
    journal = {
        "box": np.array(box, np.int64), "original": original, "final": final,
        "touched": touched, "rows": fresh, "chunks": np.array(ks, np.int64),
        "row_chunks": _chunk_of(st, fresh),
        "review": np.array(json.dumps({str(i): s for i, s in updates.items()})),
        "attrs": np.array(json.dumps({
            "next_id": max(int(e.get("next_id", 0)), first + int(new.size)),
            "edits": int(e.get("edits", 0)) + 1,
            "max_side": max(int(e.get("max_side", 0)), side)})),
    }  # fmt: skip
    return journal, result


def _refuse_locked(st: _Store, box, touched: np.ndarray, locked: frozenset[int]) -> None:
    bad = sorted(set(touched.tolist()) & locked)
    if bad:
        few = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        raise InputError(f"{st.out}: nucleus {few} crosses the edge of the region {box} and "
                         "cannot be changed there (only whole nuclei can); read a region that "
                         "holds it whole and edit it there")  # fmt: skip


def _review_updates(review, after, touched, statuses) -> dict[int, str | None]:
    """New status of every nucleus of the region: given, else kept; changed: not predicted."""
    touched = set(touched.tolist())
    out: dict[int, str | None] = {}
    for i in after.tolist():
        s = statuses.get(i) or review.get(i, DEFAULT_STATUS)
        out[i] = "edited" if i in touched and s == DEFAULT_STATUS else s
    return out


def _chunk_of(st: _Store, rows: np.ndarray) -> np.ndarray:
    """The chunk whose table holds each row: the one holding its centroid."""
    i = np.clip(np.floor(rows["centroid_y_um"] / st.px).astype(np.int64) // st.chunk, 0,
                st.n_chunks[0] - 1)  # fmt: skip
    j = np.clip(np.floor(rows["centroid_x_um"] / st.px).astype(np.int64) // st.chunk, 0,
                st.n_chunks[1] - 1)  # fmt: skip
    return i * st.n_chunks[1] + j


# -------------------------------------------------------------------------- the journal


def _write_journal(st: _Store, journal: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **journal)

    _atomic_write(st.out / JOURNAL, write, False)


def _drop_journal(st: _Store) -> None:
    (st.out / JOURNAL).unlink()
    _fsync_dir(st.out)


def _load_journal(st: _Store) -> dict:
    path = st.out / JOURNAL
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: the journal of an interrupted write cannot be read ({exc}); "
                         "it was kept, nothing was changed") from None  # fmt: skip


def _recover(st: _Store) -> bool:
    """Apply a leftover journal (the lock is held); True when there was one."""
    if not (st.out / JOURNAL).exists():
        return False
    _apply(st, _load_journal(st))
    _drop_journal(st)
    return True


def recover(store: str | os.PathLike) -> bool:
    """Finish a write that was interrupted (a leftover journal); True when there was one.

    :func:`read_region` and :func:`write_region` do this themselves first.
    """
    st = _open_store(store)
    with _lock(st.out):
        return _recover(st)


def _apply(st: _Store, j: dict) -> None:
    """Write everything the journal says; each step gives the same result when run again."""
    _apply_labels(st, tuple(int(v) for v in j["box"]), j["original"], j["final"])
    _apply_tables(st, j["chunks"].tolist(), j["touched"], j["rows"], j["row_chunks"])
    se.write_table(st.out, st)  # nuclei.csv from every chunk's rows (reads only n_chunks)
    _apply_review(st, json.loads(str(j["review"])))
    _apply_attrs(st, json.loads(str(j["attrs"])))


def _span(mask: np.ndarray, axis: int) -> tuple[int, int]:
    hit = np.nonzero(mask.any(axis=axis))[0]
    return int(hit[0]), int(hit[-1]) + 1


def _apply_labels(st: _Store, box, original: np.ndarray, final: np.ndarray) -> None:
    """The changed pixels into level 0, then the coarser levels where they changed."""
    changed = original != final
    if not changed.any():
        return
    (r0, r1), (c0, c1) = _span(changed, 1), _span(changed, 0)
    top = _level(st, 0, "r+")
    R0, R1, C0, C1 = box[0] + r0, box[0] + r1, box[2] + c0, box[2] + c1
    here = np.asarray(top[R0:R1, C0:C1])
    m = changed[r0:r1, c0:c1]
    here[m] = final[r0:r1, c0:c1][m]
    top[R0:R1, C0:C1] = here
    for i in range(1, st.levels):
        f = 2**i
        L0, L1, K0, K1 = -(-R0 // f), -(-R1 // f), -(-C0 // f), -(-C1 // f)
        if L1 > L0 and K1 > K0:
            src = np.asarray(top[L0 * f : (L1 - 1) * f + 1, K0 * f : (K1 - 1) * f + 1])
            _level(st, i, "r+")[L0:L1, K0:K1] = src[::f, ::f]


def _apply_tables(st: _Store, chunks, touched, rows, row_chunks) -> None:
    """Each chunk's table without the touched nuclei, plus their new rows."""
    for k in sorted(set(chunks) | set(row_chunks.tolist())):
        table = _load_table(st, k)
        new = np.concatenate([table[~np.isin(table["id"], touched)], rows[row_chunks == k]])
        new = new[np.argsort(new["id"], kind="stable")]
        if new.size != table.size or new.tobytes() != table.tobytes():
            se._save(_chunk_file(st, k), lambda fh, new=new: np.save(fh, new))


def _apply_review(st: _Store, updates: dict[str, str | None]) -> None:
    review = _read_review(st.out)
    for key, s in updates.items():
        if s is None or s == DEFAULT_STATUS:
            review.pop(int(key), None)
        else:
            review[int(key)] = s
    _atomic_write(st.out / REVIEW_CSV, bytes_writer(status_to_csv(review).encode()), True)


def _apply_attrs(st: _Store, state: dict) -> None:
    attrs = _root_attrs(st.out)
    e = attrs.get(EDIT_KEY, {})
    attrs[EDIT_KEY] = {name: max(int(e.get(name, 0)), int(v)) for name, v in state.items()}
    _atomic_write(st.out / ".zattrs", bytes_writer(json.dumps(attrs, indent=4).encode()), True)
