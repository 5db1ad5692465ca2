"""npe2 reader: whole-slide images as a lazy multiscale RGB image layer.

Claims ``.svs``, ``.ndpi``, ``.mrxs``, ``.ome.tif(f)``, ``.zarr`` (OME-Zarr images) and
``.tif``/``.tiff`` files that hold a pyramid or a large tiled image; a plain TIFF is left
to napari's own reader (the function returns None). The layer's data are the slide's
dask levels, so opening decodes nothing beyond what the visible level needs; its scale is
the pixel size in µm when the file gives one, and its metadata carry ``pixel_size_um``
(read by the Segment panel) and ``slide_path``.

A ``.zarr`` written by ``napari-medinst segment-slide`` opens as a lazy multiscale labels
layer of its nuclei (the OME-NGFF pyramid under ``labels/nuclei``) at its µm scale, so it
lies on the slide it came from; a store whose run is not complete says so in its name.
"""

from __future__ import annotations

import json
from pathlib import Path

from .._io import InputError
from ..slide import (
    OPENSLIDE_SUFFIXES,
    TIFF_SUFFIXES,
    _dask_array,
    is_pyramid_tiff,
    open_slide,
)
from ..slide_engine import STORE_KEY


def _is_ngff_image(folder: Path) -> bool:
    """Whether a folder is an OME-Zarr image (its root attributes hold ``multiscales``)."""
    for name in (".zattrs", "zarr.json"):
        try:
            if "multiscales" in (folder / name).read_text(encoding="utf-8"):
                return True
        except (OSError, UnicodeDecodeError):
            continue
    return False


def _is_slide_result(folder: Path) -> bool:
    """Whether a folder is a ``segment-slide`` output store."""
    try:
        return STORE_KEY in (folder / ".zattrs").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def _slide_path(path) -> Path | None:
    if not isinstance(path, str | Path):
        return None  # a list of files: each one is opened on its own
    p = Path(path)
    suffix, name = p.suffix.lower(), p.name.lower()
    if suffix in OPENSLIDE_SUFFIXES or name.endswith((".ome.tif", ".ome.tiff")):
        return p
    if suffix == ".zarr":
        return p if _is_ngff_image(p) else None
    if suffix in TIFF_SUFFIXES and is_pyramid_tiff(p):
        return p
    return None


def get_slide_reader(path):
    """npe2 ``get_reader``: the reader function for a slide (or a slide result), else None."""
    is_zarr = isinstance(path, str | Path) and Path(path).suffix.lower() == ".zarr"
    if is_zarr and _is_slide_result(Path(path)):
        return read_slide_result
    return read_slide if _slide_path(path) is not None else None


def read_slide_result(path) -> list[tuple]:
    """The nuclei of a ``segment-slide`` store as one lazy multiscale labels layer."""
    da, _ = _dask_array()  # (an optional dependency: a clear message when missing)
    root = Path(path)
    if (root / "edit-journal.npz").exists():  # a hand correction interrupted mid-write
        from ..slide_edit import recover

        recover(root)
    try:
        attrs = json.loads((root / "labels" / "nuclei" / ".zattrs").read_text(encoding="utf-8"))
        ms = attrs["multiscales"][0]
        levels = [d["path"] for d in ms["datasets"]]
        scale = next(
            t["scale"]
            for t in ms["datasets"][0]["coordinateTransformations"]
            if t.get("type") == "scale"
        )[-2:]
        status = json.loads((root / ".zattrs").read_text(encoding="utf-8"))[STORE_KEY].get(
            "status", ""
        )
    except (OSError, ValueError, KeyError, IndexError, TypeError, StopIteration) as exc:
        raise InputError(f"{root}: not a readable segment-slide result ({exc})") from None
    data = [da.from_zarr(str(root / "labels" / "nuclei" / lv)) for lv in levels]
    name = f"{root.name} nuclei" + ("" if status == "complete" else f" ({status or 'incomplete'})")
    kwargs = {
        "name": name,
        "multiscale": True,
        "scale": tuple(float(v) for v in scale),
        "units": ("micrometer", "micrometer"),
        "metadata": {"slide_result": str(root), "status": status},
    }
    return [(data, kwargs, "labels")]


def read_slide(path) -> list[tuple]:
    """One multiscale image layer of the slide (levels are lazy dask arrays)."""
    slide = open_slide(path)
    meta = {"slide_path": str(slide.path), "pixel_size_source": slide.pixel_size_source}
    kwargs = {"rgb": slide.levels[0].shape[-1] in (3, 4), "multiscale": True,
              "name": slide.path.name, "metadata": meta}  # fmt: skip
    if slide.pixel_size_um is not None:
        meta["pixel_size_um"] = slide.pixel_size_um
        kwargs["scale"] = (slide.pixel_size_um, slide.pixel_size_um)
        kwargs["units"] = ("micrometer", "micrometer")
    data = list(slide.levels)
    if not kwargs["rgb"]:
        data = [lv[..., 0] for lv in data]  # one grey channel
    return [(data, kwargs, "image")]
