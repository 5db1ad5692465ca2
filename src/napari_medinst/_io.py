"""Reading and writing images and label maps, with clear errors and atomic writes.

Every reader raises :class:`InputError` with a one-line message that names the file and
the problem; every writer writes to a temporary file in the destination folder, flushes
it to the disk and renames it into place, so a crash never leaves a half-written file
behind. :func:`write_group` does that for several files at once (all or nothing), and
:func:`check_output_dir` checks an output folder before any work.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


class InputError(ValueError):
    """A user-supplied file or array cannot be used; the message says why."""


#: Largest plane (Y x X pixels) a file may declare before it is decoded. Above this the
#: image cannot be processed in memory even block-wise (a whole-slide image needs a lazy
#: reader); the compute limit for one pass, ``segment.MAX_PIXELS``, is separate and lower.
MAX_DECODE_PIXELS = 1_000_000_000
#: Largest decoded array (all planes and channels), in bytes; also never more than half
#: of the machine's physical memory (see :func:`decode_byte_limit`).
MAX_DECODE_BYTES = 16 * 2**30
#: Pixel sizes read from resolution tags coarser than this (µm/px) are the dpi defaults
#: of image editors (72-1200 dpi), not a microscope's, and are ignored.
MAX_TAG_PIXEL_SIZE = 10.0
_UNIT_UM = {
    "pm": 1e-6, "å": 1e-4, "angstrom": 1e-4, "nm": 1e-3, "nanometer": 1e-3, "µm": 1.0,
    "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "mm": 1e3,
    "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4, "m": 1e6, "meter": 1e6,
    "inch": 25400.0, "in": 25400.0,
}  # fmt: skip
_PLANE_AXES = "QI"  # tifffile's letters for axes of unknown meaning


@dataclass(frozen=True)
class ImageInfo:
    """What a file declares about its pixels, read from the header without decoding.

    Attributes
    ----------
    shape, dtype
        Declared shape and dtype of the array :func:`read_image` returns.
    axes : str
        One letter per axis: ``Y``/``X`` space, ``C`` channels, ``S`` colour samples
        (RGB(A) in the file), ``Z``/``T`` and others planes, e.g. ``"YXS"``, ``"CYX"``,
        ``"TZCYX"``.
    axes_from_metadata : bool
        True when the axes come from the file (OME, ImageJ, tifffile or PNG/JPEG
        colour), False when guessed from the shape by :func:`guess_axes`.
    pixel_size : float or None
        µm per pixel along X, when the file records one.
    pixel_size_source : str or None
        Where it came from: ``"OME PhysicalSizeX"``, ``"ImageJ resolution"`` or
        ``"TIFF resolution tags"``.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    axes: str
    axes_from_metadata: bool
    pixel_size: float | None = None
    pixel_size_source: str | None = None


def guess_axes(shape: tuple[int, ...]) -> str:
    """Axes of an array whose file carries none.

    The rule: the last two axes are space (``YX``), unless the last axis has at most 16
    entries, which is then channels (``YXC``; a 3-D array's last axis is never read as
    space when it is ≤ 16). Leading axes are planes: ``Z`` for one, ``TZ`` for two,
    ``Q`` (unknown) beyond. A first axis of ≤ 16 on a 3-D array stays planes (a short
    z-stack looks the same as channels-first); ``--channel-axis 0`` says otherwise.
    """
    if len(shape) < 2:
        raise InputError(f"shape {shape} is not an image")
    space = "YXC" if len(shape) >= 3 and shape[-1] <= 16 else "YX"
    n_lead = len(shape) - len(space)
    lead = {0: "", 1: "Z", 2: "TZ"}.get(n_lead, "Q" * n_lead)
    return lead + space


