"""Image normalisation, modality detection and rescaling to the canonical pixel size.

The network sees every image at :data:`CANONICAL_PIXEL_SIZE` µm/px as a float32
``(3, H, W)`` array: H&E / brightfield RGB scaled to [0, 1], fluorescence normalised by
its 1st and 99.8th percentiles and repeated on three channels.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np

from ._io import InputError

__all__ = [
    "CANONICAL_DIAMETER",
    "CANONICAL_PIXEL_SIZE",
    "DEFAULT_PIXEL_SIZE",
    "PIXEL_SIZE_RANGE",
    "SCALE_SNAP",
    "TYPICAL_PIXEL_SIZE",
    "Modality",
    "PixelSizeWarning",
    "check_pixel_size",
    "colour_divisor",
    "detect_modality",
    "network_scale",
    "percentile_range",
    "prepare_image",
    "to_network_input",
    "work_dtype",
]

Modality = Literal["he", "fluorescence"]

#: Working pixel size of the network, µm per pixel.
CANONICAL_PIXEL_SIZE = 0.5
#: A pixel size within this factor of 0.5 µm/px times a power of two is run at exactly
#: that power of two (:func:`network_scale`).
SCALE_SNAP = 1.12


def network_scale(pixel_size: float) -> float:
    """The factor an image of ``pixel_size`` µm/px is resampled by for the network.

    ``pixel_size / 0.5``, except within :data:`SCALE_SNAP` (12 %) of a power of two, where
    it is that power of two: a 0.2428 µm/px Aperio slide runs at exactly half its
    resolution, a 0.4530 µm/px Hamamatsu level at its own. Resampling by a power of two
    puts every crop of an image on the whole image's pixel grid, so blocks and map regions
    give the whole image's maps exactly (at other factors each crop's samples move by a
    fraction of a pixel, and outlines with them), and a factor of 1 needs no resampling
    at all. The network then sees nuclei at most 12 % off its 0.5 µm/px, inside their
    natural spread: on 8 MoNuSeg training tiles resampled to 0.2232-0.28 µm/px, running
    them at the snapped scale instead of their own moved AJI by -0.004 to +0.004
    (docs/slides.md). Measurements keep the true pixel size.
    """
    scale = pixel_size / CANONICAL_PIXEL_SIZE
    if not scale > 0:
        return scale
    power = 2.0 ** round(math.log2(scale))
    return power if 1 / SCALE_SNAP <= scale / power <= SCALE_SNAP else scale


#: Assumed pixel size of H&E images that carry none (40x scanners, as MoNuSeg).
DEFAULT_PIXEL_SIZE = 0.25
#: Median nucleus diameter (px) at the canonical pixel size in MoNuSeg 2018 training
#: tiles (median equivalent diameter 23.6 px at 0.25 µm/px). Images without a pixel
#: size are rescaled so that their nuclei have this diameter.
CANONICAL_DIAMETER = 11.8
#: Pixel sizes (µm/px) accepted anywhere a user gives one: from a 100x oil objective
#: to a 2x overview. Anything outside is a typo or a unit mistake (nm, mm, px/µm).
PIXEL_SIZE_RANGE = (0.05, 5.0)
#: Pixel sizes of the microscopy this tool is made for (10x - 63x); outside this band a
#: run works but nuclei may be too small or too large for the model to find.
TYPICAL_PIXEL_SIZE = (0.1, 2.0)


class PixelSizeWarning(UserWarning):
    """A pixel size is plausible but unusual: results may be empty or poor."""


def check_pixel_size(value: object, what: str = "pixel size") -> float:
    """Validate a user-given pixel size (µm/px) and return it as a float.

    Parameters
    ----------
    value : object
        The pixel size; numbers and numeric strings are accepted.
    what : str
        Names the value in messages (an argument, a file, a field).

    Returns
    -------
    float
        The pixel size.

    Raises
    ------
    InputError
        When ``value`` is not a finite number inside :data:`PIXEL_SIZE_RANGE`.

    Warns
    -----
    PixelSizeWarning
        When the value is outside :data:`TYPICAL_PIXEL_SIZE`.
    """
    lo, hi = PIXEL_SIZE_RANGE
    try:
        size = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{what}: pixel size {value!r} is not a number (µm/px)") from None
    if isinstance(value, bool) or not math.isfinite(size) or not lo <= size <= hi:
        raise InputError(
            f"{what}: pixel size {value!r} µm/px is outside the plausible {lo:g}-{hi:g} range"
        )
    if not TYPICAL_PIXEL_SIZE[0] <= size <= TYPICAL_PIXEL_SIZE[1]:
        warnings.warn(
            f"{what}: pixel size {size:g} µm/px is far from the typical "
            f"{TYPICAL_PIXEL_SIZE[0]:g}-{TYPICAL_PIXEL_SIZE[1]:g}; results may be empty",
            PixelSizeWarning,
            stacklevel=2,
        )
    return size


def prepare_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Validate a 2-D image and return it as ``(H, W)`` or ``(H, W, 3)``.

    Accepts grayscale ``(H, W)``, ``(H, W, 1)``, RGB ``(H, W, 3)`` and RGBA
    ``(H, W, 4)`` (alpha dropped), any integer or float dtype. Raises
    :class:`InputError` on anything else, on NaN/inf, and on images smaller than 8 px.
    """
    arr = np.asarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"{name}: unsupported dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        raise InputError(
            f"{name}: shape {arr.shape} looks channel-first; expected (H, W) or (H, W, 3)"
        )
    if arr.ndim == 3 and arr.shape[-1] == 2:
        raise InputError(f"{name}: 2-channel images are not supported (shape {arr.shape})")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        raise InputError(
            f"{name}: expected a 2-D grayscale (H, W) or colour (H, W, 3/4) image, "
            f"got shape {arr.shape}"
        )
    if min(arr.shape[:2]) < 8:
        raise InputError(f"{name}: image too small ({arr.shape[0]}x{arr.shape[1]} px)")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise InputError(f"{name}: image contains NaN or infinite values")
    return arr


