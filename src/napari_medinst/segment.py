"""High-level segmentation: image -> maps (model or classical) -> instances.

This is the one entry point the CLI, the main job and the widgets share. The image is
normalised, rescaled to the canonical pixel size, passed through the model in tiles,
and the maps are resampled back to the image's pixels, where the post-processing runs,
so instance boundaries keep the image's full resolution.

Pixel size: given by the caller (µm/px), or estimated. H&E is first taken at 40x
(0.25 µm/px); fluorescence from the median nucleus size of a quick threshold. Then a
check on the model's own result rescales once more when its nuclei come out far from
the size the model was trained at (a 20x slide, a cell line with large nuclei).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from ._io import InputError
from .classical import classical_labels, classical_maps
from .model.data import median_diameter
from .model.folder import LoadedModel, load_model, resolve_model_dir
from .model.inference import (
    DEFAULT_TTA,
    Maps,
    TileGrid,
    grid_span,
    pick_device,
    predict_maps,
    tta_flips,
)
from .postprocess import Postprocessor, PostprocessParams, PostprocessResult
from .preprocess import (
    CANONICAL_DIAMETER,
    CANONICAL_PIXEL_SIZE,
    DEFAULT_PIXEL_SIZE,
    TYPICAL_PIXEL_SIZE,
    Modality,
    PixelSizeWarning,
    check_pixel_size,
    detect_modality,
    network_scale,
    prepare_image,
    to_network_input,
)

__all__ = [
    "CLASSICAL",
    "MapResult",
    "Segmentation",
    "compute_maps",
    "default_params",
    "get_model",
    "grid_maps",
    "grid_read_box",
    "maps_from_input",
    "maps_on_grid",
    "maps_to_window",
    "segment",
    "tiles_read_box",
    "window_geometry",
    "working_need",
    "working_shape",
]

CLASSICAL = "classical"
#: Images above this many pixels are refused (crop a region first): the maps at the
#: image's resolution take ~16 bytes a pixel, post-processing as much again.
MAX_PIXELS = 150_000_000
_SCALE_TOLERANCE = (0.82, 1.4)  # first check: natural spread of nucleus sizes at 40x
_SCALE_CONVERGED = (0.88, 1.14)  # once rescaling, converge this close

_MODEL_CACHE: dict[tuple[str, str, int], LoadedModel] = {}


def get_model(name: str | LoadedModel, device: str = "auto") -> LoadedModel | str:
    """Load (once) a model by name or folder; ``'classical'`` passes through."""
    if isinstance(name, LoadedModel) or name == CLASSICAL:
        return name
    dev = str(pick_device(device))
    path = resolve_model_dir(name)
    weights = path / "weights.pt"
    stamp = weights.stat().st_mtime_ns if weights.exists() else 0
    key = (str(path.resolve()), dev, stamp)  # a rewritten model folder is reloaded
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = load_model(path, device=dev)
    return _MODEL_CACHE[key]


@dataclass
class MapResult:
    """Maps at the image's resolution and how they were obtained."""

    maps: Maps
    modality: Modality
    pixel_size: float  # µm/px of the image, given or estimated
    pixel_size_estimated: bool
    model_name: str
    default_params: PostprocessParams


@dataclass
class Segmentation:
    """Instances and everything needed to re-run the post-processing live."""

    labels: np.ndarray
    scores: np.ndarray
    result: PostprocessResult
    maps: MapResult
    postprocessor: Postprocessor


def working_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """An image of ``shape`` px at the network's working scale (``scale`` = its px / 0.5 µm)."""
    h, w = shape
    if np.isclose(scale, 1.0):
        return (h, w)
    return (max(8, round(h * scale)), max(8, round(w * scale)))


def _rescale(x: np.ndarray, scale: float) -> np.ndarray:
    if np.isclose(scale, 1.0):
        return x
    size = working_shape(x.shape[1:], scale)
    if size[0] * size[1] > MAX_PIXELS:
        raise InputError(
            f"at the model's working scale the image would be {size[0]}x{size[1]} px, more "
            "than this tool processes at once; check the pixel size, or crop a region first"
        )
    t = torch.from_numpy(np.ascontiguousarray(x))[None]
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    return out[0].numpy()


def _run(
    model,
    x_canon: np.ndarray,
    modality: Modality,
    device,
    progress,
    should_stop,
    tta=False,
    tta_std=False,
    grid: TileGrid | None = None,
) -> Maps:
    if model == CLASSICAL:
        return classical_maps(x_canon, modality)
    return predict_maps(
        model.net,
        x_canon,
        device=device,
        progress=progress,
        should_stop=should_stop,
        tta=tta,
        tta_std=tta_std,
        grid=grid,
    )


