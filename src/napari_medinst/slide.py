"""Whole-slide images opened lazily: every pyramid level as a dask array, plus the pixel size.

:func:`open_slide` reads only the file's header. Pixels are decoded when a block of a
level is computed, through :func:`read_region`, which takes the *path* (not an open file)
and keeps one opened reader per process (:func:`functools.lru_cache`). The dask graphs
therefore hold only paths and numbers: they can be pickled and sent to other processes.

Formats and readers (see ``docs/slides.md``)

* ``.svs``, ``.ndpi``, ``.mrxs`` (and OpenSlide's other vendor formats): OpenSlide, the
  reference reader of these vendor layouts. Without ``openslide-python``, ``.svs`` and
  ``.ndpi`` fall back to tifffile, which also parses them.
* ``.tif``, ``.tiff``, ``.ome.tif(f)``: tifffile's zarr store; pyramid levels come from
  SubIFDs or from reduced-resolution pages (tifffile's series levels).
* ``.zarr``: OME-Zarr (NGFF 0.4 and 0.5) through zarr; levels from ``multiscales``.

Pixel size (µm/px, of level 0), first found of: Aperio ``MPP`` / ``openslide.mpp-x``,
OME ``PhysicalSizeX``, TIFF resolution tags (as :mod:`napari_medinst._io` reads them),
the NGFF ``scale`` of a length axis. None when the file has none: the segmenter then
estimates it, and :attr:`Slide.pixel_size_source` says so.

Every problem is an :class:`~napari_medinst._io.InputError` naming the file: an unknown
format, a truncated file (checked at open from the TIFF tile offsets), and a block that
fails to decode (raised when that block is computed, naming the level and region).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._io import InputError, _length_um, _tiff_pixel_size, _tifffile_errors

_SLIDES_EXTRA = "pip install 'napari-medinst[slides]'"


def _missing(package: str, exc: ImportError) -> InputError:
    """The message for an optional package that is not installed."""
    return InputError(f"reading slides needs {package}, which is not installed: {_SLIDES_EXTRA}")


def _zarr():
    try:
        import zarr
    except ImportError as exc:
        raise _missing("zarr", exc) from exc
    return zarr


def _dask_array():
    try:
        import dask.array as da
        from dask.base import tokenize
    except ImportError as exc:
        raise _missing("dask", exc) from exc
    return da, tokenize


OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_SUFFIXES = (".zarr",)
SLIDE_SUFFIXES = OPENSLIDE_SUFFIXES + TIFF_SUFFIXES + ZARR_SUFFIXES
#: Target side (px) of one dask chunk; rounded up to whole tiles of the file.
CHUNK = 1024
#: Relative slack when comparing a level's pixel size with a requested one (vendor
#: downsamples such as 4.0003 are meant as 4).
_LEVEL_SLACK = 0.01
_INSTALL = "pip install 'napari-medinst[slides]'"
_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")
_NO_PIXEL_SIZE = "none in the file (estimated from the image when segmenting)"


@dataclass(frozen=True)
class Slide:
    """A slide's pyramid, opened lazily.

    Attributes
    ----------
    path : Path
        The file (or ``.zarr`` folder).
    format : str
        ``"openslide:<vendor>"``, ``"tiff"``, ``"ome-tiff"``, ``"svs"``/``"ndpi"`` (read
        by tifffile) or ``"ome-zarr"``.
    levels : tuple of dask.array.Array
        Level 0 first, each (Y, X, C) uint8.
    downsamples : tuple of float
        Level-0 pixels per level pixel (1.0 for level 0).
    pixel_size_um : float or None
        µm per pixel of level 0, None when the file does not say.
    pixel_size_source : str
        Where the pixel size came from, or why there is none.
    """

    path: Path
    format: str
    levels: tuple
    downsamples: tuple[float, ...]
    pixel_size_um: float | None
    pixel_size_source: str

    def level_pixel_size(self, level: int) -> float | None:
        """µm/px of ``level``, None when the slide's pixel size is unknown."""
        if self.pixel_size_um is None:
            return None
        return self.pixel_size_um * self.downsamples[level]

    def level_for(self, pixel_size: float) -> int:
        """The coarsest level whose pixel size is at most ``pixel_size`` µm/px.

        Level 0 when no level is that fine or when the slide's pixel size is unknown.
        """
        if not (pixel_size > 0 and np.isfinite(pixel_size)):
            raise ValueError(f"pixel size must be a positive number, got {pixel_size!r}")
        best = 0
        for k in range(len(self.levels)):
            size = self.level_pixel_size(k)
            if size is not None and size <= pixel_size * (1 + _LEVEL_SLACK):
                best = k
        return best


