"""Crash safety of ground-truth editing: autosave records and the TIFF / status CSV pair.

Two problems are solved here, without napari or Qt:

**Autosave records that can only come back onto their own source.**  An autosave is
one TIFF in the recovery folder holding the edited labels, with a JSON
:class:`Record` in its ``ImageDescription`` tag; one atomic rename writes both.  The
record names what the edits belong to (:class:`Source`):

* the ground-truth file the editing started from (absolute path), or, for a layer
  never saved, a description such as ``new from prediction 'x'``;
* the sha256 of the labels when editing began (:func:`labels_sha256`);
* the sha256 of the image the labels are drawn over (:func:`image_sha256`; which
  image that is: :func:`paired_image_index`);
* the layer name and shape, the autosave time, the number of changed nuclei and the
  review status.

A layer may receive a record only if :meth:`Source.matches` says so: same file path
(and shape) for a layer from a file; same original labels *and* same image for a
layer never saved.  Layer name and shape alone never match.  The file is named by a
hash of the identity (:meth:`Source.key`) and a token of the editor that wrote it
(:func:`record_path`), never by the layer name: two layers of one source autosave to
two files, and a later session is offered each of them.

**A ground-truth TIFF and status CSV that cannot be paired wrongly.**
:func:`write_ground_truth` embeds the status table in the TIFF (same atomic rename as
the labels) and then writes ``<stem>_status.csv`` with a ``labels_sha256`` column, the
hash of the labels it describes.  :func:`read_ground_truth` uses the CSV only when its
hash matches the TIFF (or when it is an old CSV without the column and the TIFF has no
embedded table), so a crash between the two writes never pairs a new TIFF with the old
statuses.  A CSV whose labels were changed by another program is still loaded, with a
warning, and a save never replaces such a CSV without keeping a ``.stale-<time>`` copy.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import editing
from ._io import InputError, _atomic_write, check_labels, read_labels, write_bytes

__all__ = [
    "HASH_COLUMN",
    "Record",
    "SavedGroundTruth",
    "Source",
    "changed_nuclei",
    "image_sha256",
    "labels_sha256",
    "list_records",
    "paired_image_index",
    "read_ground_truth",
    "read_record",
    "read_record_labels",
    "read_status_csv",
    "record_path",
    "status_csv",
    "write_ground_truth",
    "write_record",
]

logger = logging.getLogger(__name__)

#: Format tag of an autosave record (the JSON in the recovery TIFF's description).
RECORD_SCHEMA = "napari-medinst-recovery/1"
#: Format tag of the status table embedded in a saved ground-truth TIFF.
GT_SCHEMA = "napari-medinst-ground-truth/1"
#: Column of the status CSV holding the sha256 of the labels the table describes.
HASH_COLUMN = "labels_sha256"
#: Key of this package's entry in the JSON description of the TIFFs it writes.
_TIFF_KEY = "napari_medinst"
#: About this many array elements are hashed per block (bounds the temporary memory).
_BLOCK = 1 << 22


# --------------------------------------------------------------------------- hashes


def _blocks(data: Any) -> Any:
    """Consecutive slices along the first axis of about :data:`_BLOCK` elements each."""
    shape = tuple(int(s) for s in np.shape(data))
    if not shape:
        yield np.asarray(data)
        return
    per_row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    step = max(1, _BLOCK // max(1, per_row))
    for start in range(0, shape[0], step):
        yield np.asarray(data[start : start + step])


def labels_sha256(labels: Any) -> str:
    """sha256 (hex) of a label image's shape and values, independent of its integer dtype.

    The values are hashed as little-endian uint64, so the same labels held as uint16
    in one place and int32 in another hash the same.  Computed block by block.
    """
    arr = np.asarray(labels)
    h = hashlib.sha256(f"labels {tuple(int(s) for s in arr.shape)}\n".encode())
    for block in _blocks(arr):
        h.update(np.ascontiguousarray(block, dtype="<u8"))
    return h.hexdigest()


def image_sha256(data: Any) -> str:
    """sha256 (hex) of an image's dtype, shape and raw values (lazy arrays block by block)."""
    shape = tuple(int(s) for s in np.shape(data))
    dtype = getattr(data, "dtype", None)
    dtype = np.asarray(data).dtype if dtype is None else np.dtype(dtype)
    h = hashlib.sha256(f"image {dtype.str} {shape}\n".encode())
    for block in _blocks(data):
        h.update(np.ascontiguousarray(block, dtype=dtype.newbyteorder("<")))
    return h.hexdigest()


