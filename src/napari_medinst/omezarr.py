"""Instance labels as OME-Zarr (OME-NGFF 0.4 ``image-label``), written and read back.

Two layouts are written:

* **inside an image**: when ``path`` is an existing OME-Zarr image (its ``.zattrs`` has
  ``multiscales``), the labels go to ``<image>/labels/<name>`` with ``source.image`` =
  ``"../../"``, and ``<image>/labels/.zattrs`` lists them; other labels there are kept.
  The labels must have the image's Y and X size; the image's pixel size is used when
  none is given.
  A ``bioformats2raw`` store (root ``.zattrs`` ``bioformats2raw.layout``) is followed
  into its first image, ``0/``.
* **beside an image**: otherwise ``path`` becomes a new store whose root is a ``labels``
  group (``.zattrs`` ``{"labels": [name]}``, with the marker :data:`MARKER`) holding
  ``<name>``, the label image. Readers such as ``ome-zarr`` open it at its root.

An existing folder is replaced (with ``overwrite``) only when it is such a labels store
written by this package, and a label image inside an image only when this package wrote
it; any other folder (an image, a plate, another zarr group, not zarr) is refused.

The label image is a multiscale pyramid: level 0 is the labels, each further level takes
every second pixel of the one before (nearest neighbour, so ids are never blended) until
the larger side is under :data:`MIN_LEVEL_SIZE` pixels. ``coordinateTransformations`` give
each level's scale (µm when the pixel size is known) and, for a region of a slide, a
``translation`` to its top-left pixel. ``image-label`` carries a colour and
optional properties (e.g. the measurements of :mod:`napari_medinst.measure`) per label.

Writes are atomic: the label group is written into a temporary folder beside its
destination and renamed into place; nothing is replaced without ``overwrite=True``.
Writing and reading need the ``zarr`` package (``pip install 'napari-medinst[io]'``).
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._io import InputError, _part_prefix, check_labels, write_bytes

NGFF_VERSION = "0.4"
#: Pyramid levels are added while the larger side of the last one is at least this.
MIN_LEVEL_SIZE = 256
MAX_LEVELS = 12
CHUNK = 1024
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_INSTALL = "pip install 'napari-medinst[io]'"
#: Attribute key marking a group written by this package (root of a labels store, label image).
MARKER = "napari_medinst"


def _zarr():
    """The ``zarr`` module, or a clear message when it is not installed."""
    try:
        import zarr
    except ImportError:
        raise InputError(f"OME-Zarr needs the zarr package ({_INSTALL})") from None
    return zarr


def level_count(shape: tuple[int, ...], levels: int | None = None) -> int:
    """Number of pyramid levels: given, or halve until the larger side is < MIN_LEVEL_SIZE."""
    if levels is not None:
        if not isinstance(levels, int | np.integer) or not 1 <= levels <= MAX_LEVELS:
            raise InputError(f"levels: must be an integer from 1 to {MAX_LEVELS}, got {levels!r}")
        return int(levels)
    n, side = 1, max(shape)
    while side >= MIN_LEVEL_SIZE and n < MAX_LEVELS:
        side = math.ceil(side / 2)
        n += 1
    return n


def pyramid(labels: np.ndarray, levels: int) -> list[np.ndarray]:
    """Nearest-neighbour pyramid: level ``i`` is every ``2**i``-th pixel of ``labels``."""
    return [np.ascontiguousarray(labels[:: 2**i, :: 2**i]) for i in range(levels)]


def default_colours(ids) -> dict[int, tuple[int, int, int, int]]:
    """A distinct opaque RGBA colour (0-255) per id, the same for an id in every file."""
    out = {}
    for i in ids:
        hue = (int(i) * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
        out[int(i)] = (round(r * 255), round(g * 255), round(b * 255), 255)
    return out


def _json_value(value):
    """A JSON-safe copy: numpy scalars to Python, non-finite floats to None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _colour_list(colours: Mapping | None, ids: np.ndarray) -> list[dict]:
    colours = default_colours(ids) if colours is None else colours
    out = []
    for lab, rgba in colours.items():
        vals = [int(v) for v in rgba]
        if len(vals) == 3:
            vals.append(255)
        if len(vals) != 4 or not all(0 <= v <= 255 for v in vals):
            raise InputError(f"colours: label {lab}: expected RGB(A) values 0-255, got {rgba!r}")
        out.append({"label-value": int(lab), "rgba": vals})
    return out