def decode_byte_limit() -> int:
    """Bytes an image may decode to: :data:`MAX_DECODE_BYTES`, at most half the RAM."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return MAX_DECODE_BYTES
    return min(MAX_DECODE_BYTES, ram // 2) if ram > 0 else MAX_DECODE_BYTES


def _check_decode_size(path: Path, info: ImageInfo) -> None:
    """Refuse (before decoding) an image whose declared size cannot be processed."""
    ny, nx = (info.shape[info.axes.index(a)] for a in "YX")
    nbytes = int(np.prod(info.shape, dtype=np.float64)) * np.dtype(info.dtype).itemsize
    if ny * nx > MAX_DECODE_PIXELS:
        raise InputError(
            f"{path}: declares {nx}x{ny} px ({ny * nx / 1e9:.1f} Gpx), more than the "
            f"{MAX_DECODE_PIXELS / 1e9:.0f} Gpx this tool can decode; crop a region first"
        )
    if nbytes > decode_byte_limit():
        raise InputError(
            f"{path}: declares {' x '.join(map(str, info.shape))} {info.dtype} "
            f"({nbytes / 2**30:.1f} GiB), more than the {decode_byte_limit() / 2**30:.1f} GiB "
            "this tool decodes; crop a region first"
        )


#: A PNG/JPEG that would decode to more than this many times its file size is refused
#: (deflate cannot exceed about 1032:1; real images, even mostly white slide regions,
#: stay far below): it is a decompression bomb or a truncated file, not an image.
MAX_COMPRESSION_RATIO = 1000
#: Below this many decoded bytes the ratio is not checked (small blank images are fine).
_RATIO_FLOOR = 64 * 2**20


def _check_compression_ratio(path: Path, info: ImageInfo) -> None:
    """Refuse a PNG/JPEG that declares far more pixels than its bytes can hold."""
    nbytes = int(np.prod(info.shape, dtype=np.float64)) * np.dtype(info.dtype).itemsize
    size = max(path.stat().st_size, 1)
    if nbytes > _RATIO_FLOOR and nbytes > MAX_COMPRESSION_RATIO * size:
        raise InputError(
            f"{path}: declares {info.shape[1]}x{info.shape[0]} px ({nbytes / 2**20:.0f} MiB) "
            f"in a file of {size / 2**10:.0f} KiB; refused before decoding (a decompression "
            "bomb or a truncated file)"
        )


def _length_um(value: float, unit: str | None) -> float | None:
    """``value`` in ``unit`` converted to µm; None when the unit is unknown or value bad."""
    key = (unit or "").strip().lower().replace("\\u00b5", "µ")
    factor = _UNIT_UM.get(key)
    if factor is None or not (value > 0 and np.isfinite(value)):
        return None
    return float(value) * factor


def _ome_pixel_size(xml: str) -> float | None:
    """PhysicalSizeX of the first image of an OME-XML document, in µm."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == "Pixels":
            if "PhysicalSizeX" not in el.attrib:
                return None
            try:
                value = float(el.attrib["PhysicalSizeX"])
            except ValueError:
                return None
            return _length_um(value, el.attrib.get("PhysicalSizeXUnit", "µm"))
    return None


def _tag_pixel_size(page, imagej_unit: str | None) -> float | None:
    """µm/px from XResolution + ResolutionUnit (or ImageJ's unit when the tag has none)."""
    tags = page.tags
    if "XResolution" not in tags:
        return None
    num, den = tags["XResolution"].value
    unit_tag = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    unit = {2: "inch", 3: "cm", 4: "mm", 5: "um"}.get(unit_tag)
    if unit_tag == 1:  # no absolute unit: only ImageJ's metadata names one
        unit = imagej_unit
    if not num or not den or unit is None:
        return None
    return _length_um(den / num, unit)


def _tiff_pixel_size(tif) -> tuple[float | None, str | None]:
    """(µm/px, source) of an open :class:`tifffile.TiffFile`, or (None, None)."""
    found: list[tuple[float | None, str]] = []
    if tif.is_ome:
        found.append((_ome_pixel_size(tif.ome_metadata or ""), "OME PhysicalSizeX"))
    ij = tif.imagej_metadata or {}
    page = tif.series[0].pages[0] if tif.series else tif.pages[0]
    source = "ImageJ resolution" if ij.get("unit") else "TIFF resolution tags"
    found.append((_tag_pixel_size(page, ij.get("unit")), source))
    for size, src in found:
        if size is not None and 0.01 <= size <= MAX_TAG_PIXEL_SIZE:
            return size, src
    return None, None