def paired_image_index(gt_index: int, candidates: Sequence[bool]) -> int | None:
    """Index of the image a ground truth is drawn over, in a layer list.

    ``candidates[i]`` says whether layer ``i`` is an image with the ground truth's
    2-D shape.  The rule: the nearest such image *below* the ground truth (napari
    draws a layer over those before it in the list); if there is none below, the
    nearest above; None if there is none.
    """
    below = [i for i in range(min(gt_index, len(candidates))) if candidates[i]]
    if below:
        return below[-1]
    above = [i for i in range(gt_index + 1, len(candidates)) if candidates[i]]
    return above[0] if above else None


def changed_nuclei(base: Mapping[int, str], now: Mapping[int, str]) -> int:
    """How many nuclei changed since editing began: added, deleted or with a new status.

    ``base`` and ``now`` map every nucleus id present to its review status (any edit
    of a nucleus makes it ``edited``, so a changed nucleus shows in its status).
    """
    ids = set(base) | set(now)
    return sum(1 for i in ids if base.get(i) != now.get(i))


# ------------------------------------------------------------------ autosave records


@dataclass(frozen=True)
class Source:
    """What a ground truth being edited belongs to.

    Attributes
    ----------
    path : str or None
        Absolute path of the labels file editing started from; None for a layer never
        saved (started from a prediction, a sample, ...).
    origin : str
        Human description: the file name, or e.g. ``new from prediction 'x'``.
    base_sha256 : str
        :func:`labels_sha256` of the labels when editing began.
    image_sha256 : str or None
        :func:`image_sha256` of the image the labels are drawn over, if there is one.
    shape : tuple of int
        Shape of the labels.
    """

    path: str | None
    origin: str
    base_sha256: str
    image_sha256: str | None
    shape: tuple[int, ...]

    def key(self) -> str:
        """Name of this source's recovery file: a hash of its identity (32 hex digits)."""
        dims = "x".join(str(int(s)) for s in self.shape)
        if self.path:
            text = f"file\n{self.path}\n{dims}"
        else:
            text = f"new\n{self.base_sha256}\n{self.image_sha256}\n{dims}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def matches(self, other: Source) -> bool:
        """Whether edits made on ``self`` may be restored onto ``other``.

        Same shape, and: the same file path when either comes from a file; otherwise
        the same original labels *and* the same image.  Names never count.
        """
        if tuple(self.shape) != tuple(other.shape):
            return False
        if self.path or other.path:
            return self.path == other.path
        return self.base_sha256 == other.base_sha256 and self.image_sha256 == other.image_sha256

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "origin": self.origin,
            "base_sha256": self.base_sha256,
            "image_sha256": self.image_sha256,
            "shape": [int(s) for s in self.shape],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Source:
        return cls(
            path=None if d.get("path") is None else str(d["path"]),
            origin=str(d["origin"]),
            base_sha256=str(d["base_sha256"]),
            image_sha256=None if d.get("image_sha256") is None else str(d["image_sha256"]),
            shape=tuple(int(s) for s in d["shape"]),
        )


