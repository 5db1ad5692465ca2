"""Overlay rendering: instance outlines drawn on the image, for PNG export."""

from __future__ import annotations

import numpy as np
from skimage.segmentation import find_boundaries

from .preprocess import prepare_image, to_network_input

__all__ = ["overlay_rgb"]


def overlay_rgb(image: np.ndarray, labels: np.ndarray, colour=(0, 255, 0)) -> np.ndarray:
    """uint8 RGB of ``image`` with the outlines of ``labels`` drawn in ``colour``."""
    arr = prepare_image(image)
    if arr.ndim == 2:
        grey = np.clip(to_network_input(arr, "fluorescence")[0], 0, 1)
        rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    else:
        rgb = (np.clip(to_network_input(arr, "he"), 0, 1).transpose(1, 2, 0) * 255).astype(np.uint8)
    rgb = rgb.copy()
    rgb[find_boundaries(labels, mode="inner")] = colour
    return rgb
