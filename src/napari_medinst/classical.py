"""Classical fallback segmenter: stain / intensity threshold + distance-transform watershed.

For H&E the haematoxylin channel of a colour deconvolution (Ruifrok & Johnston, 2001)
is thresholded with Otsu's method; for fluorescence the normalised intensity is. Touching
nuclei are separated by a watershed on the distance transform seeded at its h-maxima.
It needs no training and is the baseline the model's benchmarks are compared with.

It works on the network input at the canonical pixel size (see
:mod:`napari_medinst.preprocess`) and returns the same kind of maps the network does
(a soft foreground probability, HV maps and contours of its instances), so the widgets
and the post-processing treat it like any other model.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from .model.inference import Maps
from .preprocess import Modality
from .targets import contour_map, hv_maps, relabel_sequential

__all__ = ["classical_labels", "classical_maps", "stain_signal"]


def stain_signal(net_input: np.ndarray, modality: Modality) -> np.ndarray:
    """Nuclear signal, high on nuclei: haematoxylin (H&E) or intensity (fluorescence)."""
    if modality == "he":
        rgb = np.clip(net_input.transpose(1, 2, 0), 1e-3, 1.0)
        return rgb2hed(rgb)[..., 0].astype(np.float32)
    return net_input[0].astype(np.float32)


def classical_labels(
    net_input: np.ndarray,
    modality: Modality,
    *,
    smoothing: float = 0.5,
    h: float = 0.6,
    threshold_factor: float = 1.1,
    min_size: int = 6,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Instances at the canonical scale, the smoothed signal and its Otsu threshold."""
    sig = ndi.gaussian_filter(stain_signal(net_input, modality), smoothing)
    thr = (
        threshold_factor * float(threshold_otsu(sig)) if np.ptp(sig) > 0 else float(sig.max()) + 1.0
    )
    fg = ndi.binary_opening(ndi.binary_fill_holes(sig > thr))
    dist = ndi.distance_transform_edt(fg)
    markers, _ = ndi.label(h_maxima(ndi.gaussian_filter(dist, 1.0), h))
    labels = watershed(-dist, markers, mask=fg)
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    labels[small[labels]] = 0
    labels, _ = relabel_sequential(labels)
    return labels, sig, thr


def classical_maps(net_input: np.ndarray, modality: Modality) -> Maps:
    """The classical result expressed as maps (probability, HV, contour)."""
    labels, sig, thr = classical_labels(net_input, modality)
    spread = float(np.std(sig)) or 1.0
    prob = 1.0 / (1.0 + np.exp(-(sig - thr) / (0.25 * spread)))
    prob = np.where(labels > 0, np.maximum(prob, 0.51), np.minimum(prob, 0.49)).astype(np.float32)
    return Maps(prob=prob, hv=hv_maps(labels), contour=contour_map(labels, 1).astype(np.float32))
