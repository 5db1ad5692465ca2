"""Reading and writing images and label maps, with clear errors and atomic writes.

Every reader raises :class:`InputError` with a one-line message that names the file and
the problem; every writer writes to a temporary file in the destination folder and
renames it into place, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


class InputError(ValueError):
    """A user-supplied file or array cannot be used; the message says why."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a TIFF, PNG or JPEG image as a numpy array.

    Raises
    ------
    InputError
        If the file is missing, is not a readable image, or has no pixels.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected an image file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        elif suffix in (".png", ".jpg", ".jpeg"):
            import imageio.v3 as iio

            arr = iio.imread(path)
        else:
            raise InputError(
                f"{path}: unsupported file type {suffix or '(none)'!r}; "
                f"expected one of {', '.join(IMAGE_SUFFIXES)}"
            )
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
    arr = np.asarray(arr)
    if arr.size == 0:
        raise InputError(f"{path}: image has no pixels (shape {arr.shape})")
    return arr


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


def _atomic_write(path: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes it private; use the usual mode
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_tiff(path: str | os.PathLike, arr: np.ndarray, *, overwrite: bool = False) -> Path:
    """Write ``arr`` to a deflate-compressed TIFF atomically."""
    import tifffile

    data = np.asarray(arr)
    rgb = data.ndim == 3 and data.shape[-1] in (3, 4) and data.dtype in (np.uint8, np.uint16)

    def _w(tmp: Path) -> None:
        tifffile.imwrite(tmp, data, compression="zlib", photometric="rgb" if rgb else "minisblack")

    return _atomic_write(Path(path), _w, overwrite)


def write_png(path: str | os.PathLike, arr: np.ndarray, *, overwrite: bool = False) -> Path:
    """Write an 8-bit RGB(A) or grayscale array to PNG atomically."""
    import imageio.v3 as iio

    def _w(tmp: Path) -> None:
        iio.imwrite(tmp, np.asarray(arr), extension=".png")

    return _atomic_write(Path(path), _w, overwrite)


def write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write raw bytes (JSON, CSV, ...) atomically."""
    return _atomic_write(Path(path), lambda tmp: tmp.write_bytes(data), overwrite)