def _tiff_info(tif, path: Path) -> ImageInfo:
    """Header facts of an open :class:`tifffile.TiffFile` (no pixel data is read)."""
    series = tif.series[0]
    shape, axes = tuple(int(n) for n in series.shape), str(series.axes).upper()
    if len(shape) < 2 or 0 in shape:
        raise InputError(f"{path}: image has no pixels or is not 2-D (shape {shape})")
    known = (
        len(axes) == len(shape)
        and "Y" in axes
        and "X" in axes
        and not any(a in axes for a in _PLANE_AXES)
    )
    size, source = _tiff_pixel_size(tif)
    return ImageInfo(
        shape=shape,
        dtype=np.dtype(series.dtype),
        axes=axes if known else guess_axes(shape),
        axes_from_metadata=known,
        pixel_size=size,
        pixel_size_source=source,
    )


@contextlib.contextmanager
def _pil_limits():
    """Pillow with this tool's decode limit instead of its own.

    Pillow refuses images above about 179 Mpx and warns above half that; this tool's
    limit is :data:`MAX_DECODE_PIXELS`, checked from the header by
    :func:`_check_decode_size`. Pillow's limit is raised (never lowered) once for the
    process, and its warning silenced while we read.
    """
    import warnings

    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_DECODE_PIXELS:
        Image.MAX_IMAGE_PIXELS = MAX_DECODE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield Image


#: Pillow modes and the arrays imageio decodes them to: (dtype, bands).
_PIL_MODES = {"I;16": (np.uint16, 1), "I;16B": (np.uint16, 1), "I": (np.int32, 1),
              "F": (np.float32, 1), "LA": (np.uint8, 1), "PA": (np.uint8, 4),
              "P": (np.uint8, 3), "CMYK": (np.uint8, 3), "YCbCr": (np.uint8, 3)}  # fmt: skip


def _pil_info(path: Path) -> ImageInfo:
    """Header facts of a PNG/JPEG (the pixels are not decoded)."""
    with _pil_limits() as Image:
        try:
            with Image.open(path) as im:
                (w, h), mode = im.size, im.mode
                bands = len(im.getbands())
        except Image.DecompressionBombError as exc:
            raise InputError(f"{path}: refused before decoding: {exc}") from exc
    dtype, bands = _PIL_MODES.get(mode, (np.uint8, bands))
    shape = (h, w) if bands == 1 else (h, w, bands)
    axes = "YX" if bands == 1 else "YXS"
    return ImageInfo(shape=shape, dtype=np.dtype(dtype), axes=axes, axes_from_metadata=True)


def _decode_pil(path: Path) -> np.ndarray:
    """Decode a PNG/JPEG: CMYK and YCbCr as RGB, grey + alpha as grey (alpha dropped)."""
    import imageio.v3 as iio

    with _pil_limits() as Image:
        with Image.open(path) as im:
            mode = im.mode
        if mode in ("CMYK", "YCbCr"):  # raw CMYK bands would read as inverted RGBA
            return iio.imread(path, mode="RGB")
        arr = iio.imread(path)
    if mode in ("LA", "La") and arr.ndim == 3 and arr.shape[-1] == 2:
        return arr[..., 0]
    return arr


def _check_path(path: Path) -> str:
    """The lower-case suffix of an existing image file, else :class:`InputError`."""
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected an image file")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise InputError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; "
            f"expected one of {', '.join(IMAGE_SUFFIXES)}"
        )
    return suffix


def read_image_info(path: str | os.PathLike) -> ImageInfo:
    """Read an image's declared shape, axes and pixel size without decoding its pixels.

    Raises
    ------
    InputError
        If the file is missing or unreadable, or declares more pixels or bytes than
        this tool can decode (:data:`MAX_DECODE_PIXELS`, :func:`decode_byte_limit`).
    """
    return _open(Path(path), decode=False)[1]


