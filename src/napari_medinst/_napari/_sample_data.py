"""npe2 sample-data contributions: image plus its manual ground truth."""

from __future__ import annotations

from ..samples import load_sample


def _layers(key: str) -> list[tuple]:
    image, labels, s = load_sample(key)
    meta = {"pixel_size_um": s.pixel_size, "modality": s.modality, "source": s.title}
    rgb = image.ndim == 3
    return [
        (image, {"name": f"{key} sample", "rgb": rgb, "metadata": meta}, "image"),
        (
            labels,
            {
                "name": f"{key} sample ground truth",
                "visible": False,
                "opacity": 0.5,
                "metadata": {"ground_truth": True, "source": s.title},
            },
            "labels",
        ),
    ]


def he_sample() -> list[tuple]:
    """H&E tile, 40x, with its annotation (MoNuSeg 2018 training set, CC BY-NC-SA 4.0)."""
    return _layers("he")


def fluorescence_sample() -> list[tuple]:
    """Fluorescence tile with its annotation (DSB 2018 / BBBC038, CC0)."""
    return _layers("fluorescence")