# ------------------------------------------------------------------------- readers


def _axes_key(axes: str, shape: tuple[int, ...], ys: slice, xs: slice, path, level) -> tuple:
    """Index of a (Y, X[, C]) region in an array of ``axes`` (other axes must be single)."""
    key = []
    for axis, size in zip(axes.upper(), shape, strict=True):
        if axis == "Y":
            key.append(ys)
        elif axis == "X":
            key.append(xs)
        elif axis in "CS":
            key.append(slice(None))
        elif size == 1:
            key.append(0)
        else:
            raise InputError(
                f"{path}: level {level} has {size} planes along axis {axis!r}; "
                "a slide must be a single 2-D (colour) image"
            )
    return tuple(key)


def _to_yxc(block: np.ndarray, axes: str) -> np.ndarray:
    """A region read with :func:`_axes_key` as (Y, X, C) uint8 (alpha dropped)."""
    kept = [a for a in axes.upper() if a in "YXCS"]
    order = [kept.index("Y"), kept.index("X")] + [i for i, a in enumerate(kept) if a in "CS"]
    out = np.transpose(block, order)
    if out.ndim == 2:
        out = out[..., None]
    if out.shape[-1] in (2, 4):  # grey+alpha or RGBA: alpha is not part of the stain
        out = out[..., :-1]
    return np.ascontiguousarray(out)


def _channels(axes: str, shape: tuple[int, ...]) -> int:
    """Colour channels :func:`_to_yxc` gives for an array of ``axes`` and ``shape``."""
    found = [size for axis, size in zip(axes.upper(), shape, strict=True) if axis in "CS"]
    n = found[0] if found else 1
    return n - 1 if n in (2, 4) else n


@dataclass
class _Level:
    """One level of a reader: its (Y, X, C) shape, tile size and how to read a region."""

    shape: tuple[int, int, int]
    tile: tuple[int, int]


class _ArrayLevels:
    """Levels held as array-likes with an axes string (tifffile's zarr store, zarr).

    Subclasses set ``path``, ``axes`` and ``arrays``; ``_fetch`` decodes one region.
    """

    path: Path
    axes: str
    arrays: list

    def _shape(self, arr) -> tuple[int, int, int]:
        """(Y, X, channels) of a level; refuses axes beyond Y, X and channels."""
        _axes_key(self.axes, arr.shape, slice(0, 1), slice(0, 1), self.path, 0)  # planes?
        iy, ix = self.axes.index("Y"), self.axes.index("X")
        return arr.shape[iy], arr.shape[ix], _channels(self.axes, arr.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.arrays[0].dtype)

    def _fetch(self, arr, key) -> np.ndarray:
        return np.asarray(arr[key])

    def read(self, level: int, ys: slice, xs: slice) -> np.ndarray:
        arr = self.arrays[level]
        key = _axes_key(self.axes, arr.shape, ys, xs, self.path, level)
        return _to_yxc(self._fetch(arr, key), self.axes)


class _TiffReader(_ArrayLevels):
    """tifffile's zarr store of the first series; levels from SubIFDs or reduced pages."""

    def __init__(self, path: Path) -> None:
        import tifffile

        zarr = _zarr()
        self.path = path
        self.tif = tifffile.TiffFile(path)
        try:
            series = self.tif.series[0]
            self.axes = str(series.axes)
            node = zarr.open(series.aszarr(), mode="r")
            keys = sorted(node.array_keys(), key=int) if hasattr(node, "array_keys") else None
            self.arrays = [node[k] for k in keys] if keys else [node]
            pages = [lv.keyframe for lv in series.levels][: len(self.arrays)]
        except Exception:
            self.tif.close()
            raise
        self.levels = [self._level(arr, page) for arr, page in zip(self.arrays, pages, strict=True)]

    def _level(self, arr, page) -> _Level:
        shape = self._shape(arr)
        tile = (int(page.tilelength), int(page.tilewidth)) if page.is_tiled else shape[:2]
        return _Level(shape=shape, tile=tile)

    def _fetch(self, arr, key) -> np.ndarray:
        with _tifffile_errors() as damage:
            block = np.asarray(arr[key])
        if damage:  # tifffile logs a tile it cannot decode and returns zeros
            raise RuntimeError(damage[0])
        return block

    def close(self) -> None:
        self.tif.close()


