"""Training targets from instance labels: foreground, HV maps, contours, types, HV gradients.

HV maps follow HoVer-Net (Graham et al., 2019, Medical Image Analysis 58:101563): for
every nucleus, the horizontal (H) and vertical (V) offsets of its pixels from the
nucleus' centre of mass, each scaled to [-1, 1] separately on the negative and the
positive side, so that the map runs from -1 at the nucleus' left (top) edge to +1 at
its right (bottom) edge.

Everything here is vectorised over all nuclei at once (no Python loop per nucleus).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ._io import check_labels

__all__ = [
    "Targets",
    "contour_map",
    "foreground_map",
    "hv_energy",
    "hv_gradient_magnitude",
    "hv_gradients",
    "hv_maps",
    "make_targets",
    "relabel_sequential",
    "type_map",
]


def relabel_sequential(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map the ids of ``labels`` onto 1..N (0 stays background).

    Returns the relabelled image (int32) and the original id of each new id
    (``old_ids[k - 1]`` is the original id of new id ``k``).
    """
    labels = check_labels(labels)
    flat = labels.ravel()
    if flat.size == 0 or flat.max() == 0:
        return np.zeros(labels.shape, np.int32), np.zeros(0, dtype=labels.dtype)
    top = int(flat.max())
    if top < 4 * flat.size + 1024:
        present = np.flatnonzero(np.bincount(flat, minlength=top + 1))
        present = present[present > 0]
        lut = np.zeros(top + 1, np.int32)
        lut[present] = np.arange(1, present.size + 1, dtype=np.int32)
        return lut[labels], present.astype(labels.dtype)
    uniq, inv = np.unique(flat, return_inverse=True)
    # with background present it is uniq[0] and inverse index 0 already; else shift by one
    new = (inv if uniq[0] == 0 else inv + 1).astype(np.int32).reshape(labels.shape)
    return new, uniq[uniq > 0]


def foreground_map(labels: np.ndarray) -> np.ndarray:
    """Nuclear-pixel map: 1 inside any nucleus, 0 elsewhere (uint8)."""
    return (check_labels(labels) > 0).astype(np.uint8)


def hv_maps(labels: np.ndarray) -> np.ndarray:
    """Horizontal and vertical distance maps, shape ``(2, H, W)``, float32 in [-1, 1].

    Channel 0 is H (offset along columns), channel 1 is V (offset along rows), both
    zero on the background. A nucleus one pixel wide along an axis gets 0 on that axis.
    """
    seq, _ = relabel_sequential(labels)
    out = np.zeros((2, *seq.shape), np.float32)
    n = int(seq.max())
    if n == 0:
        return out
    rr, cc = np.nonzero(seq)
    ids = seq[rr, cc]
    counts = np.bincount(ids, minlength=n + 1).astype(np.float64)
    counts[0] = 1.0
    boxes = ndi.find_objects(seq)
    for axis, coord in ((1, cc), (0, rr)):
        centre = np.bincount(ids, weights=coord, minlength=n + 1) / counts
        lo = np.array([b[axis].start if b is not None else 0 for b in boxes], np.float64)
        hi = np.array([b[axis].stop - 1 if b is not None else 0 for b in boxes], np.float64)
        lo = np.concatenate([[0.0], lo])
        hi = np.concatenate([[0.0], hi])
        d = coord - centre[ids]
        neg_span = centre - lo
        pos_span = hi - centre
        scale = np.where(d < 0, neg_span[ids], pos_span[ids])
        with np.errstate(divide="ignore", invalid="ignore"):
            val = np.where(scale > 0, d / scale, 0.0)
        out[0 if axis == 1 else 1, rr, cc] = np.clip(val, -1.0, 1.0)
    return out