def detect_modality(image: np.ndarray) -> Modality:
    """Guess the modality: 'he' (brightfield) or 'fluorescence'.

    Grey images, colour images with equal channels, and colour images on a dark
    background (a DAPI/Hoechst channel saved as RGB) are fluorescence; colour images
    on a bright background are brightfield H&E.
    """
    arr = prepare_image(image)
    if arr.ndim == 2:
        return "fluorescence"
    step = max(1, arr.shape[0] * arr.shape[1] // 250_000)
    sample = _unit_range(arr.reshape(-1, 1, 3)[::step])[:, 0, :]
    if np.allclose(sample[:, 0], sample[:, 1]) and np.allclose(sample[:, 1], sample[:, 2]):
        return "fluorescence"
    if np.median(sample.max(axis=1)) < 0.35:  # mostly dark: emitted light, not transmitted
        return "fluorescence"
    return "he"


def colour_divisor(arr: np.ndarray) -> float:
    """What a colour image is divided by to reach [0, 1].

    Integers: 255, or their maximum when it is above 255 (16-bit RGB). Floats: 1 when
    they are already in [0, 1], else 255, or their maximum above 255 (taken in the
    image's own dtype, so float64 values beyond float32's range do not overflow).
    """
    if np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize == 1:
        return 255.0  # no pass over the pixels for the usual 8-bit image
    top = float(arr.max()) if arr.size else 0.0
    if np.issubdtype(arr.dtype, np.integer):
        return 255.0 if top <= 255 else top
    return 1.0 if top <= 1.0 + 1e-6 else (255.0 if top <= 255.0 else top)


def work_dtype(arr: np.ndarray) -> type:
    """float64 for float64 images (values beyond float32's ~3e38 would become inf and
    the image would silently read as empty), float32 otherwise."""
    return np.float64 if arr.dtype == np.float64 else np.float32


def percentile_range(sample: np.ndarray, lo: float = 1.0, hi: float = 99.8) -> tuple[float, float]:
    """(low percentile, span up to the high one) of grey values; span 0 for a flat image."""
    p_lo, p_hi = np.percentile(sample, [lo, hi])
    span = p_hi - p_lo
    return float(p_lo), float(span) if span >= 1e-6 * max(1.0, abs(p_hi)) else 0.0


def _unit_range(arr: np.ndarray) -> np.ndarray:
    """Scale a colour image to [0, 1] by :func:`colour_divisor`."""
    top = colour_divisor(arr)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float32) / top
    if top != 1.0:
        arr = arr / top
    return np.clip(arr, 0.0, 1.0).astype(np.float32, copy=False)


def _percentile_normalise(gray: np.ndarray, lo: float = 1.0, hi: float = 99.8) -> np.ndarray:
    work = gray.astype(work_dtype(gray), copy=False)
    step = max(1, work.size // 1_000_000)
    p_lo, span = percentile_range(work.ravel()[::step], lo, hi)
    if span == 0:
        return np.zeros(work.shape, np.float32)
    scaled = (work - work.dtype.type(p_lo)) / work.dtype.type(span)
    return np.clip(scaled, -0.2, 1.5).astype(np.float32, copy=False)


def to_network_input(image: np.ndarray, modality: Modality) -> np.ndarray:
    """Normalise a validated image to the network's float32 ``(3, H, W)`` input."""
    arr = prepare_image(image)
    if modality == "he":
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        rgb = _unit_range(arr)
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))
    if modality == "fluorescence":
        gray = arr if arr.ndim == 2 else arr.astype(work_dtype(arr)).max(axis=-1)
        norm = _percentile_normalise(gray)
        return np.ascontiguousarray(np.repeat(norm[None], 3, axis=0))
    raise InputError(f"unknown modality {modality!r}; expected 'he' or 'fluorescence'")
