"""Marker flooding for the post-processing's watershed stage, without wrapper copies.

``skimage.segmentation.watershed`` validates its inputs and then makes full-size copies
of them (a float64 image, padded image, mask and markers, a masked marker image and a
cropped output): on a 1000x1000 box that is ~30 MB of fresh memory per call, which costs
more than the flood itself. :func:`flood` gives the same result by calling scikit-image's
compiled flood kernel on padded buffers that are filled in one pass and reused between
calls (per thread, up to :data:`SCRATCH_MAX_PIXELS`).

The kernel is not public API. Before it is first used, a small problem is solved both
ways; if the kernel is missing, has another signature or disagrees, every call goes
through the public ``watershed`` instead (same results, slower).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import numpy as np
from skimage.segmentation import watershed

__all__ = ["flood"]

#: Boxes up to this many pixels reuse per-thread buffers (13 bytes per pixel, ~52 MB);
#: larger ones get fresh buffers that are freed after the call.
SCRATCH_MAX_PIXELS = 4_000_000

_local = threading.local()


def _buffer(name: str, n: int, dtype: type, keep: bool) -> np.ndarray:
    if not keep:
        return np.empty(n, dtype)
    pool = _local.__dict__.setdefault("pool", {})
    buf = pool.get(name)
    if buf is None or buf.size < n:
        buf = pool[name] = np.empty(n, dtype)
    return buf[:n]


def _flood_kernel(
    energy: np.ndarray, seeds: np.ndarray, mask: np.ndarray, kernel: Callable, keep: bool
) -> np.ndarray:
    h, w = energy.shape
    hp, wp = h + 2, w + 2
    image = _buffer("image", hp * wp, np.float64, keep).reshape(hp, wp)
    allowed = _buffer("mask", hp * wp, np.int8, keep).reshape(hp, wp)
    out = _buffer("out", hp * wp, np.int32, keep).reshape(hp, wp)
    # a one-pixel frame outside the mask keeps every neighbour index in bounds
    for a in (allowed, out):
        a[0], a[-1], a[:, 0], a[:, -1] = 0, 0, 0, 0
    image[1:-1, 1:-1] = energy
    allowed[1:-1, 1:-1] = mask
    seeded = seeds > 0
    seeded &= mask
    np.multiply(seeds, seeded, out=out[1:-1, 1:-1], casting="unsafe")
    at = np.flatnonzero(seeded)
    at += wp + 1 + 2 * (at // w)  # box index -> padded index
    kernel(
        image.ravel(),
        at,
        np.array([-wp, -1, 1, wp], np.intp),  # 4-connectivity, as watershed's default
        allowed.ravel(),
        np.array([wp, 1], np.intp),
        0.0,  # compactness
        out.ravel(),
        False,  # no watershed lines
    )
    return out[1:-1, 1:-1]


def _agrees(kernel: Callable) -> bool:
    """Whether ``kernel`` solves a small random problem exactly as ``watershed`` does."""
    rng = np.random.default_rng(0)
    for levels in (None, 4):  # distinct energies, then plateaus (the order among ties)
        energy = rng.random((23, 31))
        if levels:
            energy = np.floor(energy * levels)
        mask = rng.random(energy.shape) < 0.8
        seeds = np.zeros(energy.shape, np.int32)
        seeds.flat[rng.choice(energy.size, 12, replace=False)] = np.arange(1, 13)
        try:
            got = _flood_kernel(energy, seeds, mask, kernel, keep=False)
        except Exception:  # another signature or dtype rules: use the public function
            return False
        if not np.array_equal(got, watershed(energy, seeds, mask=mask)):
            return False
    return True


@functools.cache
def _kernel() -> Callable | None:
    """scikit-image's flood kernel if it is there and agrees with ``watershed``."""
    try:
        from skimage.segmentation._watershed_cy import watershed_raveled
    except ImportError:
        return None
    return watershed_raveled if _agrees(watershed_raveled) else None


def flood(energy: np.ndarray, seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``skimage.segmentation.watershed(energy, seeds, mask=mask)``, faster.

    4-connected flooding of ``energy`` from the ``seeds`` inside ``mask`` (taken as
    boolean); pixels outside it are 0. Only labels > 0 seed (``watershed`` would also
    seed from negative ones). Seeds of a type that int32 holds give an int32 result that
    may be a view of a per-thread buffer: it is valid until the next call in the same
    thread, so copy what you keep. Wider seed types go through ``watershed``.
    """
    kernel = _kernel()
    seeds = np.asarray(seeds)
    if kernel is None or not np.can_cast(seeds.dtype, np.int32, "safe"):
        return watershed(energy, seeds, mask=mask)
    mask = np.asarray(mask, bool)
    if energy.shape != seeds.shape or energy.shape != mask.shape or energy.ndim != 2:
        raise ValueError(f"flood: shapes differ {energy.shape}, {seeds.shape}, {mask.shape}")
    keep = (energy.shape[0] + 2) * (energy.shape[1] + 2) <= SCRATCH_MAX_PIXELS
    return _flood_kernel(energy, seeds, mask, kernel, keep)
