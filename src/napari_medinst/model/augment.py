"""Augmentation for training: geometry, scale, stain / intensity, blur, noise, copy-paste.

Everything acts on a network input ``(3, H, W)`` float32 and its instance labels; the
training targets are always computed afterwards from the augmented labels (never
warped as maps), so foreground, HV and contour stay exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.color import hed2rgb, rgb2hed

from ..targets import relabel_sequential

__all__ = ["AugmentConfig", "copy_paste", "photometric", "random_crop"]


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings (saved in the training config)."""

    scale_range: tuple[float, float] = (0.7, 1.4)
    stain_sigma: float = 0.25  # H&E: multiplicative jitter of each HED channel
    stain_bias: float = 0.03
    intensity_gamma: tuple[float, float] = (0.6, 1.6)  # fluorescence
    intensity_gain: tuple[float, float] = (0.6, 1.4)
    blur_prob: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    noise_prob: float = 0.3
    noise_sigma: float = 0.04
    grey_prob: float = 0.05  # H&E converted to grey, for unusual stains
    copy_paste_prob: float = 0.5
    copy_paste_max: int = 12
    copy_paste_scale: tuple[float, float] = (0.8, 1.25)
    copy_paste_max_overlap: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AugmentConfig:
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


def _resize_nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows = np.minimum((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0], labels.shape[0] - 1)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1], labels.shape[1] - 1)
    return labels[rows.astype(np.int64)[:, None], cols.astype(np.int64)[None, :]]