def _property_list(properties) -> list[dict]:
    """``[{label-value, ...}]`` from ``{id: {key: value}}`` or columns with a ``label`` column."""
    if properties is None:
        return []
    if "label" in properties and not isinstance(properties["label"], Mapping):
        cols = {k: np.asarray(v) for k, v in properties.items()}
        rows = [
            {k: cols[k][i] for k in cols if k != "label"} | {"label-value": cols["label"][i]}
            for i in range(len(cols["label"]))
        ]
    else:
        rows = [dict(props) | {"label-value": lab} for lab, props in properties.items()]
    out = []
    for row in rows:
        item = {str(k): _json_value(v) for k, v in row.items()}
        item["label-value"] = int(row["label-value"])
        out.append(item)
    return out


def _multiscales(name: str, levels: int, pixel_size: float | None, offset=(0, 0)) -> list[dict]:
    unit = {} if pixel_size is None else {"unit": "micrometer"}
    base = 1.0 if pixel_size is None else float(pixel_size)
    move = []
    if any(int(v) for v in offset):  # the same for every level (level i = every 2**i-th px)
        move = [{"type": "translation", "translation": [int(v) * base for v in offset]}]
    datasets = [
        {
            "path": str(i),
            "coordinateTransformations": [{"type": "scale", "scale": [base * 2**i] * 2}, *move],
        }
        for i in range(levels)
    ]
    axes = [{"name": a, "type": "space", **unit} for a in ("y", "x")]
    return [{"version": NGFF_VERSION, "name": name, "axes": axes, "datasets": datasets}]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable OME-Zarr metadata ({exc})") from exc
    return data if isinstance(data, dict) else {}


def _write_label_group(folder: Path, levels: list[np.ndarray], attrs: dict) -> None:
    """Write the label image's arrays and attributes (zarr v2, ``/`` chunk keys) into ``folder``."""
    zarr = _zarr()
    group = zarr.open_group(str(folder), mode="w", zarr_format=2)
    for i, level in enumerate(levels):
        chunks = tuple(min(CHUNK, s) or 1 for s in level.shape)
        arr = group.create_array(
            str(i),
            shape=level.shape,
            dtype=level.dtype,
            chunks=chunks,
            chunk_key_encoding={"name": "v2", "separator": "/"},
        )
        arr[...] = level
    group.attrs.update(attrs)


def _staging(dest: Path) -> Path:
    # the package's temporary-name pattern: a killed write is cleaned up by the next run
    return Path(tempfile.mkdtemp(prefix=_part_prefix(dest.name), suffix=".part", dir=dest.parent))


