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

from ._io import InputError, check_labels, free_name, write_bytes, write_tiff
from .preprocess import prepare_image
from .targets import make_targets, relabel_sequential

__all__ = ["ExportResult", "export_sample"]

INDEX_FIELDS = ["id", "height", "width", "channels", "n_nuclei", "pixel_size", "modality", "split"]


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


def _unique_id(folder: Path, base: str) -> str:
    taken = {p.stem for p in (folder / "images").glob("*")} | {
        p.stem for p in (folder / "labels").glob("*")
    }
    return free_name(base, taken, "{base}-{k}")


def _sha(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _append_index(folder: Path, row: dict) -> None:
    path = folder / "index.csv"
    rows, fields = [], list(INDEX_FIELDS)
    if path.exists():
        with path.open(newline="", encoding="utf-8-sig") as fh:  # (a spreadsheet's BOM)
            reader = csv.DictReader(fh)
            rows = list(reader)
            # keep every column already there (organ, cell line, ...), add ours after
            fields = list(reader.fieldnames or []) + [
                f for f in INDEX_FIELDS if f not in (reader.fieldnames or [])
            ]
    rows.append(row)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(path, buf.getvalue().encode(), overwrite=True)


def _append_manifest(folder: Path, entry: dict) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text()) if path.exists() else {"samples": []}
    data["samples"].append(entry)
    write_bytes(path, json.dumps(data, indent=2).encode(), overwrite=True)


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
    """Append one image/label pair to the training set in ``folder``.

    Parameters
    ----------
    verified_ids : iterable of int, optional
        When given, only these nuclei are exported (see the module docstring).
    """
    img = prepare_image(image, name="image")
    lab = check_labels(labels, name="ground truth")
    if img.shape[:2] != lab.shape:
        raise InputError(
            f"image {img.shape[:2]} and ground truth {lab.shape} have different shapes"
        )
    if not lab.any():
        raise InputError("ground truth is empty: nothing to export")
    r0, c0, r1, c1 = 0, 0, *lab.shape
    if verified_ids is not None:
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
        lab = np.where(keep, lab, 0)
    img, lab = img[r0:r1, c0:c1], lab[r0:r1, c0:c1]
    lab, _ = relabel_sequential(lab)
    lab = lab.astype(np.uint32)
    folder = Path(folder)
    for sub in ("images", "labels", "targets"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    sid = _unique_id(folder, _safe_id(name))
    t = make_targets(lab)
    targets = np.concatenate(
        [t.foreground[None].astype(np.float32), t.hv, t.contour[None].astype(np.float32)]
    )
    ipath = write_tiff(folder / "images" / f"{sid}.tif", img)
    lpath = write_tiff(folder / "labels" / f"{sid}.tif", lab)
    write_tiff(folder / "targets" / f"{sid}.tif", targets)
    n = int(lab.max())
    _append_index(
        folder,
        {
            "id": sid,
            "height": lab.shape[0],
            "width": lab.shape[1],
            "channels": 1 if img.ndim == 2 else img.shape[2],
            "n_nuclei": n,
            "pixel_size": "" if pixel_size is None else f"{pixel_size:g}",
            "modality": modality or "",
            "split": "user",
        },
    )
    _append_manifest(
        folder,
        {
            "id": sid,
            "source": source or name,
            "region": [int(r0), int(c0), int(r1), int(c1)],
            "pixel_size": pixel_size,
            "modality": modality,
            "n_nuclei": n,
            "verified_only": verified_ids is not None,
            "sha256": {"image": _sha(img), "labels": _sha(lab)},
        },
    )
    return ExportResult(sid, ipath, lpath, n, (int(r0), int(c0), int(r1), int(c1)))
