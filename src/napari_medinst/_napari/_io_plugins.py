"""npe2 reader and writer contributions: GeoJSON nuclei in, Labels out to GeoJSON/OME-Zarr/TIFF.

Reader
    ``*.geojson`` (and ``*.json`` holding a ``FeatureCollection``) opens as a Labels layer
    whose ``features`` come from the file (id, uuid, status, type, name, objectType and
    the measurements). npe2 readers do not see the viewer, so the grid is taken from an
    image of the same stem beside the file (``tile.geojson`` -> ``tile.tif``, ``.tiff``,
    ``.png``, ``.jpg``), else from the bounding box of the features. The outlines as a
    Shapes layer instead: File ▸ IO Utilities ▸ *Open GeoJSON as shapes* (or
    :func:`read_geojson_shapes`). (It is not a second reader contribution: npe2 picks among one plugin's readers of
    the same pattern in no fixed order, so File ▸ Open would open Labels or Shapes by
    chance.)

Writers (one Labels layer, from File ▸ Save Selected Layers)
    ``.geojson`` polygons with the layer's status, type, uuid and measurements;
    ``.zarr`` OME-Zarr labels (inside the store when it is an OME-Zarr image);
    ``.tif``/``.tiff`` uint32 labels; ``.csv``/``.parquet`` the per-nucleus measurements.
    The pixel size comes from the layer's ``pixel_size_um`` metadata or its scale.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import napari.viewer
import numpy as np

from .._io import IMAGE_SUFFIXES, InputError, check_labels, read_image_info, write_tiff

_RESERVED = {"index", "label", "uuid", "status", "type", "name", "objectType", "plane", "feature",
             "color", "model", "model_version"}  # fmt: skip
_SNIFF_BYTES = 4096


# ---------------------------------------------------------------------------- reading


def _is_feature_collection(path: Path) -> bool:
    """Whether a ``.json`` file is a GeoJSON FeatureCollection or a bare list of Features."""
    try:
        with open(path, encoding="utf-8") as fh:
            head = fh.read(_SNIFF_BYTES).lstrip()
    except (OSError, UnicodeDecodeError):
        return False
    if head.startswith("{"):
        return re.search(r'"type"\s*:\s*"FeatureCollection"', head) is not None
    first = re.match(r'\[\s*\{[^{}\[\]]*?"type"\s*:\s*"Feature"', head)
    return first is not None


def _geojson_path(path) -> Path | None:
    if not isinstance(path, str | Path):
        return None  # a list of files: each one is opened on its own
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".geojson" or (suffix == ".json" and _is_feature_collection(p)):
        return p
    return None


def get_geojson_reader(path):
    """npe2 reader: a function opening ``path`` as Labels, or None when it is not GeoJSON."""
    return _read_as_labels if _geojson_path(path) is not None else None


def sibling_image(path: Path) -> Path | None:
    """The image of the same stem beside ``path``, if there is one."""
    for suffix in IMAGE_SUFFIXES:
        for cand in (path.with_suffix(suffix), path.with_suffix(suffix.upper())):
            if cand.is_file():
                return cand
    return None


def _grid(path: Path) -> tuple[tuple[int, int] | None, float | None]:
    """(Y, X) size and pixel size of the sibling image, or (None, None)."""
    image = sibling_image(path)
    if image is None:
        return None, None
    info = read_image_info(image)
    shape = tuple(n for n, a in zip(info.shape, info.axes, strict=True) if a in "YX")
    return (shape if len(shape) == 2 else None), info.pixel_size


def _table_features(table: list[dict]):
    """The import table as napari Labels features (``index`` = label id)."""
    import pandas as pd

    rows = []
    for row in table:
        flat = {k: v for k, v in row.items() if k not in ("measurements", "id", "_label")}
        flat = {"index": int(row["id"]), "label": int(row["id"]), **flat}
        flat.update(row.get("measurements") or {})
        rows.append(flat)
    return pd.DataFrame(rows)


def _read_as_labels(path) -> list[tuple[Any, dict, str]]:
    """Read leniently: bad features are skipped, counted in a warning and kept in
    ``metadata["import_problems"]``; the layer's ``translate`` is the region's offset."""
    from ..geojson import read_geojson

    p = Path(path)
    shape, px = _grid(p)
    result = read_geojson(p, shape, strict=False)
    metadata: dict[str, Any] = {"source_path": str(p), "import_problems": list(result.problems)}
    if px is not None:
        metadata["pixel_size_um"] = px
    if result.problems:
        from napari.utils.notifications import show_warning

        show_warning(f"{p.name}: {len(result.problems)} feature problem(s) (skipped or "
                     f"changed; see the layer's metadata['import_problems']): "
                     f"{result.problems[0]}")  # fmt: skip
    meta = {"name": p.stem, "features": _table_features(result.table), "metadata": metadata,
            "translate": tuple(float(v) for v in result.offset)}  # fmt: skip
    return [(np.asarray(result.labels), meta, "labels")]


def _rings(geometry: dict) -> list[np.ndarray]:
    """Exterior rings of a Polygon/MultiPolygon as (N, 2) arrays in (y, x)."""
    kind = (geometry or {}).get("type")
    coords = (geometry or {}).get("coordinates") or []
    polygons = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else []
    out = []
    for poly in polygons:
        ring = np.asarray(poly[0], float)[:, :2] if poly else np.zeros((0, 2))
        if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
            ring = ring[:-1]
        if len(ring) >= 3:
            out.append(ring[:, ::-1])
    return out


def _load_features(p: Path) -> list[dict]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{p}: not readable GeoJSON ({type(exc).__name__}: {exc})") from None
    feats = data.get("features") if isinstance(data, dict) else data
    if not isinstance(feats, list):
        raise InputError(f"{p}: not a GeoJSON FeatureCollection")
    return [f for f in feats if isinstance(f, dict)]


def read_geojson_shapes(path) -> list[tuple[Any, dict, str]]:
    """The outlines of a GeoJSON file as a Shapes layer-data tuple (polygons in (y, x))."""
    import pandas as pd

    p = Path(path)
    shapes, rows = [], []
    for k, feat in enumerate(_load_features(p), start=1):
        props = feat.get("properties") or {}
        cls = props.get("classification") or {}
        for ring in _rings(feat.get("geometry")):
            shapes.append(ring)
            rows.append(
                {
                    "feature": k,
                    "uuid": str(feat.get("id", "")),
                    "name": str(props.get("name", "")),
                    "type": str(cls.get("name", "")) if isinstance(cls, dict) else "",
                    "objectType": str(props.get("objectType", "")),
                }
            )
    meta = {
        "name": p.stem,
        "shape_type": "polygon",
        "features": pd.DataFrame(rows),
        "metadata": {"source_path": str(p)},
        "edge_color": "yellow",
        "face_color": "transparent",
    }
    return [(shapes, meta, "shapes")]


# ---------------------------------------------------------------------------- writing


class LayerWriteError(RuntimeError):
    """A layer cannot be written; the message says why (one line, naming the file).

    Not a ValueError: napari reads a writer's ValueError as "no writer for this path"
    and would hide the reason.
    """


def _user_errors(write):
    """Re-raise the writers' InputError / FileExistsError as :class:`LayerWriteError`."""

    @functools.wraps(write)
    def wrapper(path: str, data: Any, meta: dict) -> list[str]:
        try:
            return write(path, data, meta)
        except (InputError, FileExistsError) as exc:
            raise LayerWriteError(str(exc)) from exc

    return wrapper