def open_image(path: str | os.PathLike) -> tuple[np.ndarray, ImageInfo]:
    """Read a TIFF, PNG or JPEG image and its :class:`ImageInfo`.

    The declared size is checked from the header first, so a small file declaring an
    enormous image (a decompression bomb) is refused before anything is decoded.
    """
    arr, info = _open(Path(path), decode=True)
    if arr.size == 0:
        raise InputError(f"{path}: image has no pixels (shape {arr.shape})")
    if arr.shape != info.shape:  # e.g. a palette PNG decoded with alpha
        axes = info.axes if arr.ndim == len(info.axes) else guess_axes(arr.shape)
        info = replace(info, shape=arr.shape, dtype=arr.dtype, axes=axes)
    return arr, info


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a TIFF, PNG or JPEG image as a numpy array (see :func:`open_image`).

    Raises
    ------
    InputError
        If the file is missing, is not a readable image, has no pixels, or declares
        more than this tool can decode.
    """
    return open_image(path)[0]


class _TiffLogCatcher(logging.Filter):
    """Keeps tifffile's log records of the reads this thread is doing to itself.

    tifffile logs (instead of raising) a damaged strip or tile and decodes it as zeros,
    and logs metadata it cannot parse while reading the pixels fine. While a thread reads
    through :func:`_tifffile_errors` the records go to that read (not to the console);
    other threads' logging is untouched. Installed once: no handler or ``propagate``
    flag is switched per read, so concurrent reads (napari reads in threads) are safe.
    """

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        sink = getattr(self._local, "sink", None)
        if sink is None:
            return True
        if record.levelno >= logging.ERROR:
            sink.append(record.getMessage().splitlines()[0][:200])
        return False

    @contextlib.contextmanager
    def catch(self):
        previous = getattr(self._local, "sink", None)
        self._local.sink = sink = []
        try:
            yield sink
        finally:
            self._local.sink = previous


_TIFF_LOG = _TiffLogCatcher()
logging.getLogger("tifffile").addFilter(_TIFF_LOG)


def _tifffile_errors():
    """Context: the errors tifffile logs in this thread meanwhile, as a list of lines."""
    return _TIFF_LOG.catch()


def _open(path: Path, decode: bool) -> tuple[np.ndarray | None, ImageInfo]:
    suffix = _check_path(path)
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            with _tifffile_errors(), tifffile.TiffFile(path) as tif:
                # errors logged while the header and metadata are parsed (a malformed
                # OME-XML, an odd private tag) do not touch the pixels: not reported
                if not tif.series:
                    raise InputError(f"{path}: TIFF holds no image")
                info = _tiff_info(tif, path)
                _check_decode_size(path, info)
                arr = None
                if decode:
                    with _tifffile_errors() as damage:
                        arr = tif.series[0].asarray()
                    if damage:  # a damaged strip or tile, decoded as zeros
                        raise InputError(
                            f"{path}: not a readable image (damaged TIFF: {damage[0]})"
                        )
        else:
            info = _pil_info(path)
            _check_decode_size(path, info)
            arr = None
            if decode:
                _check_compression_ratio(path, info)
                arr = _decode_pil(path)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
    return (None if arr is None else np.asarray(arr)), info


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read an instance label image (integer, 2-D, non-negative)."""
    arr = read_image(path)
    return check_labels(arr, name=str(path))