def _diameter_at_canonical(maps: Maps, params: PostprocessParams) -> float:
    res = Postprocessor(maps.prob, maps.hv, maps.contour, pixel_size=CANONICAL_PIXEL_SIZE).run(
        params
    )
    return median_diameter(res.labels.astype(np.int64)) if res.n_instances >= 5 else 0.0


def default_params(model: str | LoadedModel, modality: Modality) -> PostprocessParams:
    """The post-processing parameters a model (or the classical fallback) uses by default."""
    model = get_model(model)
    return model.params_for(modality) if isinstance(model, LoadedModel) else PostprocessParams()


def maps_from_input(
    x: np.ndarray,
    model: str | LoadedModel,
    *,
    modality: Modality,
    pixel_size: float,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    tta: bool | int = DEFAULT_TTA,
) -> Maps:
    """Maps, at the input's resolution, of a normalised network input at a known pixel size.

    The fixed-scale step of :func:`compute_maps` without its normalisation and pixel-size
    estimation: the block engine (:mod:`napari_medinst.blockwise`) normalises every block
    with statistics of the whole image and runs each at one pixel size.

    Parameters
    ----------
    x : (3, H, W) float32 array
        Network input, as :func:`~napari_medinst.preprocess.to_network_input` makes it.
    model : str or LoadedModel
        As in :func:`compute_maps`.
    modality : {'he', 'fluorescence'}
        Modality of the image.
    pixel_size : float
        µm per pixel of ``x``.
    """
    if not (0.01 <= pixel_size <= 50):
        raise InputError(f"pixel size {pixel_size} µm/px is outside the plausible 0.01-50 range")
    model = get_model(model, device)
    scale = network_scale(pixel_size)
    dev = pick_device(device)
    maps = _run(model, _rescale(x, scale), modality, dev, progress, should_stop, tta)
    return maps.resized(x.shape[1:])


def _crop(maps: Maps, r0: int, r1: int, c0: int, c1: int) -> Maps:
    def cut(a):
        return None if a is None else np.ascontiguousarray(a[..., r0:r1, c0:c1])

    return Maps(cut(maps.prob), cut(maps.hv), cut(maps.contour), cut(maps.type_prob),
                cut(maps.tta_std))  # fmt: skip


def _working_span(a: int, b: int, scale: float, length: int) -> tuple[int, int]:
    """Image px ``[a, b)`` in working px, 2 px wider each side for the bilinear
    resampling back, clipped to the working image's ``length``."""
    return max(0, int(np.floor(a * scale)) - 2), min(length, int(np.ceil(b * scale)) + 2)


def grid_read_box(
    window: tuple[int, int, int, int],
    image_shape: tuple[int, int],
    pixel_size: float,
    stride: int,
) -> tuple[int, int, int, int]:
    """The pixels to read so that a window's maps equal the whole image's.

    The whole image's tiles at the working scale (see
    :class:`~.model.inference.TileGrid`) that meet the window, plus a margin of
    ``stride`` working px for the resampling filter, in image px; :func:`maps_on_grid`
    takes these pixels. Exact when the working scale is 1 or 1/2, 1/4... of the image's
    and the window starts on a multiple of the network's stride at the image's scale;
    otherwise within a fraction of a pixel.
    """
    need = working_need(window, image_shape, pixel_size)
    r0, r1, c0, c1 = tiles_read_box(need, image_shape, pixel_size, stride)
    a0, a1, b0, b1 = window
    return min(a0, r0), max(a1, r1), min(b0, c0), max(b1, c1)