#: Largest labels layer (pixels of its level 0) a writer loads into memory: a whole-slide
#: result is far larger and is refused (as GeoJSON it is exported chunk by chunk).
MAX_WRITE_PIXELS = 200_000_000


def _slide_store(meta: dict) -> Path | None:
    """The ``segment-slide`` store a layer shows (opened by our reader), or None."""
    store = (meta.get("metadata") or {}).get("slide_result")
    return Path(store) if store else None


def _labels_2d(path: str, data, meta: dict) -> np.ndarray:
    arr = data[0] if meta.get("multiscale") else data
    n = int(np.prod(np.shape(arr)[-2:])) if np.ndim(arr) >= 2 else 0
    if n > MAX_WRITE_PIXELS:
        h, w = np.shape(arr)[-2:]
        how = ("save it as .geojson (exported chunk by chunk) or use the store itself"
               if _slide_store(meta) else "crop a region first")  # fmt: skip
        raise InputError(f"{path}: layer {meta.get('name', '')!r} is {w}x{h} px, too large "
                         f"to load for this format; {how}")  # fmt: skip
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise InputError(f"{path}: only a 2-D Labels layer can be saved this way, got {arr.shape}")
    return check_labels(arr, name=f"{path}: layer {meta.get('name', '')!r}")


