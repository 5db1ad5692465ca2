"""Training data: folders of image/label pairs, rescaled to the canonical pixel size.

A data folder holds ``images/<id>.<ext>`` and ``labels/<id>.<ext>`` (paired by stem) and
optionally ``index.csv`` with an ``id`` column and, per row, ``pixel_size`` (µm/px),
``modality`` ('he' / 'fluorescence' / 'histology-stain') and ``split``. Rows whose
split is in ``exclude_splits`` are skipped, so the MoNuSeg 2018 test images are never
read for training. A folder may be given as ``PATH@PIXEL_SIZE`` to state the pixel
size of all its images.

Images without a pixel size are rescaled so that their median nucleus diameter (from
the labels) equals :data:`~napari_medinst.preprocess.CANONICAL_DIAMETER`.

Nucleus types: a folder with ``types/<id>.tif`` (the class of every nucleus pixel,
0 = background) gives each sample a per-instance class table. A folder whose index has
``tile``, ``y0`` and ``x0`` columns and whose ``nuclei.csv`` maps each patch label to a
``tile_label`` holds overlapping patches cut from larger tiles (CoNSeP as distributed by
HoVer-Net's patch extractor): its patches are put back together into their tiles, so a
nucleus cut by a patch border is one whole nucleus again and the validation split
falls by tile, never by patch.
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
from ..class_metrics import type_table
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
    #: per-instance class (index = label id, 0 = background), None when not typed
    types: np.ndarray | None = None
    label_source: str = ""  # the index's ``label_source`` column (annotation convention)
    #: a mosaic's labels and type map at its own pixels (it has no single label file)
    native: tuple[np.ndarray, np.ndarray] | None = None  # (labels, types per pixel) of a mosaic


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


def _type_table(labels: np.ndarray, type_map: np.ndarray, where: str) -> np.ndarray:
    """Per-instance class (index = label id) from a per-pixel type map."""
    try:
        return type_table(labels, type_map)
    except ValueError as exc:
        raise InputError(f"{where}: {exc}") from None


def _mosaic_tiles(folder: Path, index: dict[str, dict[str, str]], pairs, exclude_splits):
    """Put the overlapping patches of each tile back together.

    Yields ``(tile, image, labels, type_map or None, first patch row)``; labels carry
    ``tile_label`` ids from ``nuclei.csv`` so a nucleus seen in several patches is one.
    """
    table = folder / "nuclei.csv"
    tile_label: dict[tuple[str, int], int] = {}
    reader = csv.DictReader(io.StringIO(_index_text(table), newline=""))
    try:
        for row in reader:
            tile_label[(row["id"], int(row["label"]))] = int(row["tile_label"])
    except (KeyError, ValueError, csv.Error) as exc:
        raise InputError(f"{table}: needs id, label and tile_label columns ({exc})") from None
    by_tile: dict[str, list] = {}
    for key, img_path, lab_path in pairs:
        row = index.get(key)
        if row is None or row.get("split", "") in exclude_splits:
            continue
        by_tile.setdefault(row["tile"], []).append((key, img_path, lab_path, row))
    for tile, parts in sorted(by_tile.items()):
        loaded = []
        for key, img_path, lab_path, row in parts:
            try:
                y0, x0 = int(row["y0"]), int(row["x0"])
            except ValueError:
                raise InputError(
                    f"{folder / 'index.csv'}: row {key}: y0 / x0 must be whole numbers"
                ) from None
            image = prepare_image(read_image(img_path), name=str(img_path))
            labels = read_labels(lab_path)
            tpath = folder / "types" / lab_path.name
            types = read_labels(tpath) if tpath.is_file() else None
            lut = np.zeros(int(labels.max()) + 1, np.int32)
            for lab in np.unique(labels[labels > 0]):
                if (key, int(lab)) not in tile_label:
                    raise InputError(f"{table}: no tile_label for {key} label {lab}")
                lut[lab] = tile_label[(key, int(lab))]
            loaded.append((y0, x0, image, lut[labels], types))
        h = max(y0 + im.shape[0] for y0, _, im, _, _ in loaded)
        w = max(x0 + im.shape[1] for _, x0, im, _, _ in loaded)
        image = np.zeros((h, w, *loaded[0][2].shape[2:]), loaded[0][2].dtype)
        labels = np.zeros((h, w), np.int32)
        typed = all(t is not None for *_, t in loaded)
        type_map = np.zeros((h, w), np.uint8) if typed else None
        for y0, x0, im, lab, t in loaded:
            sl = np.s_[y0 : y0 + im.shape[0], x0 : x0 + im.shape[1]]
            image[sl] = im
            labels[sl] = lab
            if type_map is not None:
                type_map[sl] = t
        files = [p[1] for p in parts] + [p[2] for p in parts]
        yield tile, image, labels, type_map, parts[0][3], files, True


def load_folder(
    spec: str | Path,
    exclude_splits: frozenset[str] = DEFAULT_EXCLUDE_SPLITS,
) -> list[Sample]:
    """Load every usable image/label pair of a data folder at the canonical scale."""
    folder, folder_px = parse_folder_spec(str(spec))
    index = read_index(folder)
    samples = []
    for key, image, labels, type_map, row, files, mosaic in _items(folder, index, exclude_splits):
        if image.shape[:2] != labels.shape:
            raise InputError(
                f"{files[0]}: image {image.shape[:2]} and labels {labels.shape} differ"
            )
        modality = index_modality(row) or detect_modality(image)
        px = index_pixel_size(row, folder / "index.csv", key) or folder_px
        labels, _ = relabel_sequential(labels)
        types = None if type_map is None else _type_table(labels, type_map, str(files[-1]))
        # a mosaic has no single label file to score on, and types are scored on the
        # image's own pixels
        native = (labels, type_map) if mosaic or type_map is not None else None
        if px is not None:
            scale = px / CANONICAL_PIXEL_SIZE
        else:
            d = median_diameter(labels)
            scale = CANONICAL_DIAMETER / d if d > 0 else 1.0
        net_in = to_network_input(image, modality)
        if not np.isclose(scale, 1.0):
            net_in = rescale(net_in, (1, scale, scale), order=1, anti_aliasing=scale < 1)
            net_in = net_in.astype(np.float32)
            small = rescale(labels, scale, order=0, anti_aliasing=False, preserve_range=True)
            small = small.astype(np.int32)
            if types is not None:  # ids survive nearest-neighbour rescaling: keep the classes
                kept = np.unique(small)
                types = _compact_types(types, kept)
            labels, _ = relabel_sequential(small)
        digest = hashlib.sha256()
        for f in files:
            digest.update(_sha256(f).encode())
        samples.append(
            Sample(
                name=f"{folder.name}/{key}",
                group=str(folder.resolve()),
                image=np.ascontiguousarray(net_in, np.float32),
                labels=labels.astype(np.int32),
                modality=modality,
                scale=float(scale),
                sha256=digest.hexdigest()[:32],
                label_path="" if mosaic else str(files[1]),
                types=types,
                label_source=(row.get("label_source") or "").strip(),
                native=native,
            )
        )
    if not samples:
        raise InputError(f"{folder}: no usable image/label pairs")
    return samples


def _compact_types(types: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The class table after ``relabel_sequential`` keeps the sorted ids ``kept``."""
    kept = kept[kept > 0]
    out = np.zeros(kept.size + 1, np.uint8)
    out[1:] = types[kept]
    return out


def _items(folder: Path, index: dict[str, dict[str, str]], exclude_splits):
    """(key, image, labels, type map or None, index row, source files, is a mosaic) per
    training item."""
    pairs = find_pairs(folder)
    columns = set(next(iter(index.values()), {}))
    if {"tile", "y0", "x0"} <= columns and (folder / "nuclei.csv").is_file():
        yield from _mosaic_tiles(folder, index, pairs, exclude_splits)
        return
    for key, img_path, lab_path in pairs:
        row = index.get(key, {})
        if row.get("split", "") in exclude_splits:
            continue
        image = prepare_image(read_image(img_path), name=str(img_path))  # (NaN, shape: named)
        labels = read_labels(lab_path)
        tpath = folder / "types" / lab_path.name
        type_map = read_labels(tpath) if tpath.is_file() else None
        files = [img_path, lab_path] + ([tpath] if type_map is not None else [])
        yield key, image, labels, type_map, row, files, False