@dataclass(frozen=True)
class Record:
    """One autosave: whose edits (:class:`Source`), when, how many, and the status table."""

    source: Source
    layer: str
    saved: str
    labels_sha256: str
    changed: int
    status: dict[int, str] = field(default_factory=dict)

    def describe(self) -> str:
        """``origin, autosaved <time>, N changed nuclei`` for the recovery banner."""
        n = self.changed
        noun = "nucleus" if n == 1 else "nuclei"
        return f"{self.source.origin}, autosaved {self.saved}, {n} changed {noun}"

    def to_dict(self) -> dict[str, Any]:
        return dict(
            {
                "schema": RECORD_SCHEMA,
                "source": self.source.to_dict(),
                "layer": self.layer,
                "saved": self.saved,
                "labels_sha256": self.labels_sha256,
                "changed": int(self.changed),
                "status": {str(k): v for k, v in sorted(self.status.items())},
            }
        )

    @classmethod
    def from_dict(cls, d: Any, name: str = "record") -> Record:
        """Parse :meth:`to_dict` output; InputError names ``name`` if it is not one."""
        try:
            if not isinstance(d, dict) or d.get("schema") != RECORD_SCHEMA:
                raise InputError(f"{name}: not a napari-medinst autosave record")
            return cls(
                source=Source.from_dict(d["source"]),
                layer=str(d["layer"]),
                saved=str(d["saved"]),
                labels_sha256=str(d["labels_sha256"]),
                changed=int(d["changed"]),
                status={int(k): str(v) for k, v in d.get("status", {}).items()},
            )
        except InputError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InputError(f"{name}: damaged autosave record ({exc})") from None


def new_record(
    source: Source, layer: str, labels: np.ndarray, status: Mapping[int, str], changed: int
) -> Record:
    """A :class:`Record` of ``labels`` autosaved now."""
    return Record(
        source=source,
        layer=layer,
        saved=datetime.now().isoformat(sep=" ", timespec="seconds"),
        labels_sha256=labels_sha256(labels),
        changed=int(changed),
        status={int(k): str(v) for k, v in status.items()},
    )


def record_path(folder: str | Path, source: Source, token: str | None = None) -> Path:
    """The recovery file of ``source`` in ``folder``: ``<key>-<token>.tif``.

    ``token`` names the editor (layer) whose autosave it is, so that two layers of one
    source never overwrite (or, when one is saved, delete) each other's autosave;
    without a token ``<key>.tif``.  Which autosave belongs to which layer is decided
    by the record (:meth:`Source.matches`), never by this name.
    """
    return Path(folder) / (f"{source.key()}-{token}.tif" if token else f"{source.key()}.tif")


def _write_tiff(path: Path, labels: np.ndarray, payload: Mapping[str, Any]) -> Path:
    """Labels and ``payload`` in one TIFF (tifffile's JSON description, key ``napari_medinst``)."""
    import tifffile

    data = np.asarray(labels)

    def _w(tmp: Path) -> None:
        tifffile.imwrite(
            tmp,
            data,
            compression="zlib",
            photometric="minisblack",
            metadata={_TIFF_KEY: dict(payload)},
        )

    return _atomic_write(path, _w, True)


def _payload(path: Path) -> dict[str, Any] | None:
    """What :func:`_write_tiff` stored in a TIFF, or None (another file, or unreadable)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            text = tif.pages[0].description or ""
        d = json.loads(text) if text.lstrip().startswith("{") else None
    except Exception:  # not a TIFF, damaged, or a description of another program
        logger.debug("no napari-medinst description in %s", path, exc_info=True)
        return None
    payload = d.get(_TIFF_KEY) if isinstance(d, dict) else None
    return payload if isinstance(payload, dict) else None


def write_record(
    folder: str | Path, record: Record, labels: np.ndarray, token: str | None = None
) -> Path:
    """Write the autosave (labels + record, one atomic rename); returns its path.

    ``token``: the editor's, see :func:`record_path`.
    """
    labels = check_labels(labels, f"autosave of '{record.layer}'")
    path = record_path(folder, record.source, token)
    return _write_tiff(path, labels, record.to_dict())


def read_record(path: str | Path) -> Record:
    """The record of a recovery file (InputError if it is not one)."""
    path = Path(path)
    payload = _payload(path)
    if payload is None:
        raise InputError(f"{path}: not a napari-medinst autosave")
    return Record.from_dict(payload, str(path))


def read_record_labels(path: str | Path, record: Record) -> np.ndarray:
    """The autosaved labels, checked against the record's hash (InputError if damaged)."""
    labels = read_labels(path)
    if tuple(labels.shape) != tuple(record.source.shape) or (
        labels_sha256(labels) != record.labels_sha256
    ):
        raise InputError(f"{path}: the autosaved labels do not match their record (damaged)")
    return labels


