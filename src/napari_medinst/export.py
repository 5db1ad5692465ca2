"""Training-set export: write image + ground truth in the layout the trainer reads.

Layout (the same as ``../shared/data``)::

    SET_DIR/
      images/<id>.tif       the image (uint8/uint16 grey or RGB)
      labels/<id>.tif       uint32 instance labels, 0 = background
      targets/<id>.tif      derived targets for inspection: foreground, H, V, contour
      index.csv             id, height, width, channels, n_nuclei, pixel_size, modality, split
      manifest.json         per sample: source image, region, pixel size, sha256 of files

Appending never overwrites: an id that exists gets a numeric suffix. With
``verified_only`` only nuclei whose status is ``verified`` are kept and the image is
cropped to their bounding box (plus a margin); everything outside the verified nuclei
inside that crop is left as it is but unlabelled nuclei there would teach the model
wrong background, so the crop is limited to the verified region and pixels of
unverified nuclei are set to the median background colour.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._io import (
    InputError,
    Writer,
    bytes_writer,
    check_labels,
    free_name,
    os_error_reason,
    remove_stale_parts,
    staging_folder,
    tiff_writer,
    write_group,
)
from .preprocess import prepare_image
from .targets import make_targets, relabel_sequential

__all__ = ["ExportResult", "export_sample"]

INDEX_FIELDS = ["id", "height", "width", "channels", "n_nuclei", "pixel_size", "modality", "split"]
SUBFOLDERS = ("images", "labels", "targets")


@dataclass(frozen=True)
class ExportResult:
    sample_id: str
    image_path: Path
    labels_path: Path
    n_nuclei: int
    region: tuple[int, int, int, int]  # row0, col0, row1, col1 in the source image


def _safe_id(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "sample"
    return clean[:80]


def _sha(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


# ---------------------------------------------------------------- checks (nothing written)


def _check_folder(folder: Path) -> None:
    """The set folder and its sub-folders are folders where they exist."""
    for path in (folder, *(folder / sub for sub in SUBFOLDERS)):
        if path.exists() and not path.is_dir():
            raise InputError(f"{path}: is a file; the training set needs a folder here")


def _read_text(path: Path) -> str | None:
    """The text of a UTF-8 file (a spreadsheet's BOM dropped), None if it does not exist."""
    if not path.exists():
        return None
    if not path.is_file():
        raise InputError(f"{path}: is not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({os_error_reason(exc)})") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not UTF-8 (byte {exc.start}); save it as UTF-8 and export again"
        ) from exc


def _read_index(folder: Path) -> tuple[list[str], list[dict]]:
    """Columns and rows of ``index.csv``; checked: a header with ``id``, unique ids."""
    path = folder / "index.csv"
    text = _read_text(path)
    if text is None:
        return list(INDEX_FIELDS), []
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    except csv.Error as exc:
        raise InputError(f"{path}: not a readable CSV file ({exc})") from exc
    if not fields:
        raise InputError(f"{path}: has no header row (expected {','.join(INDEX_FIELDS)})")
    if "id" not in fields:
        raise InputError(f"{path}: the header has no 'id' column ({','.join(fields)})")
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        sid = row.get("id") or ""
        if sid in seen:
            raise InputError(f"{path}: id {sid!r} appears twice (lines {seen[sid]} and {line})")
        seen[sid] = line
    # keep every column already there (organ, cell line, ...), add ours after
    return fields + [f for f in INDEX_FIELDS if f not in fields], rows


def _read_manifest(folder: Path) -> dict:
    """``manifest.json``, checked: an object with a ``samples`` list of objects."""
    path = folder / "manifest.json"
    text = _read_text(path)
    if text is None:
        return {"samples": []}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from exc
    samples = data.get("samples") if isinstance(data, dict) else None
    if not isinstance(samples, list) or not all(isinstance(s, dict) for s in samples):
        raise InputError(
            f"{path}: unexpected structure; expected an object with a 'samples' list of objects"
        )
    return data


def _taken_ids(folder: Path, rows: list[dict], manifest: dict) -> set[str]:
    taken = {str(r.get("id") or "") for r in rows}
    taken |= {str(s.get("id") or "") for s in manifest["samples"]}
    for sub in SUBFOLDERS:
        if (folder / sub).is_dir():
            taken |= {p.stem for p in (folder / sub).iterdir()}
    return taken


# ------------------------------------------------------------------------ the sample