def pixel_size_of(meta: dict) -> float | None:
    """µm/px of a layer from its ``pixel_size_um`` metadata, else a non-unit scale."""
    md = meta.get("metadata") or {}
    value = md.get("pixel_size_um")
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return None if md.get("pixel_size_estimated") else float(value)
    scale = meta.get("scale")
    s = float(scale[-1]) if scale is not None and len(scale) else 1.0
    if math.isclose(s, 1.0) or s <= 0 or not math.isfinite(s):
        return None
    units = meta.get("units")
    try:
        unit = units[-1]
        if unit.dimensionality == {"[length]": 1}:
            return float((s * unit).to("micrometer").magnitude)
    except (AttributeError, IndexError, TypeError, ValueError):
        pass
    return s


def _features(meta: dict):
    """The layer's features with a ``label`` column (from ``index`` when needed), or None."""
    feats = meta.get("features")
    if feats is None or len(feats) == 0:
        return None
    feats = feats.copy()
    if "label" not in feats:
        if "index" not in feats:
            return None
        feats["label"] = feats["index"]
    return feats


def offset_of(meta: dict) -> tuple[int, int]:
    """(row, col) in level-0 pixels of a layer's top-left pixel: round(translate / scale)."""
    translate = meta.get("translate")
    if translate is None or len(translate) < 2:
        return (0, 0)
    scale = meta.get("scale")
    scale = [1.0, 1.0] if scale is None or len(scale) < 2 else list(scale)[-2:]
    out = []
    for t, s in zip(list(translate)[-2:], scale, strict=True):
        s = float(s) if s and math.isfinite(float(s)) else 1.0
        out.append(round(float(t) / s) if math.isfinite(float(t)) else 0)
    return out[0], out[1]


def _object_types(feats) -> dict[int, str] | None:
    """Label -> ``annotation``/``detection`` from an ``objectType`` column (cells: detections)."""
    kinds = _by_label(feats, "objectType")
    if not kinds:
        return None
    return {k: "annotation" if v == "annotation" else "detection" for k, v in kinds.items()}


def _models(feats) -> dict[int, dict] | None:
    names, versions = _by_label(feats, "model") or {}, _by_label(feats, "model_version") or {}
    return {k: {"name": str(v), "version": versions.get(k)} for k, v in names.items()} or None


def _missing(value) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _by_label(feats, column: str) -> dict[int, Any] | None:
    """``{label: value}`` of a features column, without empty cells."""
    if feats is None or column not in feats:
        return None
    out = {}
    for lab, value in zip(feats["label"], feats[column], strict=True):
        if not _missing(value):
            out[int(lab)] = value.item() if isinstance(value, np.generic) else value
    return out or None


def _type_names(feats) -> dict[int, tuple] | None:
    """``{type number: (class name, colour)}`` from the ``type``/``name``/``color`` columns."""
    if feats is None or "type" not in feats or "name" not in feats:
        return None
    colours = feats["color"] if "color" in feats else [None] * len(feats)
    out = {}
    for t, name, colour in zip(feats["type"], feats["name"], colours, strict=True):
        if not _missing(t) and int(t) > 0 and not _missing(name):
            out[int(t)] = (str(name), None if _missing(colour) else tuple(colour))
    return out or None


