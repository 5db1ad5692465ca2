"""Training data: folders of image/label pairs, rescaled to the canonical pixel size.

A data folder holds ``images/<id>.<ext>`` and ``labels/<id>.<ext>`` (paired by stem) and
optionally ``index.csv`` with an ``id`` column and, per row, ``pixel_size`` (µm/px),
``modality`` ('he' / 'fluorescence' / 'histology-stain') and ``split``. Rows whose
split is in ``exclude_splits`` are skipped, so the MoNuSeg 2018 test images are never
read for training. A folder may be given as ``PATH@PIXEL_SIZE`` to state the pixel
size of all its images.

Images without a pixel size are rescaled so that their median nucleus diameter (from
the labels) equals :data:`~napari_medinst.preprocess.CANONICAL_DIAMETER`.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.transform import rescale

from .._io import IMAGE_SUFFIXES, InputError, read_image, read_labels
from ..preprocess import (
    CANONICAL_DIAMETER,
    CANONICAL_PIXEL_SIZE,
    Modality,
    check_pixel_size,
    detect_modality,
    prepare_image,
    to_network_input,
)
from ..targets import relabel_sequential

__all__ = [
    "DEFAULT_EXCLUDE_SPLITS",
    "Sample",
    "find_pairs",
    "index_modality",
    "index_pixel_size",
    "load_folder",
    "parse_folder_spec",
    "read_index",
]

DEFAULT_EXCLUDE_SPLITS = frozenset({"MoNuSeg2018-test"})


@dataclass(eq=False)  # identity, not array comparison
class Sample:
    """One training image at the canonical pixel size."""

    name: str
    image: np.ndarray  # (3, H, W) float32 network input
    labels: np.ndarray  # (H, W) int32 sequential
    modality: Modality
    scale: float  # factor applied to the original image
    sha256: str
    group: str = ""  # the data folder it came from (validation is split per folder)
    label_path: str = ""  # the original label file (scores at the image's own pixels)


def parse_folder_spec(spec: str) -> tuple[Path, float | None]:
    """Split ``PATH@PIXEL_SIZE`` into a path and an optional pixel size.

    The pixel size must be a number in
    :data:`~napari_medinst.preprocess.PIXEL_SIZE_RANGE` (InputError naming ``spec``
    otherwise); an unusual one gives a
    :class:`~napari_medinst.preprocess.PixelSizeWarning`.
    """
    if "@" in spec:
        path, _, px = spec.rpartition("@")
        if not px.strip():
            raise InputError(f"{spec}: pixel size after '@' must be a number (µm/px)")
        return Path(path), check_pixel_size(px.strip(), spec)
    return Path(spec), None


def _index_text(index: Path) -> str:
    """``index.csv`` decoded as UTF-8 (a spreadsheet's BOM allowed), or InputError."""
    if not index.is_file():
        raise InputError(f"{index}: is not a file")
    data = index.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(
            f"{index}: not UTF-8 text (byte {exc.start}, line {line}); save it as UTF-8 CSV"
        ) from None


def read_index(folder: Path) -> dict[str, dict[str, str]]:
    """The rows of ``folder/index.csv`` by id (empty when there is no index).

    Raises
    ------
    InputError
        When the file is not UTF-8, not CSV, has no ``id`` column or repeats an id.
    """
    index = folder / "index.csv"
    if not index.exists():
        return {}
    reader = csv.DictReader(io.StringIO(_index_text(index), newline=""))
    rows: dict[str, dict[str, str]] = {}
    lines: dict[str, int] = {}
    try:
        if reader.fieldnames and "id" not in reader.fieldnames:
            raise InputError(f"{index}: needs an 'id' column")
        for row in reader:
            key = row["id"]
            if key in rows:
                raise InputError(
                    f"{index}: id {key!r} appears twice (lines {lines[key]} and "
                    f"{reader.line_num}); each image needs one row"
                )
            rows[key], lines[key] = row, reader.line_num
    except csv.Error as exc:
        raise InputError(f"{index}: not a readable CSV (line {reader.line_num}: {exc})") from None
    return rows


def find_pairs(folder: Path) -> list[tuple[str, Path, Path]]:
    """(id, image path, label path) for every pair in ``folder/images`` and ``folder/labels``."""
    img_dir, lab_dir = folder / "images", folder / "labels"
    if not img_dir.is_dir() or not lab_dir.is_dir():
        raise InputError(f"{folder}: expected 'images/' and 'labels/' sub-folders")

    def by_stem(d: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for p in sorted(d.iterdir()):
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if p.stem in found:
                raise InputError(f"{p}: same name as {found[p.stem].name}; keep one of them")
            found[p.stem] = p
        return found

    images, labels = by_stem(img_dir), by_stem(lab_dir)
    missing = sorted(set(images) ^ set(labels))
    if missing:
        raise InputError(f"{folder}: images without labels or labels without images: {missing[:5]}")
    return [(k, images[k], labels[k]) for k in sorted(images)]


def median_diameter(labels: np.ndarray) -> float:
    """Median equivalent-circle diameter (px) of the nuclei in ``labels`` (0 if none)."""
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    return float(np.median(2.0 * np.sqrt(areas / np.pi))) if areas.size else 0.0


_UNKNOWN = frozenset({"", "na", "n/a", "nan", "none", "null", "unknown", "?", "-"})


def index_pixel_size(row: dict[str, str], index: Path, key: str) -> float | None:
    """The row's ``pixel_size`` (µm/px), None when empty or marked unknown ("NA", ...);
    any other value that is not a size is refused with a message naming the row.

    The range is wider than a user-typed pixel size's: fine-tuning writes sizes it
    estimated from the nuclei into the index of the sets it stages.
    """
    text = (row.get("pixel_size") or "").strip()
    if text.lower() in _UNKNOWN:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.01 <= value <= 50:  # (NaN fails too)
        raise InputError(f"{index}: row {key}: pixel_size {text!r} is not a size in µm/px")
    return value


#: ``modality`` column values read as each modality (lower case); any other value, or
#: none, leaves the decision to the image (RGB: H&E, single channel: fluorescence).
MODALITY_NAMES: dict[str, Modality] = {
    "fluorescence": "fluorescence",
    "he": "he",
    "h&e": "he",
    "histology-stain": "he",
    "brightfield": "he",
}


def index_modality(row: dict[str, str]) -> Modality | None:
    """The modality an index row names, or None when it names none we know."""
    return MODALITY_NAMES.get((row.get("modality") or "").strip().lower())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_folder(
    spec: str | Path,
    exclude_splits: frozenset[str] = DEFAULT_EXCLUDE_SPLITS,
) -> list[Sample]:
    """Load every usable image/label pair of a data folder at the canonical scale."""
    folder, folder_px = parse_folder_spec(str(spec))
    index = read_index(folder)
    samples = []
    for key, img_path, lab_path in find_pairs(folder):
        row = index.get(key, {})
        if row.get("split", "") in exclude_splits:
            continue
        image = prepare_image(read_image(img_path), name=str(img_path))  # (NaN, shape: named)
        labels = read_labels(lab_path)
        if image.shape[:2] != labels.shape:
            raise InputError(
                f"{img_path}: image {image.shape[:2]} and labels {labels.shape} differ"
            )
        modality = index_modality(row) or detect_modality(image)
        px = index_pixel_size(row, folder / "index.csv", key) or folder_px
        labels, _ = relabel_sequential(labels)
        if px is not None:
            scale = px / CANONICAL_PIXEL_SIZE
        else:
            d = median_diameter(labels)
            scale = CANONICAL_DIAMETER / d if d > 0 else 1.0
        net_in = to_network_input(image, modality)
        if not np.isclose(scale, 1.0):
            net_in = rescale(net_in, (1, scale, scale), order=1, anti_aliasing=scale < 1)
            net_in = net_in.astype(np.float32)
            labels = rescale(labels, scale, order=0, anti_aliasing=False, preserve_range=True)
            labels, _ = relabel_sequential(labels.astype(np.int32))
        samples.append(
            Sample(
                name=f"{folder.name}/{key}",
                group=str(folder.resolve()),
                image=np.ascontiguousarray(net_in, np.float32),
                labels=labels.astype(np.int32),
                modality=modality,
                scale=float(scale),
                sha256=_sha256(img_path)[:16] + _sha256(lab_path)[:16],
                label_path=str(lab_path),
            )
        )
    if not samples:
        raise InputError(f"{folder}: no usable image/label pairs")
    return samples