def _crop_to_verified(img, lab, verified_ids, margin):
    """Keep only the verified nuclei, crop to them (plus ``margin``), mask the others."""
    keep = np.isin(lab, np.fromiter(verified_ids, np.int64))
    if not keep.any():
        raise InputError("no verified nuclei to export; mark nuclei as verified first")
    rows, cols = np.flatnonzero(keep.any(1)), np.flatnonzero(keep.any(0))
    r0, r1 = max(0, rows[0] - margin), min(lab.shape[0], rows[-1] + 1 + margin)
    c0, c1 = max(0, cols[0] - margin), min(lab.shape[1], cols[-1] + 1 + margin)
    other = (lab > 0) & ~keep
    img = img.copy()
    if other.any():
        background = np.median(img[lab == 0], axis=0) if (lab == 0).any() else 0
        img[other] = background
    return img, np.where(keep, lab, 0), (int(r0), int(c0), int(r1), int(c1))


def _prepare(image, labels, verified_ids, margin):
    """Checked image and uint32 labels (cropped with ``verified_ids``) and the region."""
    img = prepare_image(image, name="image")
    lab = check_labels(labels, name="ground truth")
    if img.shape[:2] != lab.shape:
        raise InputError(
            f"image {img.shape[:2]} and ground truth {lab.shape} have different shapes"
        )
    if not lab.any():
        raise InputError("ground truth is empty: nothing to export")
    region = (0, 0, *lab.shape)
    if verified_ids is not None:
        img, lab, region = _crop_to_verified(img, lab, verified_ids, margin)
    r0, c0, r1, c1 = region
    lab, _ = relabel_sequential(lab[r0:r1, c0:c1])
    return img[r0:r1, c0:c1], lab.astype(np.uint32), region


def _target_stack(lab: np.ndarray) -> np.ndarray:
    t = make_targets(lab)
    return np.concatenate(
        [t.foreground[None].astype(np.float32), t.hv, t.contour[None].astype(np.float32)]
    )


def _index_bytes(fields: list[str], rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _commit(folder: Path, files: list[tuple[Path, Writer]]) -> None:
    """Write ``files`` via a staging folder in ``folder``; index and manifest may be replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(folder)  # what a killed export left
    with staging_folder(folder) as staging:
        write_group(
            files,
            overwrite={folder / "index.csv", folder / "manifest.json"},
            staging=staging,
        )


def export_sample(
    folder: str | Path,
    image: np.ndarray,
    labels: np.ndarray,
    *,
    name: str,
    pixel_size: float | None = None,
    modality: str | None = None,
    verified_ids: Iterable[int] | None = None,
    margin: int = 16,
    source: str = "",
) -> ExportResult:
    """Append one image/label pair to the training set in ``folder``: all of it or nothing.

    Everything is checked first (the arrays, an existing ``index.csv``: UTF-8 with a
    header and unique ids, an existing ``manifest.json``: valid JSON with a ``samples``
    list); then image, labels, targets, the new index and manifest are written into a
    staging folder inside ``folder`` and moved into place, index and manifest last.

    Parameters
    ----------
    verified_ids : iterable of int, optional
        When given, only these nuclei are exported (see the module docstring).

    Raises
    ------
    InputError
        Bad arrays, or an index/manifest that cannot be used; nothing was written.
    OSError
        Writing failed (e.g. disk full); nothing was changed in ``folder``.
    """
    img, lab, region = _prepare(image, labels, verified_ids, margin)
    folder = Path(folder)
    _check_folder(folder)
    fields, rows = _read_index(folder)
    manifest = _read_manifest(folder)
    sid = free_name(_safe_id(name), _taken_ids(folder, rows, manifest), "{base}-{k}")
    n = int(lab.max())
    rows.append(
        {
            "id": sid,
            "height": lab.shape[0],
            "width": lab.shape[1],
            "channels": 1 if img.ndim == 2 else img.shape[2],
            "n_nuclei": n,
            "pixel_size": "" if pixel_size is None else f"{pixel_size:g}",
            "modality": modality or "",
            "split": "user",
        }
    )
    manifest["samples"].append(
        {
            "id": sid,
            "source": source or name,
            "region": list(region),
            "pixel_size": pixel_size,
            "modality": modality,
            "n_nuclei": n,
            "verified_only": verified_ids is not None,
            "sha256": {"image": _sha(img), "labels": _sha(lab)},
        }
    )
    paths = {sub: folder / sub / f"{sid}.tif" for sub in SUBFOLDERS}
    files = [
        (paths["images"], tiff_writer(img)),
        (paths["labels"], tiff_writer(lab)),
        (paths["targets"], tiff_writer(_target_stack(lab))),
        (folder / "index.csv", bytes_writer(_index_bytes(fields, rows))),
        (folder / "manifest.json", bytes_writer(json.dumps(manifest, indent=2).encode())),
    ]
    _commit(folder, files)
    return ExportResult(sid, paths["images"], paths["labels"], n, region)
