"""Synthetic nuclei and network-like maps for benchmarks (no data files needed)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from napari_medinst.targets import make_targets


def synthetic_labels(shape=(1000, 1000), n=600, radius=(7, 13), seed=0) -> np.ndarray:
    """``n`` ellipses, many touching, ids 1..n (later ones drawn under earlier ones)."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int32)
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    for i in range(1, n + 1):
        r, c = rng.uniform(15, shape[0] - 15), rng.uniform(15, shape[1] - 15)
        a, b = rng.uniform(*radius, 2)
        t = rng.uniform(0, np.pi)
        r0, r1, c0, c1 = int(r - 15), int(r + 15), int(c - 15), int(c + 15)
        y, x = rr[r0:r1, c0:c1] - r, cc[r0:r1, c0:c1] - c
        u, v = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1
        win = lab[r0:r1, c0:c1]
        win[inside & (win == 0)] = i
    return lab


def network_like_maps(labels: np.ndarray, seed=0):
    """Targets blurred and with noise, as a trained network would output them."""
    rng = np.random.default_rng(seed)
    t = make_targets(labels)
    prob = ndi.gaussian_filter(t.foreground.astype(np.float32), 1.0)
    prob = np.clip(prob + rng.normal(0, 0.05, prob.shape), 0, 1).astype(np.float32)
    hv = ndi.gaussian_filter(t.hv, (0, 1.0, 1.0)).astype(np.float32)
    contour = ndi.gaussian_filter(t.contour.astype(np.float32), 1.0)
    return prob, hv, contour
