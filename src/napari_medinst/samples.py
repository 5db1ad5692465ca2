"""The bundled sample images (see ``data/SOURCE.md`` for origin and licenses)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._io import read_image, read_labels

__all__ = ["SAMPLES", "Sample", "load_sample"]

DATA = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Sample:
    key: str
    title: str
    image: str
    labels: str
    pixel_size: float | None  # µm/px, None when unknown
    modality: str


SAMPLES = {
    "he": Sample(
        "he", "H&E tile (MoNuSeg 2018 train, 40x)", "he_tile.tif", "he_tile_labels.tif", 0.25, "he"
    ),
    "fluorescence": Sample(
        "fluorescence",
        "Fluorescence tile (DSB 2018, BBBC038)",
        "fluo_tile.tif",
        "fluo_tile_labels.tif",
        None,
        "fluorescence",
    ),
}


def load_sample(key: str) -> tuple[np.ndarray, np.ndarray, Sample]:
    """Image, ground-truth labels and description of a bundled sample."""
    if key not in SAMPLES:
        raise KeyError(f"unknown sample {key!r}; choose from {sorted(SAMPLES)}")
    s = SAMPLES[key]
    return read_image(DATA / s.image), read_labels(DATA / s.labels), s