def list_records(folder: str | Path) -> list[tuple[Path, Record]]:
    """Every readable autosave in ``folder``, oldest first (other files are skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.tif")):
        try:
            out.append((path, read_record(path)))
        except InputError as exc:
            logger.debug("skipping %s: %s", path, exc)
    out.sort(key=lambda pr: pr[1].saved)
    return out


# ------------------------------------------------------------ ground truth on disk


def status_csv(status: Mapping[int, str], labels_hash: str) -> str:
    """Status CSV (``label,status,labels_sha256``), the hash of the labels on every row.

    Readers that know only ``label`` and ``status`` (older versions,
    :func:`napari_medinst.editing.status_from_csv`) ignore the extra column.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["label", "status", HASH_COLUMN])
    for i in sorted(int(k) for k in status):
        writer.writerow([i, status[i], labels_hash])
    return buf.getvalue()


def read_status_csv(text: str, name: str = "status table") -> tuple[dict[int, str], str | None]:
    """Statuses of a status CSV and the labels hash it records (None: an old CSV without it).

    Raises
    ------
    InputError
        As :func:`napari_medinst.editing.status_from_csv`; also if two rows name
        different labels hashes (the message names the line).  Empty hash cells (rows
        added by hand) are ignored.
    """
    status = editing.status_from_csv(text, name)
    reader = csv.DictReader(io.StringIO(text))
    if HASH_COLUMN not in (reader.fieldnames or ()):
        return status, None
    recorded = None
    for row in reader:
        cell = str(row.get(HASH_COLUMN) or "").strip()
        if not cell:  # a row added or edited by hand: the other rows name the labels
            continue
        if recorded is None:
            recorded = cell
        elif cell != recorded:
            raise InputError(
                f"{name}, line {reader.line_num}: {HASH_COLUMN} differs from the rows "
                "above (the rows name different labels)"
            )
    return status, recorded


class SavedGroundTruth(NamedTuple):
    """What :func:`write_ground_truth` did."""

    #: :func:`labels_sha256` of the labels saved.
    labels_sha256: str
    #: Where the status CSV replaced was kept (it did not belong to the labels file
    #: replaced, see :func:`_csv_to_keep`); None if it was not kept or there was none.
    kept_csv: Path | None


def _old_labels_hash(path: Path) -> str | None:
    """:func:`labels_sha256` of the labels file about to be replaced (None: none, unreadable)."""
    if not path.exists():
        return None
    try:
        return labels_sha256(read_labels(path))
    except (InputError, OSError):
        return None


def _csv_to_keep(path: Path, csv_path: Path) -> bytes | None:
    """The status CSV's bytes if replacing it would destroy statuses nobody has loaded.

    A CSV may be replaced only if it is the table :func:`read_ground_truth` used, as
    it is, for the labels file being replaced: it records their hash, or it is an old
    CSV without a hash beside a TIFF without embedded statuses.  Any other CSV (one
    written for other labels, e.g. after the TIFF was changed by another program; one
    that cannot be read; one without a labels file) is kept.
    """
    try:
        data = csv_path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        _, recorded = read_status_csv(data.decode("utf-8"), str(csv_path))
    except (UnicodeDecodeError, InputError):
        return data
    old = _old_labels_hash(path)
    if old is not None and (
        recorded == old or (recorded is None and _embedded_status(path, old) is None)
    ):
        return None
    return data