def check_labels(arr: np.ndarray, name: str = "labels") -> np.ndarray:
    """Validate an instance label array and return it unchanged.

    Accepts any integer dtype (and bool); floats are accepted only when every value is a
    whole number, since some tools save labels as float.
    """
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise InputError(f"{name}: labels must be 2-D, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        whole = np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr))
        if whole and np.all(arr == np.round(arr)) and arr.min() >= 0:
            return arr.astype(np.int64)
        raise InputError(f"{name}: labels must be integers, got dtype {arr.dtype}")
    if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
        raise InputError(f"{name}: labels contain negative values (min {arr.min()})")
    return arr


def free_name(base: str, taken, template: str = "{base} ({k})") -> str:
    """``base`` if it is not in ``taken``, else the first ``template`` (k = 2, 3, ...) that is not."""
    if base not in taken:
        return base
    k = 2
    while template.format(base=base, k=k) in taken:
        k += 1
    return template.format(base=base, k=k)


# ------------------------------------------------------------------------ atomic writes
#
# A writer writes into a temporary ``.<name>.<pid>@<host>.t<time>-<random>.part`` file
# (next to the destination, or in a staging folder), flushes it to the disk (fsync) and
# only then renames it into place. The name lets a later run remove what a killed run
# left behind (:func:`remove_stale_parts`) without touching a live run's files: the pid
# is tested only when ``<host>`` (:func:`_host_tag`) is this machine, and ``<time>``
# (base 36 seconds) is when the entry was made, which a hard-linked backup's mtime is not.
# Names without ``@<host>.t<time>`` were written by earlier versions (pid test as before).

Writer = Callable[[Path], None]

_PART_RE = re.compile(
    r"^\..+\.(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9-]{1,20})\.t(?P<t>[0-9a-z]{1,12}))?"
    r"-[A-Za-z0-9_]{8}\.part$"
)
STALE_PART_AGE_S = 24 * 3600  # a .part file this old is stale whoever wrote it
MIN_FREE_BYTES = 1 << 20
# what os.link raises on a file system without hard links (FAT, some network drives)
_NO_HARD_LINKS = {
    getattr(errno, name)
    for name in ("EPERM", "EXDEV", "EMLINK", "ENOSYS", "ENOTSUP", "EOPNOTSUPP", "EINVAL")
    if hasattr(errno, name)
}

_REASONS = {
    errno.ENOSPC: "disk full (no space left on the device)",
    errno.EFBIG: "file size limit reached (file too large; see ulimit -f)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder",
    errno.EEXIST: "already exists",
    errno.ENOENT: "no such file or folder",
    errno.EIO: "input/output error (failing disk or lost network drive?)",
}
if hasattr(errno, "EDQUOT"):
    _REASONS[errno.EDQUOT] = "disk quota exceeded"


def os_error_reason(exc: OSError) -> str:
    """The reason of a failed file operation in plain words (without the file name)."""
    if exc.errno is None:
        return str(exc)
    return _REASONS.get(exc.errno) or exc.strerror or os.strerror(exc.errno)


def describe_os_error(exc: OSError) -> str:
    """One line for a failed file operation: ``"<file>: <reason in plain words>"``."""
    if exc.errno is None:
        return str(exc)
    reason = os_error_reason(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason


@contextlib.contextmanager
def _about(path: Path) -> Iterator[None]:
    """Re-raise an OSError so that it names ``path`` (the user's file, not a temporary one)."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc


@functools.lru_cache(maxsize=1)
def _host_tag() -> str:
    """This machine in part names: ``<short host name>-<4 hex digits>``.

    A pid means something only where its process lives. The hex digits hash the full
    host name and the pid namespace (a container's own), so two containers or two
    cluster nodes never take each other's parts for their own.
    """
    import hashlib
    import socket

    full = socket.gethostname() or "host"
    short = re.sub(r"[^A-Za-z0-9]+", "-", full.split(".")[0]).strip("-")[:12] or "host"
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{short}-{hashlib.sha256(f'{full}|{namespace}'.encode()).hexdigest()[:4]}"


def _part_prefix(name: str) -> str:
    """Start of a temporary name: ``.<name>.<pid>@<host>.t<time>-`` (random part follows)."""
    now, digits = int(time.time()), ""
    while now:
        now, d = divmod(now, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[d] + digits
    return f".{name}.{os.getpid()}@{_host_tag()}.t{digits or '0'}-"


def _new_part(dest: Path, folder: Path | None = None) -> Path:
    """Create an empty temporary file for ``dest`` in ``folder`` (default: beside ``dest``)."""
    fd, tmp = tempfile.mkstemp(
        prefix=_part_prefix(dest.name), suffix=".part", dir=folder or dest.parent
    )
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; use the usual mode
    return Path(tmp)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    """Flush the data of ``path`` to the disk: a rename is only safe after this."""
    try:
        _fsync(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    except PermissionError:
        _fsync(path, os.O_RDONLY)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (the renames) to the disk; best effort, POSIX only."""
    if os.name != "nt":
        with contextlib.suppress(OSError):
            _fsync(folder, os.O_RDONLY)


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _write_part(dest: Path, write: Writer, folder: Path | None) -> Path:
    """Write and fsync a temporary file for ``dest``; nothing is left if that fails."""
    tmp = _new_part(dest, folder)
    try:
        write(tmp)
        _fsync_file(tmp)
    except BaseException:
        _discard(tmp)
        raise
    return tmp


def _backup(dest: Path) -> Path | None:
    """A hard link (or copy) of an existing ``dest``, to restore it if the group fails."""
    if not os.path.lexists(dest):
        return None
    backup = dest.with_name(f"{_part_prefix(dest.name)}{secrets.token_hex(4)}.part")
    try:
        os.link(dest, backup)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        shutil.copy2(dest, backup)
    return backup


def _exists_error(dest: Path) -> FileExistsError:
    return FileExistsError(f"{dest}: already exists (pass overwrite=True to replace it)")


def _place(tmp: Path, dest: Path, clobber: bool) -> None:
    """Rename ``tmp`` to ``dest``; without ``clobber`` never replace a file that is there."""
    if clobber:
        os.replace(tmp, dest)
        return
    try:
        os.link(tmp, dest)  # fails if dest appeared meanwhile, where a rename would replace it
    except FileExistsError:
        raise _exists_error(dest) from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(dest):
            raise _exists_error(dest) from None
        os.replace(tmp, dest)


class RollbackError(OSError):
    """A group write failed and could not be undone completely; the message says what."""


def _keep_backup(dest: Path, backup: Path) -> Path:
    """Rename a backup that could not be restored to a name no clean-up ever removes.

    ``<stem>.previous-<YYYYmmdd-HHMMSS>[-k]<suffix>`` beside ``dest``, never replacing
    a file; the backup's own path if even that fails.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in range(1, 10):
        extra = f"-{k}" if k > 1 else ""
        kept = dest.with_name(f"{dest.stem}.previous-{stamp}{extra}{dest.suffix}")
        try:
            _place(backup, kept, clobber=False)
        except FileExistsError:
            continue
        except OSError:
            break
        _discard(backup)
        return kept
    return backup


def _roll_back(done: list[tuple[Path, Path | None]]) -> list[str]:
    """Undo renames: restore the previous file, or remove the new one.

    Returns
    -------
    list of str
        What could not be undone, one phrase per file (naming where a previous
        content is kept); empty when everything is as it was.
    """
    problems = []
    for dest, backup in reversed(done):
        try:
            if backup is None:
                os.unlink(dest)
            else:
                os.replace(backup, dest)
        except OSError as exc:
            if backup is None:
                problems.append(f"{dest} is new and could not be removed ({os_error_reason(exc)})")
            else:
                problems.append(
                    f"{dest} could not be restored ({os_error_reason(exc)}); "
                    f"its previous content is kept in {_keep_backup(dest, backup)}"
                )
    return problems


def _rollback_error(exc: BaseException, problems: list[str]) -> RollbackError:
    """The error of a failed write whose roll-back failed too (one line)."""
    what = describe_os_error(exc) if isinstance(exc, OSError) else str(exc) or type(exc).__name__
    return RollbackError(f"{what}; and the files could not all be put back: {'; '.join(problems)}")


def _commit(staged: list[tuple[Path, Path]], replace: Callable[[Path], bool]) -> None:
    """Rename every temporary file into place, or (on failure) restore what was there."""
    done: list[tuple[Path, Path | None]] = []
    try:
        for tmp, dest in staged:
            with _about(dest):
                clobber = replace(dest)
                backup = _backup(dest) if clobber else None
                try:
                    _place(tmp, dest, clobber)
                except BaseException:
                    if backup is not None:
                        _discard(backup)
                    raise
            done.append((dest, backup))
    except BaseException as exc:
        problems = _roll_back(done)
        if problems and isinstance(exc, Exception):
            raise _rollback_error(exc, problems) from exc
        if problems:
            logging.getLogger(__name__).error("%s", _rollback_error(exc, problems))
        raise
    for _, backup in done:
        if backup is not None:
            _discard(backup)
    for folder in {dest.parent for _, dest in staged}:
        _fsync_dir(folder)


def _replace_rule(overwrite: bool | Collection[Path]) -> Callable[[Path], bool]:
    if isinstance(overwrite, bool):
        return lambda dest: overwrite
    allowed = {Path(p) for p in overwrite}
    return lambda dest: dest in allowed


def _make_parent(dest: Path) -> None:
    parent = dest.parent
    if os.path.lexists(parent) and not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
    parent.mkdir(parents=True, exist_ok=True)


def write_group(
    items: Iterable[tuple[str | os.PathLike, Writer]],
    *,
    overwrite: bool | Collection[Path] = False,
    staging: Path | None = None,
) -> list[Path]:
    """Write several files as one unit: all of them, or none.

    Every file is first written to a temporary ``.part`` file and flushed to the disk;
    only when all succeeded are they renamed into place, in the order given (put the
    file whose presence means "finished", e.g. the instances TIFF, last). If a rename
    fails, the files already renamed are put back as they were. A hard kill between
    two renames (a window of microseconds) can leave the earlier files new and the
    later ones old; a killed run's ``.part`` files are removed by the next run
    (:func:`remove_stale_parts`).

    Parameters
    ----------
    items : iterable of (path, writer)
        ``writer(tmp_path)`` writes the file's content to ``tmp_path``
        (see :func:`tiff_writer`, :func:`png_writer`, :func:`bytes_writer`).
    overwrite : bool or collection of Path
        Whether existing files may be replaced: all, none, or only those listed.
    staging : Path, optional
        Folder for the temporary files (on the same file system as the destinations);
        default: each destination's own folder.

    Returns
    -------
    list of Path
        The destinations.

    Raises
    ------
    FileExistsError
        A destination exists and may not be replaced (checked before writing anything).
    OSError
        Writing failed; ``filename`` is the destination. Nothing was changed.
    RollbackError
        (an OSError) Writing failed and the files already renamed could not all be
        put back; the message names each such file and where its previous content
        is kept (``<stem>.previous-<time><suffix>``).
    """
    items = [(Path(p), w) for p, w in items]
    replace = _replace_rule(overwrite)
    for dest, _ in items:
        if not replace(dest) and os.path.lexists(dest):
            raise _exists_error(dest)
    staged: list[tuple[Path, Path]] = []
    try:
        for dest, write in items:
            with _about(dest):
                _make_parent(dest)
                staged.append((_write_part(dest, write, staging), dest))
        _commit(staged, replace)
    finally:
        for tmp, _ in staged:
            _discard(tmp)
    return [dest for dest, _ in items]


def _atomic_write(path: Path, write: Writer, overwrite: bool) -> Path:
    return write_group([(path, write)], overwrite=overwrite)[0]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def tiff_writer(arr: np.ndarray) -> Writer:
    """A writer (for :func:`write_group`) of ``arr`` as a deflate-compressed TIFF."""
    import tifffile

    data = np.asarray(arr)
    rgb = data.ndim == 3 and data.shape[-1] in (3, 4) and data.dtype in (np.uint8, np.uint16)

    def _w(tmp: Path) -> None:
        tifffile.imwrite(tmp, data, compression="zlib", photometric="rgb" if rgb else "minisblack")

    return _w


def png_writer(arr: np.ndarray) -> Writer:
    """A writer (for :func:`write_group`) of an 8-bit RGB(A) or grayscale PNG."""
    import imageio.v3 as iio

    def _w(tmp: Path) -> None:
        iio.imwrite(tmp, np.asarray(arr), extension=".png")

    return _w


def bytes_writer(data: bytes) -> Writer:
    """A writer (for :func:`write_group`) of raw bytes (JSON, CSV, ...)."""
    return lambda tmp: tmp.write_bytes(data)


def write_tiff(path: str | os.PathLike, arr: np.ndarray, *, overwrite: bool = False) -> Path:
    """Write ``arr`` to a deflate-compressed TIFF atomically."""
    return _atomic_write(Path(path), tiff_writer(arr), overwrite)


def write_png(path: str | os.PathLike, arr: np.ndarray, *, overwrite: bool = False) -> Path:
    """Write an 8-bit RGB(A) or grayscale array to PNG atomically."""
    return _atomic_write(Path(path), png_writer(arr), overwrite)


def write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write raw bytes (JSON, CSV, ...) atomically."""
    return _atomic_write(Path(path), bytes_writer(data), overwrite)


# ------------------------------------------------------- output folders: checks, clean-up


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may still be running (True when unsure)."""
    if pid <= 0 or pid == os.getpid() or os.name == "nt":  # nt: os.kill(pid, 0) would kill
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True
    return True


def _is_stale(entry: os.DirEntry) -> bool:
    match = _PART_RE.match(entry.name)
    if match is None:
        return False
    try:
        touched = entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return False
    if match["t"]:  # made then; a backup (hard link or copy2) keeps the old file's mtime
        touched = max(touched, int(match["t"], 36))
    if time.time() - touched > STALE_PART_AGE_S:
        return True
    here = match["host"] is None or match["host"] == _host_tag()
    return here and not _pid_alive(int(match["pid"]))


def remove_stale_parts(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary ``.part`` files (and staging folders) a killed run left.

    Only entries directly in ``folder`` named by our own pattern
    ``.<name>.<pid>@<host>.t<time>-<random>.part`` are removed, and only when they
    are more than a day old (since made, or since last written), or when they are
    this host's and their process is gone. A part of another host (a cluster node or
    container sharing the folder) is removed only by age: its pid means nothing
    here. Anything else is never touched. Best effort.

    Returns
    -------
    list of Path
        What was removed.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not _is_stale(entry):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def staging_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder inside ``folder`` (same file system), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=_part_prefix("staging"), suffix=".part", dir=folder))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def check_free_space(path: str | os.PathLike, need_bytes: int = 0) -> None:
    """Refuse (InputError) when the disk of ``path`` clearly lacks room for the outputs.

    ``need_bytes`` is an estimate of the outputs' size; at least 1 MB is asked for.
    """
    path = Path(path).expanduser()
    try:
        free = shutil.disk_usage(_nearest_existing(path)).free
    except OSError:
        return  # unknown here: a write that does not fit still ends with a clear error
    need = max(int(need_bytes), MIN_FREE_BYTES)
    if free < need:
        raise InputError(
            f"{path}: only {_size(free)} free on its disk; the outputs need about {_size(need)}"
        )


def _probe(folder: Path) -> None:
    """Create and remove a tiny file: permission bits say nothing for root or read-only mounts."""
    fd, probe = tempfile.mkstemp(prefix=".napari-medinst-probe-", dir=folder)
    os.close(fd)
    os.unlink(probe)


def check_output_dir(path: str | os.PathLike, need_bytes: int = 0) -> Path:
    """Check, before any work, that outputs can be written into folder ``path``.

    The folder need not exist yet; then its nearest existing parent must be a folder in
    which files can be created (the writers create the folder). Nothing is left behind.

    Raises
    ------
    InputError
        ``path`` is a file, lies below a file, cannot be written, or its disk is full
        (see :func:`check_free_space`); the message names ``path`` and the reason.
    """
    path = Path(path).expanduser()
    base = _nearest_existing(path)
    try:
        if not base.is_dir():
            what = "is a file" if base == path else f"cannot be created: {base} is a file"
            raise InputError(f"{path}: {what}, not a folder; choose an output folder")
        _probe(base)
    except OSError as exc:
        where = "" if base == path else f" (in {base})"
        raise InputError(f"{path}: cannot write there{where}: {os_error_reason(exc)}") from exc
    check_free_space(path, need_bytes)
    return path