class _OpenSlideReader:
    """OpenSlide; regions are RGBA composited over white (no tissue outside the scan)."""

    dtype = np.dtype(np.uint8)

    def __init__(self, path: Path) -> None:
        openslide = _openslide()
        if openslide is None:
            raise InputError(
                f"{path}: reading it needs openslide-python and openslide-bin, which are not "
                f"installed: {_SLIDES_EXTRA}"
            )
        self.path = path
        self.slide = openslide.OpenSlide(str(path))
        props = self.slide.properties
        self.levels = []
        for k, (nx, ny) in enumerate(self.slide.level_dimensions):
            tw = int(props.get(f"openslide.level[{k}].tile-width", CHUNK))
            th = int(props.get(f"openslide.level[{k}].tile-height", CHUNK))
            self.levels.append(_Level(shape=(ny, nx, 3), tile=(th, tw)))

    def read(self, level: int, ys: slice, xs: slice) -> np.ndarray:
        ds = self.slide.level_downsamples[level]
        origin = (round(xs.start * ds), round(ys.start * ds))
        size = (xs.stop - xs.start, ys.stop - ys.start)
        rgba = np.asarray(self.slide.read_region(origin, level, size))
        alpha = rgba[..., 3:4].astype(np.uint16)
        rgb = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
        return rgb.astype(np.uint8)

    def close(self) -> None:
        self.slide.close()


class _ZarrReader(_ArrayLevels):
    """An OME-Zarr image: ``multiscales[0]`` datasets, axes from its metadata."""

    def __init__(self, path: Path) -> None:
        zarr = _zarr()
        self.path = path
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        ms = attrs.get("ome", attrs).get("multiscales")
        if not ms:
            raise InputError(f"{path}: a zarr store without OME-NGFF 'multiscales' metadata")
        self.meta = ms[0]
        names = [a["name"] if isinstance(a, dict) else a for a in self.meta.get("axes", [])]
        self.arrays = [group[d["path"]] for d in self.meta["datasets"]]
        self.axes = "".join(str(n)[0] for n in names) or "YXC"[: self.arrays[0].ndim]
        self.axes = self.axes.upper()
        if "Y" not in self.axes or "X" not in self.axes or len(self.axes) != self.arrays[0].ndim:
            raise InputError(f"{path}: OME-Zarr axes {names} do not name y and x")
        self.levels = [self._level(a) for a in self.arrays]

    def _level(self, arr) -> _Level:
        iy, ix = self.axes.index("Y"), self.axes.index("X")
        return _Level(shape=self._shape(arr), tile=(arr.chunks[iy], arr.chunks[ix]))

    def close(self) -> None:
        pass

    def pixel_size(self) -> tuple[float | None, str]:
        """µm/px of level 0 from its ``scale`` transform and the x axis unit."""
        scales = [t.get("scale") for t in self.meta["datasets"][0].get(
            "coordinateTransformations", []) if t.get("type") == "scale"]  # fmt: skip
        axes = self.meta.get("axes", [])
        ix = self.axes.index("X")
        unit = axes[ix].get("unit") if ix < len(axes) and isinstance(axes[ix], dict) else None
        if not scales or unit is None:
            return None, _NO_PIXEL_SIZE
        size = _length_um(float(scales[0][ix]), unit)
        return (size, "NGFF scale") if size is not None else (None, _NO_PIXEL_SIZE)


# ---------------------------------------------------------------------- dispatch


def _openslide():
    """The ``openslide`` module, or None when it (or its C library) is not installed."""
    try:
        import openslide
    except (ImportError, OSError):
        return None
    return openslide