def tiles_read_box(
    need: tuple[int, int, int, int],
    image_shape: tuple[int, int],
    pixel_size: float,
    stride: int,
    align: int = 1,
) -> tuple[int, int, int, int]:
    """Image px to read for the whole image's maps on ``need`` (working px, half-open).

    Like :func:`grid_read_box` for a box given at the working scale; the first row and
    column are moved back to a multiple of ``align`` (the network's stride in image px,
    the alignment every block's window has).
    """
    scale = network_scale(pixel_size)
    gshape = working_shape(image_shape, scale)
    out = []
    for axis, (lo, hi) in enumerate((need[:2], need[2:])):
        # the tiles' span and ``stride`` working px more each side, in image px
        t0, t1 = grid_span(gshape[axis], lo, hi, stride=stride)
        start = max(0, int(np.floor((t0 - stride) / scale)))
        end = min(image_shape[axis], int(np.ceil((t1 + stride) / scale)))
        out += [start // align * align, end]
    return tuple(out)


def working_need(
    window: tuple[int, int, int, int], image_shape: tuple[int, int], pixel_size: float
) -> tuple[int, int, int, int]:
    """Working px whose maps :func:`maps_on_grid` resamples to ``window`` (image px)."""
    scale = network_scale(pixel_size)
    gshape = working_shape(image_shape, scale)
    return (*_working_span(window[0], window[1], scale, gshape[0]),
            *_working_span(window[2], window[3], scale, gshape[1]))  # fmt: skip


def grid_maps(
    x: np.ndarray,
    model: LoadedModel,
    *,
    read: tuple[int, int, int, int],
    need: tuple[int, int, int, int],
    image_shape: tuple[int, int],
    modality: Modality,
    pixel_size: float,
    device: str = "auto",
    should_stop: Callable[[], bool] | None = None,
    tta: bool | int = DEFAULT_TTA,
) -> tuple[Maps, tuple[int, int, int, int]]:
    """The whole image's maps on ``need`` (working px), at the working scale, uncropped.

    ``x`` is the normalised network input of the image px in ``read``, which must hold
    the whole image's tiles that meet ``need`` (:func:`tiles_read_box`). Returns the maps
    of the whole (rescaled) input and where ``need`` lies in them; only there are they
    the whole image's. Each pixel's maps blend only the tiles whose kept part covers it,
    in the whole image's order, so any two calls give the same values on the pixels of
    their ``need`` they share.
    """
    scale = network_scale(pixel_size)
    xs = _rescale(x, scale)
    origin = (round(read[0] * scale), round(read[2] * scale))
    (u0, u1, v0, v1), (oy, ox) = need, origin
    rel = (u0 - oy, u1 - oy, v0 - ox, v1 - ox)
    maps = _run(model, xs, modality, pick_device(device), None, should_stop, tta,
                grid=TileGrid(working_shape(image_shape, scale), origin, rel))  # fmt: skip
    return maps, rel


def maps_to_window(
    maps: Maps, need: tuple[int, int, int, int], window: tuple[int, int, int, int], scale: float
) -> Maps:
    """Working maps on ``need`` (:func:`working_need` of ``window``) back to the window's px."""
    size, crop = window_geometry(need, window, scale)
    return _crop(maps.resized(size), *crop)


def window_geometry(
    need: tuple[int, int, int, int], window: tuple[int, int, int, int], scale: float
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """How :func:`maps_to_window` goes back to image px: the size the working maps on
    ``need`` are resampled to, and the window's box in the result."""
    (u0, u1, v0, v1), (a0, a1, b0, b1) = need, window
    # back to image px: the working crop starts at image px u0 / scale
    y0, x0 = round(u0 / scale), round(v0 / scale)
    size = (max(round((u1 - u0) / scale), a1 - y0), max(round((v1 - v0) / scale), b1 - x0))
    return size, (a0 - y0, a1 - y0, b0 - x0, b1 - x0)


def maps_on_grid(
    x: np.ndarray,
    model: str | LoadedModel,
    *,
    read: tuple[int, int, int, int],
    window: tuple[int, int, int, int],
    image_shape: tuple[int, int],
    modality: Modality,
    pixel_size: float,
    device: str = "auto",
    should_stop: Callable[[], bool] | None = None,
    tta: bool | int = DEFAULT_TTA,
) -> Maps:
    """Maps of ``window`` (image px) as the whole image would have them.

    ``x`` is the normalised network input of the pixels in ``read`` (from
    :func:`grid_read_box`); the result has the window's shape. The classical fallback,
    which has no tiles, is computed on the read pixels and cropped.
    """
    model = get_model(model, device)
    (a0, a1, b0, b1), (r0, _, c0, _) = window, read
    if model == CLASSICAL:
        maps = maps_from_input(x, model, modality=modality, pixel_size=pixel_size, tta=tta)
        return _crop(maps, a0 - r0, a1 - r0, b0 - c0, b1 - c0)
    need = working_need(window, image_shape, pixel_size)
    maps, rel = grid_maps(x, model, read=read, need=need, image_shape=image_shape,
                          modality=modality, pixel_size=pixel_size, device=device,
                          should_stop=should_stop, tta=tta)  # fmt: skip
    return maps_to_window(_crop(maps, *rel), need, window, network_scale(pixel_size))


def compute_maps(
    image: np.ndarray,
    model: str | LoadedModel = "default",
    *,
    pixel_size: float | None = None,
    modality: Modality | None = None,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    tta: bool | int = DEFAULT_TTA,
    tta_std: bool = False,
) -> MapResult:
    """Run the model (or the classical fallback) on a 2-D image.

    Parameters
    ----------
    image : (H, W) or (H, W, 3/4) array
        Any integer or float dtype.
    model : str or LoadedModel
        ``'default'``, ``'classical'``, a bundled name or a model folder.
    pixel_size : float, optional
        µm per pixel; estimated when omitted.
    modality : {'he', 'fluorescence'}, optional
        Detected from the image when omitted (colour: H&E, grey: fluorescence).
    tta : bool or {1, 2, 4}
        Mirror passes averaged (True: 4, False: 1; see
        :func:`~napari_medinst.model.inference.tta_flips`); the model's time grows with
        them; ignored by the classical fallback. Default :data:`DEFAULT_TTA`.
    tta_std : bool
        With ``tta``, also keep how much the mirror passes disagree
        (:attr:`~napari_medinst.model.inference.Maps.tta_std`, for the review queue);
        the other maps are unchanged.
    """
    arr = prepare_image(image)
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise InputError(
            f"image of {arr.shape[0]}x{arr.shape[1]} px is larger than the "
            f"{MAX_PIXELS / 1e6:.0f} Mpx this tool processes at once (about "
            f"{32 * arr.shape[0] * arr.shape[1] / 2**30:.0f} GiB of memory); crop a region first"
        )
    if pixel_size is not None:
        pixel_size = check_pixel_size(pixel_size, "pixel_size")
    if modality is None:
        modality = detect_modality(arr)
    elif modality not in ("he", "fluorescence"):
        raise InputError(f"unknown modality {modality!r}; expected 'he' or 'fluorescence'")
    model = get_model(model, device)
    dev = pick_device(device)
    params = model.params_for(modality) if isinstance(model, LoadedModel) else PostprocessParams()
    x = to_network_input(arr, modality)
    estimated = pixel_size is None
    if pixel_size is not None:
        scale = network_scale(pixel_size)
    elif modality == "he":
        scale = DEFAULT_PIXEL_SIZE / CANONICAL_PIXEL_SIZE
    else:
        labels, _, _ = classical_labels(x, modality, min_size=4)
        d = median_diameter(labels) if labels.max() >= 3 else 0.0
        scale = float(np.clip(CANONICAL_DIAMETER / d, 0.1, 4.0)) if d > 0 else 1.0
    maps = _run(model, _rescale(x, scale), modality, dev, progress, should_stop, tta, tta_std)
    if estimated and model != CLASSICAL:
        # Nuclei far from the trained size mean a wrong guess (a 20x slide taken as 40x):
        # rescale. Sizes measured at a wrong scale are biased towards it, so iterate a
        # few times, now towards the tighter band. The first run already uses the
        # requested mirror averaging (cheapest when the guess is right, the usual case);
        # later search runs go without it and the final scale gets one more TTA run.
        band, searched = _SCALE_TOLERANCE, False
        for _ in range(3):
            d = _diameter_at_canonical(maps, params)
            ratio = d / CANONICAL_DIAMETER if d > 0 else 1.0
            if band[0] <= ratio <= band[1]:
                break
            scale = float(np.clip(scale / ratio, 0.05, 4.0))
            maps = _run(model, _rescale(x, scale), modality, dev, progress, should_stop)
            band, searched = _SCALE_CONVERGED, True
        if searched and len(tta_flips(tta)) > 1:
            maps = _run(
                model, _rescale(x, scale), modality, dev, progress, should_stop, tta, tta_std
            )
    return MapResult(
        maps=maps.resized(arr.shape[:2]),
        modality=modality,
        pixel_size=pixel_size if pixel_size is not None else scale * CANONICAL_PIXEL_SIZE,
        pixel_size_estimated=estimated,
        model_name=model if isinstance(model, str) else model.name,
        default_params=params,
    )


def _warn_if_empty(n_instances: int, pixel_size: float | None) -> None:
    """Warn when a run at a user-given, unusual pixel size found no nuclei at all."""
    lo, hi = TYPICAL_PIXEL_SIZE
    if n_instances == 0 and pixel_size is not None and not lo <= pixel_size <= hi:
        warnings.warn(
            f"no nuclei found at the given pixel size {pixel_size:g} µm/px, far from the "
            f"typical {lo:g}-{hi:g}; check the pixel size (or leave it out to estimate it)",
            PixelSizeWarning,
            stacklevel=3,
        )


def segment(
    image: np.ndarray,
    model: str | LoadedModel = "default",
    *,
    pixel_size: float | None = None,
    modality: Modality | None = None,
    params: PostprocessParams | None = None,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    tta: bool | int = DEFAULT_TTA,
) -> Segmentation:
    """Segment nuclei in a 2-D image; see :func:`compute_maps` for the arguments."""
    mr = compute_maps(
        image,
        model,
        pixel_size=pixel_size,
        modality=modality,
        device=device,
        progress=progress,
        should_stop=should_stop,
        tta=tta,
    )
    m = mr.maps
    pp = Postprocessor(m.prob, m.hv, m.contour, m.type_prob, pixel_size=mr.pixel_size)
    res = pp.run(params or mr.default_params)
    _warn_if_empty(res.n_instances, None if mr.pixel_size_estimated else mr.pixel_size)
    return Segmentation(labels=res.labels, scores=res.scores, result=res, maps=mr, postprocessor=pp)