def _place_folder(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Rename folder ``tmp`` to ``dest``; replace an existing ``dest`` only with ``overwrite``."""
    backup = None
    if os.path.lexists(dest):
        if not overwrite:
            raise FileExistsError(f"{dest}: already exists (pass overwrite=True to replace it)")
        backup = dest.with_name(f"{_part_prefix(dest.name)}old.part")
        os.rename(dest, backup)
    try:
        os.rename(tmp, dest)
    except OSError:
        if backup is not None:
            os.rename(backup, dest)
        raise
    if backup is not None:
        if backup.is_dir():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.unlink(backup)


def _image_grid(image: Path) -> tuple[tuple[int, ...], float | None]:
    """Level-0 Y, X size and pixel size (scale of the last axis) of an OME-Zarr image."""
    try:
        ms = _read_json(image / ".zattrs")["multiscales"][0]
        level0 = ms["datasets"][0]
        shape = tuple(_read_json(image / level0["path"] / ".zarray").get("shape", ()))
        scales = [t["scale"] for t in level0.get("coordinateTransformations", [])
                  if t.get("type") == "scale"]  # fmt: skip
        scale = float(scales[0][-1]) if scales else None
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise InputError(f"{image}: unreadable OME-Zarr multiscales ({exc!r})") from exc
    units = {a.get("unit") for a in ms.get("axes", [])[-2:] if isinstance(a, dict)}
    return shape[-2:], scale if units == {"micrometer"} else None


def _is_image(path: Path) -> bool:
    v3 = (path / "zarr.json").exists() and not (path / ".zgroup").exists()
    if v3 and "multiscales" in json.dumps(_read_json(path / "zarr.json")):
        raise InputError(
            f"{path}: OME-Zarr 0.5 (zarr v3) images are not supported; write the labels beside it"
        )
    return path.is_dir() and "multiscales" in _read_json(path / ".zattrs")


def _is_ours(path: Path) -> bool:
    """Whether ``path`` is a labels store this package wrote (its root has :data:`MARKER`)."""
    attrs = _read_json(path / ".zattrs") if path.is_dir() else {}
    return isinstance(attrs.get(MARKER), dict) and "labels" in attrs


def _target(path: Path) -> tuple[Path, bool]:
    """(where to write, whether it is inside an image), refusing folders that are not ours."""
    if os.path.isdir(path) and "bioformats2raw.layout" in _read_json(path / ".zattrs"):
        if not _is_image(path / "0"):
            raise InputError(f"{path}: a bioformats2raw store without an image 0/; not changed")
        return path / "0", True
    if _is_image(path):
        return path, True
    if not os.path.lexists(path) or _is_ours(path):
        return path, False
    attrs = _read_json(path / ".zattrs") if path.is_dir() else {}
    what = ("an OME-Zarr plate; write the labels into one of its images" if "plate" in attrs
            else "not a labels store written by napari-medinst")  # fmt: skip
    raise InputError(f"{path}: exists and is {what}; it was not changed (choose another name)")


def write_labels_zarr(
    path: str | os.PathLike,
    labels: np.ndarray,
    *,
    name: str = "nuclei",
    pixel_size: float | None = None,
    colours: Mapping | None = None,
    properties=None,
    levels: int | None = None,
    overwrite: bool = False,
    offset: tuple[int, int] = (0, 0),
) -> Path:
    """Write instance labels as an OME-NGFF 0.4 image-label with a pyramid.

    Parameters
    ----------
    path : path-like
        An existing OME-Zarr image (the labels go inside it), or a new ``.zarr`` folder.
    labels : ndarray
        2-D instance labels, 0 = background.
    name : str
        Name of the label image (a folder name: letters, digits, ``._-``).
    pixel_size : float, optional
        µm per pixel of level 0; default: the image's when writing inside one, else
        unknown (scales in pixels).
    colours : mapping, optional
        ``{id: (r, g, b[, a])}`` with values 0-255; default: a colour per id.
    properties : mapping, optional
        ``{id: {key: value}}``, or columns with a ``label`` column (as returned by
        :func:`napari_medinst.measure.measure_nuclei`).
    levels : int, optional
        Number of pyramid levels; default: halve until the larger side is < 256.
    overwrite : bool
        Whether an existing label image (or labels store) of that name, written by
        this package, may be replaced.
    offset : (int, int)
        (row, col) of the labels' top-left pixel in the slide (level 0), written as a
        ``translation`` when not (0, 0).

    Returns
    -------
    Path
        The label image's folder.

    Raises
    ------
    InputError
        Bad labels, name, colours, size mismatch with the image, zarr not installed, or
        ``path`` is a folder this package may not replace (an image's own label image of
        that name included).
    FileExistsError
        The destination exists and ``overwrite`` is False. Nothing was changed.
    """
    path = Path(path)
    lab = check_labels(labels, name=f"{path}: labels")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InputError(f"name: {name!r} is not a valid label name (letters, digits, ._-)")
    lab = lab.astype(np.uint32 if lab.size == 0 or lab.max() < 2**32 else np.uint64, copy=False)
    _zarr()
    offset = _check_offset(offset)
    path, inside = _target(path)
    extra = (colours, properties, levels, offset)
    if inside:
        return _write_inside(path, lab, name, pixel_size, extra, overwrite)
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging(path)
    try:
        _write_label_group(tmp / name, *_label_content(lab, name, pixel_size, extra, False))
        zarr = _zarr()
        root = zarr.open_group(str(tmp), mode="a", zarr_format=2)
        root.attrs.update({"labels": [name], MARKER: {"kind": "labels"}})
        _place_folder(tmp, path, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path / name


def _check_offset(offset) -> tuple[int, int]:
    try:
        row, col = (int(v) for v in offset)
    except (TypeError, ValueError):
        raise InputError(f"offset: expected (row, col) integers, got {offset!r}") from None
    return row, col


def _label_content(lab, name, pixel_size, extra, inside: bool):
    """The pyramid and the ``.zattrs`` of a label image (``extra``: colours, properties,
    levels, offset)."""
    colours, properties, levels, offset = extra
    if pixel_size is not None:
        from .preprocess import check_pixel_size

        pixel_size = check_pixel_size(pixel_size)
    ids = np.unique(lab)
    ids = ids[ids != 0]
    image_label = {
        "version": NGFF_VERSION,
        "colors": _colour_list(colours, ids),
        "properties": _property_list(properties),
    }
    if inside:
        image_label["source"] = {"image": "../../"}
    n = level_count(lab.shape, levels)
    return pyramid(lab, n), label_image_attrs(name, n, pixel_size, image_label, offset)


def label_image_attrs(name: str, levels: int, pixel_size: float | None,
                      image_label: dict | None = None, offset=(0, 0)) -> dict:  # fmt: skip
    """The ``.zattrs`` of a label image whose levels are those of :func:`pyramid`.

    Parameters
    ----------
    name : str
        Name of the label image.
    levels : int
        Number of levels (level ``i`` takes every ``2**i``-th pixel of level 0).
    pixel_size : float or None
        µm per pixel of level 0 (a checked value); None: scales in pixels.
    image_label : dict, optional
        Entries of ``image-label`` (``colors``, ``properties``, ``source``); its
        ``version`` is the one written here.
    offset : (int, int)
        (row, col) of level 0's top-left pixel, a ``translation`` when not (0, 0).

    Returns
    -------
    dict
        ``multiscales``, ``image-label`` and this package's marker.
    """
    label = {"version": NGFF_VERSION, **(image_label or {})}
    return {"multiscales": _multiscales(name, levels, pixel_size, offset),
            "image-label": label, MARKER: {"kind": "label-image"}}  # fmt: skip


def _write_inside(image, lab, name, pixel_size, extra, overwrite) -> Path:
    shape, image_px = _image_grid(image)
    if tuple(shape) != lab.shape:
        raise InputError(
            f"{image}: the image is {tuple(shape)} (Y, X) but the labels are {lab.shape}"
        )
    folder = image / "labels"
    dest = folder / name
    if os.path.lexists(dest) and not overwrite:
        raise FileExistsError(f"{dest}: already exists (pass overwrite=True to replace it)")
    if os.path.lexists(dest) and MARKER not in _read_json(dest / ".zattrs"):
        raise InputError(f"{dest}: label image not written by napari-medinst; it was not "
                         "replaced (choose another layer name)")  # fmt: skip
    attrs = _read_json(folder / ".zattrs")
    px = pixel_size if pixel_size is not None else image_px
    content = _label_content(lab, name, px, extra, True)
    folder.mkdir(exist_ok=True)
    if not (folder / ".zgroup").exists():
        write_bytes(folder / ".zgroup", b'{\n  "zarr_format": 2\n}', overwrite=True)
    tmp = _staging(dest)
    try:
        _write_label_group(tmp, *content)
        _place_folder(tmp, dest, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    names = [n for n in attrs.get("labels", []) if n != name] + [name]
    write_bytes(
        folder / ".zattrs", json.dumps(attrs | {"labels": names}, indent=2).encode(), overwrite=True
    )
    return dest


def _attrs(group) -> dict:
    attrs = dict(group.attrs)
    return attrs.get("ome", attrs) if isinstance(attrs.get("ome"), dict) else attrs


def _find_label_group(zarr, path: Path, name: str | None):
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:
        raise InputError(
            f"{path}: not a readable zarr store ({type(exc).__name__}: {exc})"
        ) from exc
    attrs = _attrs(group)
    if "image-label" in attrs:
        return group, attrs
    if "labels" not in attrs:
        if "labels" not in group:
            raise InputError(f"{path}: no OME-Zarr labels in it")
        group = group["labels"]
        attrs = _attrs(group)
    names = list(attrs.get("labels", []))
    if not names:
        raise InputError(f"{path}: its labels group lists no label images")
    pick = name if name is not None else names[0]
    if pick not in names or pick not in group:
        raise InputError(f"{path}: no label image {pick!r} (there are: {', '.join(names)})")
    return group[pick], _attrs(group[pick])


@dataclass
class ZarrLabels:
    """An OME-Zarr label image read back (see :func:`read_labels_zarr_table`).

    Attributes
    ----------
    labels : ndarray
        Level 0, 2-D.
    table : list of dict
        One row per ``image-label.properties`` entry: ``id`` (label), the known keys
        (``uuid``, ``status``, ``name``, ``type``, ``objectType``, ``model``,
        ``model_version``, ``color`` None) and the other numbers as ``measurements``.
    offset : (int, int)
        (row, col) of the top-left pixel, from level 0's ``translation`` and ``scale``.
    pixel_size : float or None
        µm per pixel when the axes are in micrometres.
    """

    labels: np.ndarray
    table: list[dict] = field(default_factory=list)
    offset: tuple[int, int] = (0, 0)
    pixel_size: float | None = None


_ROW_KEYS = ("uuid", "status", "name", "type", "objectType", "model", "model_version")


def _table_of(attrs: dict) -> list[dict]:
    """Rows of ``image-label.properties`` (entries without an integer label skipped)."""
    props = (attrs.get("image-label") or {}).get("properties") or []
    rows = []
    for item in props if isinstance(props, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("label-value"), int):
            continue
        row = {"id": int(item["label-value"]), "color": None, "measurements": {}}
        for key, value in item.items():
            if key in _ROW_KEYS:
                row[key] = value
            elif key not in ("label-value", "label", "index") and _is_number(value):
                row["measurements"][key] = float(value)
        row.setdefault("type", 0)
        rows.append({k: row.get(k) for k in ("id", *_ROW_KEYS, "color", "measurements")})
    return rows


def _is_number(value) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))  # fmt: skip


def _placement(attrs: dict) -> tuple[tuple[int, int], float | None]:
    """(offset in pixels, µm/px) from level 0's coordinateTransformations."""
    try:
        ms = attrs["multiscales"][0]
        moves = ms["datasets"][0].get("coordinateTransformations", [])
        scale = next(t["scale"] for t in moves if t.get("type") == "scale")[-2:]
        shift = next((t["translation"] for t in moves if t.get("type") == "translation"),
                     [0.0, 0.0])[-2:]  # fmt: skip
        offset = tuple(round(float(t) / float(s)) for t, s in zip(shift, scale, strict=True))
        units = {a.get("unit") for a in ms.get("axes", [])[-2:] if isinstance(a, dict)}
    except (KeyError, IndexError, TypeError, ValueError, StopIteration, ZeroDivisionError):
        return (0, 0), None
    px = float(scale[-1]) if units == {"micrometer"} else None
    return (int(offset[0]), int(offset[1])), px


def read_labels_zarr_table(path: str | os.PathLike, name: str | None = None) -> ZarrLabels:
    """Read an OME-Zarr label image with its properties table, offset and pixel size.

    Parameters and errors are those of :func:`read_labels_zarr`.
    """
    path = Path(path)
    zarr = _zarr()
    if not path.is_dir():
        raise InputError(f"{path}: no such OME-Zarr folder")
    if "bioformats2raw.layout" in _read_json(path / ".zattrs") and (path / "0").is_dir():
        path = path / "0"
    group, attrs = _find_label_group(zarr, path, name)
    labels = _level0(path, group, attrs)
    offset, px = _placement(attrs)
    return ZarrLabels(labels, _table_of(attrs), offset, px)


def _level0(path: Path, group, attrs: dict) -> np.ndarray:
    try:
        level0 = attrs["multiscales"][0]["datasets"][0]["path"]
        arr = np.asarray(group[level0][...])
    except (KeyError, IndexError, TypeError) as exc:
        raise InputError(
            f"{path}: the label image has no readable multiscales level 0 ({exc})"
        ) from exc
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    return check_labels(arr, name=str(path))


def read_labels_zarr(path: str | os.PathLike, name: str | None = None) -> np.ndarray:
    """Read level 0 of an OME-Zarr label image as a 2-D label array.

    Parameters
    ----------
    path : path-like
        A label image, a ``labels`` group, or an image with a ``labels`` group.
    name : str, optional
        Which label image of a ``labels`` group; default: the first listed.

    Returns
    -------
    ndarray
        2-D labels (leading axes of size 1 are dropped).

    Raises
    ------
    InputError
        Not OME-Zarr labels, not 2-D, or zarr not installed; the message names ``path``.
    """
    return read_labels_zarr_table(path, name).labels


__all__ = ["ZarrLabels", "default_colours", "label_image_attrs", "level_count", "pyramid",
           "read_labels_zarr", "read_labels_zarr_table", "write_labels_zarr"]  # fmt: skip