def _kind(path: Path) -> str:
    """Which reader opens ``path``: ``"openslide"``, ``"tiff"`` or ``"zarr"``."""
    suffix = path.suffix.lower()
    if suffix in ZARR_SUFFIXES:
        return "zarr"
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    if suffix in OPENSLIDE_SUFFIXES:
        if _openslide() is not None:
            return "openslide"
        if suffix in (".svs", ".ndpi"):
            return "tiff"  # tifffile parses Aperio and Hamamatsu NDPI too
        raise InputError(f"{path}: {suffix} slides need OpenSlide ({_INSTALL})")
    raise InputError(
        f"{path}: unsupported slide format {suffix or '(none)'!r}; "
        f"expected one of {', '.join(SLIDE_SUFFIXES)}"
    )


_READERS: dict[str, Callable[[Path], object]] = {
    "tiff": _TiffReader,
    "openslide": _OpenSlideReader,
    "zarr": _ZarrReader,
}


@functools.lru_cache(maxsize=16)
def _cached_reader(path: str, stamp: tuple[int, int]):
    """One open reader per file version (``stamp`` = mtime, size) and process."""
    del stamp  # part of the cache key only: a replaced file is opened afresh
    p = Path(path)
    return _READERS[_kind(p)](p)


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    return st.st_mtime_ns, st.st_size


def _reader(path: Path):
    stamp = _stamp(path)
    try:
        return _cached_reader(str(path), stamp)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: not a readable slide ({type(exc).__name__}: {exc})") from exc


def _forget(path: Path) -> None:
    """Drop every cached reader (OpenSlide handles stay broken after a read error)."""
    _cached_reader.cache_clear()


def read_region(path: str | os.PathLike, level: int, y0: int, y1: int, x0: int, x1: int):
    """Decode rows ``y0:y1`` and columns ``x0:x1`` of a slide level as (Y, X, C) uint8.

    Only the path is needed: each process opens the file once and keeps it open, so
    this is what a dask worker calls for its block.

    Raises
    ------
    InputError
        If the file cannot be opened, the region lies outside the level, or a tile in
        it fails to decode (the message names the file, level and region).
    """
    p = Path(path)
    reader = _reader(p)
    if not 0 <= level < len(reader.levels):
        raise InputError(f"{p}: level {level} does not exist ({len(reader.levels)} levels)")
    ny, nx, _ = reader.levels[level].shape
    if not (0 <= y0 < y1 <= ny and 0 <= x0 < x1 <= nx):
        raise InputError(f"{p}: region [{y0}:{y1}, {x0}:{x1}] is outside level {level} "
                         f"({ny} x {nx} px)")  # fmt: skip
    try:
        return _read_block(reader, level, slice(y0, y1), slice(x0, x1))
    except InputError:
        raise
    except Exception as exc:
        _forget(p)
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(
            f"{p}: level {level} region [{y0}:{y1}, {x0}:{x1}] cannot be decoded ({msg})"
        ) from exc


def _read_block(reader, level: int, ys: slice, xs: slice) -> np.ndarray:
    """The reader's region (tests wrap this to count which levels are decoded)."""
    return reader.read(level, ys, xs)


class _LevelSource:
    """Array-like over one level for :func:`dask.array.from_array`; holds only the path."""

    def __init__(self, path: Path, level: int, shape: tuple[int, int, int]) -> None:
        self.path, self.level, self.shape = str(path), level, shape
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key) -> np.ndarray:
        ys, xs = key[0], key[1]
        ny, nx, _ = self.shape
        y0, y1, _ = ys.indices(ny)
        x0, x1, _ = xs.indices(nx)
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(y1 - y0, 0), max(x1 - x0, 0), self.shape[2]), np.uint8)
        return read_region(self.path, self.level, y0, y1, x0, x1)[:, :, key[2]]


