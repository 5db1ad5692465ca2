"""npe2 reader: whole-slide images as a lazy multiscale RGB image layer.

Claims ``.svs``, ``.ndpi``, ``.mrxs``, ``.ome.tif(f)``, ``.zarr`` (OME-Zarr images) and
``.tif``/``.tiff`` files that hold a pyramid or a large tiled image; a plain TIFF is left
to napari's own reader (the function returns None). The layer's data are the slide's
dask levels, so opening decodes nothing beyond what the visible level needs; its scale is
the pixel size in µm when the file gives one, and its metadata carry ``pixel_size_um``
(read by the Segment panel) and ``slide_path``.
"""

from __future__ import annotations

from pathlib import Path

from ..slide import OPENSLIDE_SUFFIXES, TIFF_SUFFIXES, is_pyramid_tiff, open_slide


def _is_ngff_image(folder: Path) -> bool:
    """Whether a folder is an OME-Zarr image (its root attributes hold ``multiscales``)."""
    for name in (".zattrs", "zarr.json"):
        try:
            if "multiscales" in (folder / name).read_text(encoding="utf-8"):
                return True
        except (OSError, UnicodeDecodeError):
            continue
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
    """npe2 ``get_reader``: the reader function for a slide, else None."""
    return read_slide if _slide_path(path) is not None else None


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