def contour_map(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """Inner boundary of every nucleus, ``width`` pixels wide (uint8).

    A nuclear pixel is on the contour when a pixel of another label (or background)
    lies within ``width`` pixels of it (chessboard distance).
    """
    if width < 1:
        raise ValueError(f"contour width must be >= 1, got {width}")
    labels = check_labels(labels)
    size = 2 * width + 1
    hi = ndi.maximum_filter(labels, size=size, mode="nearest")
    lo = ndi.minimum_filter(labels, size=size, mode="nearest")
    return ((labels > 0) & ((hi != labels) | (lo != labels))).astype(np.uint8)


def type_map(labels: np.ndarray, types: Mapping[int, int]) -> np.ndarray:
    """Per-pixel class map from a ``{label id: class}`` table (0 = background/unknown)."""
    labels = check_labels(labels)
    if not types:
        return np.zeros(labels.shape, np.int16)
    keys = np.fromiter((int(k) for k in types), np.int64)
    vals = np.fromiter((int(v) for v in types.values()), np.int64)
    if keys.min() < 0 or vals.min() < 0:
        raise ValueError("type table ids and classes must be non-negative")
    top = max(int(labels.max()), int(keys.max()))
    lut = np.zeros(top + 1, np.int16)
    lut[keys] = vals
    out = lut[labels]
    out[labels == 0] = 0
    return out


def _smoothing_kernel(ksize: int) -> np.ndarray:
    """Binomial smoothing kernel of odd size ``ksize`` >= 3 (the Sobel kernel's smoothing half)."""
    if ksize < 3 or ksize % 2 == 0:
        raise ValueError(f"Sobel kernel size must be odd and >= 3, got {ksize}")
    smooth = np.array([1.0])
    for _ in range(ksize - 1):
        smooth = np.convolve(smooth, [0.5, 0.5])
    return smooth.astype(np.float32)


def hv_gradients(hv: np.ndarray, ksize: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Sobel-type derivatives of the HV maps: ``dH/dx`` and ``dV/dy`` (float32).

    Inside a nucleus both are positive (the maps rise from -1 to +1); they turn negative
    where a nucleus ends: against the background, or where one nucleus touches another.
    Each is half the difference of the (perpendicularly smoothed) map ``ksize // 2``
    pixels ahead and behind, so a jump from +1 to -1 reads as -1 whatever ``ksize``.
    No per-image normalisation is applied, so values on a crop equal those on the
    whole image away from a ``ksize // 2`` margin.
    """
    hv = np.asarray(hv, np.float32)
    if hv.ndim != 3 or hv.shape[0] != 2:
        raise ValueError(f"HV maps must have shape (2, H, W), got {hv.shape}")
    # the difference's factor 1/2 goes into the smoothing kernel: scaling by a power of
    # two is exact, so this is bit-identical and saves a pass over each map
    smooth = 0.5 * _smoothing_kernel(ksize)
    half = ksize // 2
    h = ndi.correlate1d(hv[0], smooth, axis=0, mode="nearest")
    v = ndi.correlate1d(hv[1], smooth, axis=1, mode="nearest")
    return _difference(h, half, axis=1), _difference(v, half, axis=0)


def hv_gradient_magnitude(hv: np.ndarray, ksize: int = 5) -> np.ndarray:
    """Combined magnitude ``sqrt((dH/dx)^2 + (dV/dy)^2)`` of the HV gradients (float32).

    The "HV gradient" picture of HoVer-Net: low and even inside a nucleus, bright along
    its edge and brightest where two nuclei touch (there both maps jump by 2). For the
    watershed, :func:`hv_energy` keeps only the falling part, which is what separates
    nuclei; this map shows all of it.
    """
    gh, gv = hv_gradients(hv, ksize)
    return np.hypot(gh, gv, out=gh)


def _difference(a: np.ndarray, half: int, axis: int) -> np.ndarray:
    """``a[i + half] - a[i - half]`` along ``axis``, edges clamped ("nearest")."""
    a = np.moveaxis(a, axis, -1)
    n = a.shape[-1]
    idx = np.arange(n)
    ahead = np.minimum(idx + half, n - 1)
    behind = np.maximum(idx - half, 0)
    if n <= 2 * half:
        out = a[..., ahead] - a[..., behind]
    else:
        out = np.empty_like(a)
        np.subtract(a[..., 2 * half :], a[..., : n - 2 * half], out=out[..., half : n - half])
        for edge in (slice(0, half), slice(n - half, n)):
            out[..., edge] = a[..., ahead[edge]] - a[..., behind[edge]]
    return np.moveaxis(out, -1, axis)


def hv_energy(
    hv: np.ndarray,
    ksize: int = 5,
    contour: np.ndarray | None = None,
    contour_weight: float = 0.0,
) -> np.ndarray:
    """Boundary energy in [0, 1] from the HV maps: high between nuclei, ~0 inside.

    ``max(-dH/dx, -dV/dy, 0)``: only *falling* HV values mark a boundary, since the
    maps rise monotonically across every nucleus. Unlike HoVer-Net's
    ``1 - minmax(|sobel|)`` this needs no per-tile normalisation, so it is crop-stable.
    With a ``contour`` probability map (values in [0, 1]), ``contour_weight`` times it
    is added before the result is clipped to 1.
    """
    gh, gv = hv_gradients(hv, ksize)
    energy = np.minimum(gh, gv, out=gh)  # max(-gh, -gv) = -min(gh, gv), in place
    np.negative(energy, out=energy)
    np.maximum(energy, 0.0, out=energy)  # before the contour term: falling HV only
    if contour is not None and contour_weight > 0:
        energy += np.multiply(contour, contour_weight, out=gv)
    np.clip(energy, 0.0, 1.0, out=energy)
    return energy


@dataclass(frozen=True)
class Targets:
    """All per-pixel targets of one label image."""

    foreground: np.ndarray  # (H, W) uint8
    hv: np.ndarray  # (2, H, W) float32
    contour: np.ndarray  # (H, W) uint8
    types: np.ndarray | None = None  # (H, W) int16


def make_targets(
    labels: np.ndarray,
    *,
    contour_width: int = 1,
    types: Mapping[int, int] | None = None,
) -> Targets:
    """Compute foreground, HV, contour (and type) targets from instance labels."""
    labels = check_labels(labels)
    return Targets(
        foreground=foreground_map(labels),
        hv=hv_maps(labels),
        contour=contour_map(labels, contour_width),
        types=None if types is None else type_map(labels, types),
    )