def _dask_level(path: Path, level: int, info: _Level, stamp: tuple[int, int]):
    da, tokenize = _dask_array()

    chunks = (*tuple(t * max(1, -(-CHUNK // t)) for t in info.tile), info.shape[2])
    return da.from_array(
        _LevelSource(path, level, info.shape),
        chunks=chunks,
        name=f"slide-{level}-{tokenize(str(path), stamp, level)}",
        lock=False,
        asarray=False,
        fancy=False,
        meta=np.empty((0, 0, 0), np.uint8),
    )


# ------------------------------------------------------------------ opening a slide


def _check_tiff_complete(path: Path) -> None:
    """InputError when tile or strip data of any page lie beyond the end of the file."""
    import tifffile

    size = path.stat().st_size
    with tifffile.TiffFile(path) as tif:
        for i, page in enumerate(tif.pages):
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=False)
                    if n]  # fmt: skip
            if ends and max(ends) > size:
                raise InputError(
                    f"{path}: truncated slide (page {i} needs {max(ends)} bytes, "
                    f"the file has {size})"
                )


def _is_tiff(path: Path) -> bool:
    if path.is_dir():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _tiff_facts(path: Path) -> tuple[str, float | None, str]:
    """(format, µm/px, source) from a TIFF's header (Aperio MPP first)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        fmt = (
            "ome-tiff" if tif.is_ome else "svs" if tif.is_svs else "ndpi" if tif.is_ndpi else "tiff"
        )
        found = _MPP.search(tif.pages[0].description or "") if tif.is_svs else None
        if found:
            size = _length_um(float(found.group(1)), "µm")
            if size is not None:
                return fmt, size, "Aperio MPP"
        size, source = _tiff_pixel_size(tif)
    return fmt, size, source or _NO_PIXEL_SIZE


def _openslide_facts(path: Path, reader: _OpenSlideReader) -> tuple[str, float | None, str]:
    props = reader.slide.properties
    fmt = f"openslide:{props.get('openslide.vendor', 'unknown')}"
    try:
        size = _length_um(float(props["openslide.mpp-x"]), "µm")
    except (KeyError, ValueError):
        size = None
    if size is None:
        return fmt, None, _NO_PIXEL_SIZE
    source = "Aperio MPP" if "aperio.MPP" in props else "openslide.mpp-x"
    return fmt, size, source


def _facts(path: Path, reader) -> tuple[str, float | None, str]:
    if isinstance(reader, _ZarrReader):
        return ("ome-zarr", *reader.pixel_size())
    if isinstance(reader, _OpenSlideReader):
        return _openslide_facts(path, reader)
    return _tiff_facts(path)


def _check_path(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir() and path.suffix.lower() not in ZARR_SUFFIXES:
        raise InputError(f"{path}: is a folder, expected a slide file or a .zarr store")


def open_slide(path: str | os.PathLike) -> Slide:
    """Open a slide or image pyramid lazily: its levels as dask arrays and its pixel size.

    Reads the header only; no pixel is decoded until a level's block is computed.

    Raises
    ------
    InputError
        If the file is missing, of a format no reader here knows, truncated, not
        readable by its reader, or not 8-bit.
    """
    p = Path(path)
    _check_path(p)
    _kind(p)  # unknown formats are refused before anything is opened
    try:
        if _is_tiff(p):
            _check_tiff_complete(p)
        reader = _reader(p)
        fmt, size, source = _facts(p, reader)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{p}: not a readable slide ({type(exc).__name__}: {exc})") from exc
    if getattr(reader, "dtype", np.dtype(np.uint8)) != np.uint8:
        raise InputError(f"{p}: slide pixels are {reader.dtype}, expected 8-bit (uint8)")
    stamp = _stamp(p)
    levels = tuple(_dask_level(p, k, lv, stamp) for k, lv in enumerate(reader.levels))
    width0 = reader.levels[0].shape[1]
    downsamples = tuple(width0 / lv.shape[1] for lv in reader.levels)
    if isinstance(reader, _OpenSlideReader):
        downsamples = tuple(float(d) for d in reader.slide.level_downsamples)
    return Slide(p, fmt, levels, downsamples, size, source)


def is_pyramid_tiff(path: str | os.PathLike, min_pixels: int = 4096 * 4096) -> bool:
    """Whether a TIFF holds a pyramid or a tiled level 0 of at least ``min_pixels``.

    Plain TIFFs (one small or stripped image) are left to ordinary image readers.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            page = series.keyframe
            big = page.is_tiled and page.imagelength * page.imagewidth >= min_pixels
            return len(series.levels) > 1 or bool(big)
    except Exception:
        return False