def _keep_csv(csv_path: Path, data: bytes) -> Path:
    """Write ``data`` to ``<stem>.stale-<YYYYmmdd-HHMMSS>[-k].csv`` (atomic, never replacing)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for k in range(1, 100):
        kept = csv_path.with_name(f"{csv_path.stem}.stale-{stamp}{f'-{k}' if k > 1 else ''}.csv")
        try:
            return write_bytes(kept, data, overwrite=False)
        except FileExistsError:
            continue
    raise FileExistsError(f"{csv_path}: no free name to keep the old status table")


def write_ground_truth(
    path: str | Path, labels: np.ndarray, status: Mapping[int, str], csv_path: str | Path
) -> SavedGroundTruth:
    """Save labels (TIFF, status embedded) and then the status CSV.

    Both writes are atomic.  The TIFF carries its own status table, and the CSV the
    hash of the labels it belongs to, so a crash between the two writes leaves a TIFF
    that :func:`read_ground_truth` reads with its own statuses, never the old CSV's.

    A CSV there that did not belong to the labels file being replaced (its statuses
    were not, or not reliably, loaded: :func:`_csv_to_keep`) is first copied to
    ``<stem>.stale-<YYYYmmdd-HHMMSS>.csv``, so the review work it holds is never lost.

    Returns
    -------
    SavedGroundTruth
        The labels hash, and where the old CSV was kept (or None).
    """
    path, csv_path = Path(path), Path(csv_path)
    labels = check_labels(labels, str(path))
    digest = labels_sha256(labels)
    embedded = {
        "schema": GT_SCHEMA,
        HASH_COLUMN: digest,
        "status": {str(k): str(v) for k, v in sorted(status.items())},
    }
    stale = _csv_to_keep(path, csv_path)
    kept = None if stale is None else _keep_csv(csv_path, stale)
    try:
        _write_tiff(path, labels, embedded)
        write_bytes(csv_path, status_csv(status, digest).encode("utf-8"), overwrite=True)
    except BaseException:
        if kept is not None:  # the CSV itself is still there, unchanged
            kept.unlink(missing_ok=True)
        raise
    return SavedGroundTruth(digest, kept)


def _embedded_status(path: Path, digest: str) -> dict[int, str] | None:
    """The status table embedded by :func:`write_ground_truth`, if it belongs to ``digest``."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    d = _payload(path)
    try:
        if d is None or d.get("schema") != GT_SCHEMA or d.get(HASH_COLUMN) != digest:
            return None
        status = {int(k): str(v) for k, v in d["status"].items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if any(v not in editing.STATUSES for v in status.values()):
        return None
    return status


def read_ground_truth(
    path: str | Path, csv_path: str | Path
) -> tuple[np.ndarray, dict[int, str] | None, str | None]:
    """Labels, their status table (or None) and a warning (or None) for a ground truth file.

    Which statuses are used:

    1. the CSV, if it records the hash of exactly these labels;
    2. else the table embedded in the TIFF (always written with the labels, so a
       crash between the TIFF and the CSV write never pairs new labels with old
       statuses);
    3. else an old CSV without a hash (files written before the hash existed);
    4. else a CSV written for other labels, for the ids still present, with a warning
       to check them: the TIFF was then saved by another program (which drops the
       embedded table), e.g. after a small fix in Fiji, and dropping every status
       would throw the review work away.  The next save keeps that CSV
       (:func:`write_ground_truth`).

    Raises
    ------
    InputError
        If the labels cannot be read, or the CSV is unreadable, not UTF-8 or malformed.
    """
    path, csv_path = Path(path), Path(csv_path)
    labels = read_labels(path)
    digest = labels_sha256(labels)
    embedded = _embedded_status(path, digest)
    if not csv_path.exists():
        return labels, embedded, None
    try:
        text = csv_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{csv_path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{csv_path}: cannot be read ({exc.strerror or exc})") from None
    status, recorded = read_status_csv(text, str(csv_path))
    if recorded == digest:
        return labels, status, None
    if recorded is None and embedded is None:
        return labels, status, None
    if embedded is not None:
        why = "is older" if recorded is None else "belongs to other labels"
        return (
            labels,
            embedded,
            f"{csv_path.name} {why} than {path.name}: it was ignored and the statuses "
            f"saved inside {path.name} were used",
        )
    present = {int(i) for i in np.unique(labels)} - {0}
    taken = {i: s for i, s in status.items() if i in present}
    return (
        labels,
        taken,
        f"{csv_path.name} was written for other labels than {path.name} (changed by "
        f"another program?): its statuses of the {len(taken)} nuclei still present were "
        "loaded anyway; check them (saving keeps the old table as a .stale copy)",
    )