def _resize_linear(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    zoom = (1, shape[0] / image.shape[1], shape[1] / image.shape[2])
    out = ndi.zoom(image, zoom, order=1, mode="nearest", grid_mode=True)
    return out[:, : shape[0], : shape[1]]


def random_crop(
    image: np.ndarray,
    labels: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (1.0, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` x ``size`` crop, zoomed by a log-uniform factor, flipped and rotated."""
    lo, hi = np.log(scale_range[0]), np.log(scale_range[1])
    s = float(np.exp(rng.uniform(lo, hi)))
    src = max(8, round(size / s))
    h, w = labels.shape
    if h < src or w < src:
        ph, pw = max(0, src - h), max(0, src - w)
        pad_val = np.median(image.reshape(3, -1), axis=1)
        image = np.stack(
            [np.pad(image[c], ((0, ph), (0, pw)), constant_values=pad_val[c]) for c in range(3)]
        )
        labels = np.pad(labels, ((0, ph), (0, pw)))
        h, w = labels.shape
    r0 = int(rng.integers(0, h - src + 1))
    c0 = int(rng.integers(0, w - src + 1))
    img = image[:, r0 : r0 + src, c0 : c0 + src]
    lab = labels[r0 : r0 + src, c0 : c0 + src]
    if src != size:
        img = _resize_linear(img, (size, size))
        lab = _resize_nearest(lab, (size, size))
    k = int(rng.integers(0, 4))
    img, lab = np.rot90(img, k, axes=(1, 2)), np.rot90(lab, k)
    if rng.random() < 0.5:
        img, lab = img[:, :, ::-1], lab[:, ::-1]
    return np.ascontiguousarray(img, np.float32), np.ascontiguousarray(lab)


def _stain_jitter(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    rgb = np.clip(img.transpose(1, 2, 0), 0.0, 1.0)
    hed = rgb2hed(rgb)
    alpha = rng.uniform(1 - cfg.stain_sigma, 1 + cfg.stain_sigma, 3)
    beta = rng.uniform(-cfg.stain_bias, cfg.stain_bias, 3)
    out = hed2rgb(hed * alpha + beta).astype(np.float32)
    # brightness / contrast / saturation
    grey = out.mean(axis=2, keepdims=True)
    sat = rng.uniform(0.7, 1.3)
    out = grey + (out - grey) * sat
    out = (out - 0.5) * rng.uniform(0.8, 1.2) + 0.5 + rng.uniform(-0.08, 0.08)
    if rng.random() < cfg.grey_prob:
        out = np.repeat(out.mean(axis=2, keepdims=True), 3, axis=2)
    return np.clip(out, 0.0, 1.0).transpose(2, 0, 1)


def _intensity_jitter(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    gamma = rng.uniform(*cfg.intensity_gamma)
    gain = rng.uniform(*cfg.intensity_gain)
    x = np.clip(img[0], 0.0, None) ** gamma * gain + rng.uniform(-0.1, 0.1)
    return np.repeat(x[None], 3, axis=0).astype(np.float32)


def photometric(
    img: np.ndarray, modality: str, cfg: AugmentConfig, rng: np.random.Generator
) -> np.ndarray:
    """Stain (H&E) or intensity (fluorescence) jitter, then optional blur and noise."""
    img = _stain_jitter(img, cfg, rng) if modality == "he" else _intensity_jitter(img, cfg, rng)
    if rng.random() < cfg.blur_prob:
        sigma = rng.uniform(*cfg.blur_sigma)
        img = ndi.gaussian_filter(img, (0, sigma, sigma))
    if rng.random() < cfg.noise_prob:
        img = img + rng.normal(0.0, rng.uniform(0, cfg.noise_sigma), img.shape).astype(np.float32)
    return img.astype(np.float32)


def copy_paste(
    image: np.ndarray,
    labels: np.ndarray,
    donor_image: np.ndarray,
    donor_labels: np.ndarray,
    rng: np.random.Generator,
    *,
    n_max: int = 12,
    scale_range: tuple[float, float] = (0.8, 1.25),
    max_overlap: float = 0.1,
    tries: int = 5,
    types: np.ndarray | None = None,
    donor_types: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Paste up to ``n_max`` nuclei of the donor into ``image`` / ``labels``.

    Each nucleus (its pixels and mask) is cut from the donor, zoomed by a random factor
    in ``scale_range``, rotated / flipped, and pasted at a random position where at most
    ``max_overlap`` of its area covers existing nuclei. The pasted nucleus takes a new id
    and lies on top. Returns the new image, the new labels (sequential) and the number
    of nuclei pasted. With per-pixel class maps ``types`` and ``donor_types`` (nucleus
    types), ``types`` is updated in place: a pasted nucleus keeps its donor class.
    """
    image = image.copy()
    labels = labels.astype(np.int32, copy=True)
    boxes = ndi.find_objects(donor_labels)
    ids = [i + 1 for i, b in enumerate(boxes) if b is not None]
    if not ids:
        return image, labels, 0
    chosen = rng.choice(ids, size=min(n_max, len(ids)), replace=False)
    next_id = int(labels.max()) + 1
    h, w = labels.shape
    pasted = 0
    for nid in chosen:
        sl = boxes[nid - 1]
        mask = donor_labels[sl] == nid
        patch = donor_image[(slice(None), *sl)]
        cls = 0
        if types is not None and donor_types is not None:
            cls = int(np.bincount(donor_types[sl][mask].astype(np.int64)).argmax())
        s = float(rng.uniform(*scale_range))
        if not np.isclose(s, 1.0):
            shape = (max(1, round(mask.shape[0] * s)), max(1, round(mask.shape[1] * s)))
            mask = _resize_nearest(mask, shape)
            patch = _resize_linear(patch, shape)
        k = int(rng.integers(0, 4))
        mask, patch = np.rot90(mask, k), np.rot90(patch, k, axes=(1, 2))
        mh, mw = mask.shape
        if mh >= h or mw >= w or mask.sum() < 4:
            continue
        for _ in range(tries):
            r0, c0 = int(rng.integers(0, h - mh)), int(rng.integers(0, w - mw))
            region = labels[r0 : r0 + mh, c0 : c0 + mw]
            if (region[mask] > 0).mean() <= max_overlap:
                region[mask] = next_id
                image[:, r0 : r0 + mh, c0 : c0 + mw][:, mask] = patch[:, mask]
                if types is not None:
                    types[r0 : r0 + mh, c0 : c0 + mw][mask] = cls
                next_id += 1
                pasted += 1
                break
    labels, _ = relabel_sequential(labels)
    return image, labels, pasted