def _measurements(feats) -> dict[int, dict[str, float]] | None:
    """Numeric feature columns as GeoJSON measurements (QuPath names)."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    from ..geojson import measurements_from_columns

    if feats is None:
        return None
    cols = [
        c
        for c in feats
        if c not in _RESERVED and is_numeric_dtype(feats[c]) and not is_bool_dtype(feats[c])
    ]
    if not cols:
        return None
    return measurements_from_columns({"label": feats["label"].to_numpy(),
                                      **{c: feats[c].to_numpy() for c in cols}})  # fmt: skip


@_user_errors
def write_labels_geojson(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 writer: a Labels layer to GeoJSON polygons (QuPath detections).

    A whole-slide result is exported from its store, chunk by chunk
    (:func:`napari_medinst.slide_export.export_geojson`), never loaded whole.
    """
    from ..geojson import write_geojson

    store = _slide_store(meta)
    if store is not None:
        from ..slide_export import export_geojson

        export_geojson(store, path, overwrite=True)
        return [str(path)]
    labels = _labels_2d(path, data, meta)
    feats = _features(meta)
    kwargs = {
        "status": _by_label(feats, "status"),
        "types": {k: int(v) for k, v in (_by_label(feats, "type") or {}).items()},
        "type_names": _type_names(feats),
        "ids": _by_label(feats, "uuid"),
        "measurements": _measurements(feats),
        "object_types": _object_types(feats),
        "models": _models(feats),
    }
    write_geojson(path, labels, overwrite=True, offset=offset_of(meta),
                  **{k: v for k, v in kwargs.items() if v})  # fmt: skip
    return [str(path)]


def _is_zarr_store(p: Path) -> bool:
    return any((p / n).exists() for n in (".zgroup", ".zattrs", "zarr.json"))


@_user_errors
def write_labels_omezarr(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 writer: a Labels layer to OME-Zarr labels (inside an OME-Zarr image if ``path`` is one)."""
    from ..omezarr import write_labels_zarr

    p = Path(path)
    labels = _labels_2d(path, data, meta)
    if p.exists() and not (p.is_dir() and _is_zarr_store(p)):
        raise InputError(f"{p}: exists and is not a zarr store; choose another name")
    feats = _features(meta)
    props = None
    if feats is not None:
        props = {c: feats[c].to_numpy() for c in feats if c != "index"}
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(meta.get("name") or "")).strip("._") or "nuclei"
    write_labels_zarr(p, labels, name=name, pixel_size=pixel_size_of(meta), properties=props,
                      overwrite=True, offset=offset_of(meta))  # fmt: skip
    return [str(p)]


@_user_errors
def write_labels_tiff(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 writer: a Labels layer to a uint32 TIFF."""
    labels = _labels_2d(path, data, meta)
    if labels.size and labels.max() >= 2**32:
        raise InputError(f"{path}: label ids above 2**32 - 1 do not fit a uint32 TIFF")
    write_tiff(path, labels.astype(np.uint32, copy=False), overwrite=True)
    return [str(path)]


@_user_errors
def write_labels_table(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 writer: the per-nucleus measurements of a Labels layer as CSV or Parquet."""
    from ..measure import as_features, measure_nuclei, write_table

    labels = _labels_2d(path, data, meta)
    cols = measure_nuclei(labels, pixel_size=pixel_size_of(meta))
    table = as_features(cols, _features(meta)).drop(columns=["index"])
    write_table(path, {c: table[c].to_numpy() for c in table}, overwrite=True)
    return [str(path)]


# ------------------------------------------------------------------ menu command


def open_geojson_as_shapes(viewer: napari.viewer.Viewer, path: str | None = None) -> list:
    """File ▸ IO Utilities ▸ Open GeoJSON as shapes: the outlines of a GeoJSON file as
    editable polygons (a Shapes layer) instead of a Labels layer.

    ``path`` is asked for with a file dialog when not given. Returns the added layers.
    """
    from napari.layers import Layer
    from napari.utils.notifications import show_error

    if path is None:
        from qtpy.QtWidgets import QFileDialog

        name, _ = QFileDialog.getOpenFileName(
            None, "Open GeoJSON as shapes", "", "GeoJSON (*.geojson *.json)"
        )
        if not name:
            return []
        path = name
    try:
        tuples = read_geojson_shapes(path)
    except (InputError, OSError, ValueError) as exc:
        show_error(f"{path}: {exc}")
        return []
    return [viewer.add_layer(Layer.create(*t)) for t in tuples]
