"""One-click, model-aware corrections of a nucleus label image.

Each tool takes a 2-D instance label image (0 = background) and returns an
:class:`~napari_medinst.editing.Edit` (the new image and exactly which pixels changed),
so a GUI writes it as one undoable step:

* :func:`add_nucleus_at` - one click on a missed nucleus grows it: from the model's maps
  (the post-processing's foreground, HV energy and markers, computed on a window around
  the click) or, without maps, from the image's stain / intensity (a threshold in the
  window and a distance-transform watershed).  Only background pixels are filled.
* :func:`refine_outline` - re-fits one nucleus' boundary to the maps (or the image),
  never touching its neighbours; given the image too, it keeps, of several candidate
  outlines (the maps' refit, the probability cut at several levels, the outline moved
  by 1-3 px), the one on the strongest edge of the image's nuclear signal - evidence
  the prediction did not use.  :func:`grow` / :func:`shrink` move it by whole pixels.
* :func:`split_two_seeds` - splits one nucleus between two seed points, flooding the HV
  energy (or, without maps, the distance transform) from both seeds *fairly*: each seed
  first climbs to the centre of its own part, and everything deeper than the shallower
  of the two starts as one level, so one seed cannot flood the whole nucleus first.
* :func:`polygon_nucleus` - a nucleus from an outline (clicked vertices or a lasso): a
  new one on the background, or (``replace``, the editor's ``Q``) one that redraws the
  nucleus it covers and takes pixels from neighbours that are not verified / edited.

Every tool works on a window around the click or the nucleus (a few nucleus diameters,
enlarged only when the nucleus reaches its border), so a click costs milliseconds on a
large image; only the copy of the label image that an :class:`Edit` carries is whole.
A tool that cannot act raises :class:`CorrectionRefused` (a ``ValueError``) with a
one-line message for the user, and the labels are never modified.

*Maps* are any object (or mapping) with ``prob`` (H, W), ``hv`` (2, H, W) and optionally
``contour`` (H, W) and ``pixel_size`` (µm/px) at the label image's pixels: a
:class:`~napari_medinst.model.inference.Maps` or the Segment panel's
:class:`~napari_medinst.postprocess.Postprocessor`.  An *image* is (H, W) grey, (H, W, 3|4)
RGB(A) or (3, H, W); it is only read in the window, so a lazy array is fine.

numpy / scipy / scikit-image only: nothing here imports napari, Qt or torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.draw import polygon as draw_polygon
from skimage.filters import threshold_otsu
from skimage.morphology import h_maxima

from ._flood import flood
from ._io import check_labels
from .editing import Edit, _make_edit, _rasterise, largest_part, next_free_id
from .postprocess import Postprocessor, PostprocessParams

__all__ = [
    "STAINS",
    "CorrectionRefused",
    "OutlineEdit",
    "add_nucleus_at",
    "grow",
    "polygon_nucleus",
    "refine_outline",
    "shrink",
    "split_two_seeds",
]

#: How the image fallback reads nuclei: ``auto`` = haematoxylin for RGB, intensity for grey.
STAINS: tuple[str, ...] = ("auto", "haematoxylin", "darkness", "intensity")

#: Half-size (px) of the first window around a click; doubled while the nucleus reaches
#: the window's border, up to :data:`MAX_HALF_WINDOW`.
HALF_WINDOW = 48
MAX_HALF_WINDOW = 384
#: Smallest nucleus (px) a tool creates or leaves behind.
MIN_AREA = 4
#: Image fallback: the stain must split the window into two classes at least this well
#: (Otsu's between-class / total variance; a click must also lie in the brighter class).
MIN_SEPARABILITY = 0.6
#: Image fallback: distance-transform maxima shallower than this (px) are not separate nuclei.
MIN_DEPTH = 2.0
#: Image evidence of an outline (refine): the signal's smoothing (px), the width (px)
#: of the rings inside / outside a boundary whose contrast scores it, the largest move
#: (px) of the grown / shrunk candidates, the model probability levels and the offsets
#: (in standard deviations) from the signal's Otsu level that give the other candidates.
EDGE_SIGMA = 1.0
EDGE_RING = 2
EDGE_STEPS = 3
PROB_LEVELS = (0.2, 0.3, 0.5, 0.6, 0.7, 0.8)
SIGNAL_OFFSETS = (-0.2, 0.0, 0.2)
_SQUARE = np.ones((3, 3), bool)
#: Outline replace mode: the nucleus the outline overlaps most is redrawn when more than
#: this share of its pixels lies inside (and, if protected, of the outline lies over it).
REDRAW_SHARE = 0.5


class CorrectionRefused(ValueError):
    """A correction tool cannot act here; the message (one line) says why."""


Box = tuple[slice, slice]


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Maps:
    prob: np.ndarray
    hv: np.ndarray
    contour: np.ndarray | None
    pixel_size: float | None


def _get(maps: Any, name: str) -> Any:
    if isinstance(maps, Mapping):
        return maps.get(name)
    return getattr(maps, name, None)


def _maps_or_image(
    maps: Any, image: Any, stain: str, shape: tuple[int, int], purpose: str
) -> tuple[_Maps | None, str]:
    """The model maps to work from, else the checked image's layout ("" with maps);
    refused when there are neither (``purpose`` completes the message)."""
    m = _read_maps(maps, shape)
    if m is not None:
        return m, ""
    if image is None:
        raise CorrectionRefused(f"no model maps and no image to {purpose}")
    _check_stain(stain)
    return None, _check_image(image, shape)


def _read_maps(maps: Any, shape: tuple[int, int]) -> _Maps | None:
    """The maps' arrays (not copied), their shapes checked against the labels'."""
    if maps is None:
        return None
    prob, hv, contour = (_get(maps, k) for k in ("prob", "hv", "contour"))
    if prob is None or hv is None:
        raise CorrectionRefused("the model maps lack 'prob' or 'hv'")
    prob, hv = np.asarray(prob), np.asarray(hv)
    if prob.shape != shape or hv.shape != (2, *shape):
        raise CorrectionRefused(
            f"the model maps are {prob.shape[-2:]} but the labels are {shape}: run the "
            "model on this image again"
        )
    if contour is not None:
        contour = np.asarray(contour)
        if contour.shape != shape:
            contour = None
    px = _get(maps, "pixel_size")
    px = float(px) if isinstance(px, int | float) and math.isfinite(px) and px > 0 else None
    return _Maps(prob, hv, contour, px)


def _params(maps: _Maps, params: PostprocessParams | None) -> PostprocessParams:
    """``params`` (default: the defaults) at the maps' pixel size."""
    return (params or PostprocessParams()).scaled_to(maps.pixel_size or 0.5)


def _image_shape(image: Any) -> tuple[tuple[int, int], str]:
    """Spatial shape of an image and its layout (``grey``, ``last`` or ``first``)."""
    shape = tuple(int(n) for n in getattr(image, "shape", ()))
    if len(shape) == 2:
        return (shape[0], shape[1]), "grey"
    if len(shape) == 3 and shape[2] in (3, 4):
        return (shape[0], shape[1]), "last"
    if len(shape) == 3 and shape[0] in (3, 4):
        return (shape[1], shape[2]), "first"
    raise CorrectionRefused(f"the image has shape {shape}: expected grey (H, W) or RGB (H, W, 3)")


def _check_image(image: Any, shape: tuple[int, int]) -> str:
    got, layout = _image_shape(image)
    if got != shape:
        raise CorrectionRefused(f"the image is {got} but the labels are {shape}")
    return layout


def _signal(image: Any, layout: str, box: Box, stain: str) -> np.ndarray:
    """Nuclear signal (high = nucleus) of the image in ``box``, float64."""
    if layout == "grey":
        win = np.asarray(image[box], np.float64)
        return -win if stain == "darkness" else win
    win = np.asarray(image[box] if layout == "last" else image[(slice(None), *box)])
    if layout == "first":
        win = np.moveaxis(win, 0, -1)
    rgb = win[..., :3].astype(np.float64)
    if not np.issubdtype(win.dtype, np.integer) and rgb.size and rgb.max() > 1.0:
        rgb = rgb / 255.0
    elif np.issubdtype(win.dtype, np.integer):
        rgb = rgb / float(np.iinfo(win.dtype).max)
    rgb = np.clip(rgb, 0.0, 1.0)
    if stain == "intensity":
        return rgb.mean(-1)
    if stain == "darkness":
        return -rgb.mean(-1)
    return rgb2hed(rgb)[..., 0]


def _point(labels: np.ndarray, point: Sequence[float], what: str = "the click") -> tuple[int, int]:
    p = np.asarray(point, np.float64).reshape(-1)
    if p.size < 2 or not np.isfinite(p[-2:]).all():
        raise CorrectionRefused(f"{what} is not a point in the image")
    r, c = (int(v) for v in np.round(p[-2:]))
    if not (0 <= r < labels.shape[0] and 0 <= c < labels.shape[1]):
        raise CorrectionRefused(f"{what} ({r}, {c}) lies outside the image {labels.shape}")
    return r, c


def _free_id(labels: np.ndarray) -> int:
    new_id = next_free_id(labels)
    if new_id > np.iinfo(labels.dtype).max:
        raise CorrectionRefused(f"no free id left in a {labels.dtype} label image")
    return new_id


# ----------------------------------------------------------------------------- windows


def _window(shape: tuple[int, int], centre: tuple[int, int], half: int) -> Box:
    r, c = centre
    return (
        slice(max(r - half, 0), min(r + half + 1, shape[0])),
        slice(max(c - half, 0), min(c + half + 1, shape[1])),
    )


def _grow_box(box: Box, pad: int, shape: tuple[int, int]) -> Box:
    return (
        slice(max(box[0].start - pad, 0), min(box[0].stop + pad, shape[0])),
        slice(max(box[1].start - pad, 0), min(box[1].stop + pad, shape[1])),
    )


def _at_inner_edge(mask: np.ndarray, box: Box, shape: tuple[int, int]) -> bool:
    """Whether ``mask`` (of window ``box``) reaches a window side inside the image."""
    return bool(
        (box[0].start > 0 and mask[0].any())
        or (box[0].stop < shape[0] and mask[-1].any())
        or (box[1].start > 0 and mask[:, 0].any())
        or (box[1].stop < shape[1] and mask[:, -1].any())
    )


def _local(point: tuple[int, int], box: Box) -> tuple[int, int]:
    return point[0] - box[0].start, point[1] - box[1].start


def _mask_box(mask: np.ndarray, offset: Box) -> Box | None:
    rows = np.flatnonzero(mask.any(1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(0))
    r0, c0 = offset[0].start, offset[1].start
    return (
        slice(r0 + int(rows[0]), r0 + int(rows[-1]) + 1),
        slice(c0 + int(cols[0]), c0 + int(cols[-1]) + 1),
    )


def _nucleus_box(labels: np.ndarray, nucleus_id: int, near: tuple[int, int] | None) -> Box:
    """Bounding box of nucleus ``nucleus_id``: searched around ``near`` when given."""
    if near is not None and labels[near] == nucleus_id:
        half = HALF_WINDOW
        while True:
            box = _window(labels.shape, near, half)
            mask = labels[box] == nucleus_id
            whole = box == (slice(0, labels.shape[0]), slice(0, labels.shape[1]))
            if whole or not _at_inner_edge(mask, box, labels.shape):
                found = _mask_box(mask, box)
                assert found is not None  # near is in it
                return found
            half *= 2
    whole = (slice(0, labels.shape[0]), slice(0, labels.shape[1]))
    found = _mask_box(labels == nucleus_id, whole)
    if found is None:
        raise CorrectionRefused(f"there is no nucleus {nucleus_id} in the labels")
    return found


# ------------------------------------------------------------------------ local stages


@dataclass
class _Stages:
    """Foreground, flooding energy and markers of one window."""

    foreground: np.ndarray  # bool
    energy: np.ndarray  # float
    markers: np.ndarray  # int32, 0 = none
    source: str  # "maps" or "image"


def _map_stages(maps: _Maps, box: Box, params: PostprocessParams | None) -> _Stages:
    """The Segment panel's own post-processing stages, on the window only."""
    contour = None if maps.contour is None else maps.contour[box]
    pp = Postprocessor(
        maps.prob[box], maps.hv[(slice(None), *box)], contour, pixel_size=maps.pixel_size or 0.5
    )
    res = pp.run(params or PostprocessParams())
    return _Stages(ndi.binary_fill_holes(res.foreground), res.energy, res.markers, "maps")


def _image_foreground(signal: np.ndarray) -> np.ndarray:
    """Otsu foreground of the (smoothed) signal; refuses a window without two classes."""
    s = ndi.gaussian_filter(signal, 1.0, mode="nearest")
    if not float(s.var()) > 1e-12 * max(1.0, float(np.abs(s).max())) ** 2:
        raise CorrectionRefused("the image is flat here: nothing nucleus-like to grow")
    t = threshold_otsu(s)
    fg = s > t
    w1 = float(fg.mean())
    if w1 in (0.0, 1.0):
        raise CorrectionRefused("the image shows no nucleus-like contrast here")
    between = w1 * (1 - w1) * (float(s[fg].mean()) - float(s[~fg].mean())) ** 2
    if between < MIN_SEPARABILITY * float(s.var()):
        raise CorrectionRefused("the image shows no nucleus-like contrast here")
    return ndi.binary_fill_holes(fg)


def _distance_markers(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Negated distance transform of ``mask`` and its maxima deeper than MIN_DEPTH."""
    dist = ndi.distance_transform_edt(mask)
    peaks = h_maxima(dist, MIN_DEPTH) > 0 if dist.max() > MIN_DEPTH else dist == dist.max()
    markers, _ = ndi.label(peaks & mask, np.ones((3, 3), bool))
    return -dist, markers.astype(np.int32)


def _image_stages(image: Any, layout: str, box: Box, stain: str, free: np.ndarray) -> _Stages:
    fg = _image_foreground(_signal(image, layout, box, stain))
    energy, markers = _distance_markers(fg & free)
    return _Stages(fg, energy, markers, "image")


def _stages(
    maps: _Maps | None, image: Any, layout: str, box: Box, free: np.ndarray, **kw: Any
) -> _Stages:
    if maps is not None:
        return _map_stages(maps, box, kw.get("params"))
    return _image_stages(image, layout, box, kw.get("stain", "auto"), free)


def _component(mask: np.ndarray, at: tuple[int, int]) -> np.ndarray:
    comps, _ = ndi.label(mask)
    return comps == comps[at] if comps[at] else np.zeros(mask.shape, bool)


def _flood(energy: np.ndarray, seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.array(flood(np.asarray(energy, np.float64), seeds.astype(np.int32), mask))


def _basin_at(st: _Stages, free: np.ndarray, at: tuple[int, int]) -> np.ndarray:
    """The nucleus under ``at``: its basin of the markers' flood inside free foreground."""
    comp = _component(st.foreground & free, at)
    seeds = np.where(comp, st.markers, 0)
    if not seeds.any():
        return comp
    basins = _flood(st.energy, seeds, comp)
    return basins == basins[at] if basins[at] else comp


def _refuse_empty(st: _Stages, maps: _Maps | None, box: Box, at: tuple[int, int]) -> None:
    if maps is not None:
        p = float(maps.prob[box][at])
        raise CorrectionRefused(
            f"no nucleus under the click: the model's nuclear probability there is {p:.2f}"
        )
    raise CorrectionRefused("no nucleus under the click: the image is not stained like one there")


# ------------------------------------------------------------------------------ tools


def add_nucleus_at(
    labels: np.ndarray,
    point: Sequence[float],
    maps: Any = None,
    image: Any = None,
    *,
    params: PostprocessParams | None = None,
    stain: str = "auto",
) -> Edit:
    """Add the nucleus under ``point`` (row, col) as a new id, grown on background only.

    With ``maps`` the window's foreground, HV energy and markers are those of the
    post-processing (:class:`~napari_medinst.postprocess.Postprocessor` with ``params``,
    by default its defaults at the maps' pixel size); the nucleus is the basin of the
    markers' watershed that holds the click, inside the foreground not yet labelled (a
    foreground blob without a marker is taken whole).  Without maps, ``image`` is read
    as a nuclear signal (``stain``, see :data:`STAINS`), thresholded with Otsu's method
    in the window, and the blob under the click is cut from its neighbours by a watershed
    of its distance transform.

    Raises
    ------
    CorrectionRefused
        If the point is outside the image or on a nucleus, neither maps nor an image are
        given, nothing nucleus-like is under the click, or the region grown runs beyond
        :data:`MAX_HALF_WINDOW` px (not one nucleus).
    """
    old = check_labels(labels)
    at = _point(old, point)
    if old[at]:
        raise CorrectionRefused(
            f"nucleus {int(old[at])} is already here: use refine, grow or shrink to change it"
        )
    m, layout = _maps_or_image(maps, image, stain, old.shape, "grow a nucleus from")
    region, box = _grow_region(old, at, m, image, layout, params=params, stain=stain)
    if region.sum() < MIN_AREA:
        raise CorrectionRefused(f"only {int(region.sum())} px grow from the click: too small")
    new = old.copy()
    new[box][region] = _free_id(old)
    return _make_edit(old, new, box)


def _check_stain(stain: str) -> None:
    if stain not in STAINS:
        raise CorrectionRefused(f"unknown stain {stain!r}; expected one of {', '.join(STAINS)}")


def _grow_region(
    old: np.ndarray, at: tuple[int, int], m: _Maps | None, image: Any, layout: str, **kw: Any
) -> tuple[np.ndarray, Box]:
    half = HALF_WINDOW
    while True:
        box = _window(old.shape, at, half)
        free = old[box] == 0
        here = _local(at, box)
        st = _stages(m, image, layout, box, free, **kw)
        region = _basin_at(st, free, here)
        if not region.any():
            _refuse_empty(st, m, box, here)
        if not _at_inner_edge(region, box, old.shape):
            return ndi.binary_fill_holes(region) & free, box
        if half >= MAX_HALF_WINDOW:
            raise CorrectionRefused(
                f"the region under the click runs beyond {2 * half + 1} px: not one nucleus"
            )
        half *= 2


def refine_outline(
    labels: np.ndarray,
    nucleus_id: int,
    maps: Any = None,
    image: Any = None,
    *,
    near: Sequence[float] | None = None,
    reach: int | None = None,
    params: PostprocessParams | None = None,
    stain: str = "auto",
) -> Edit:
    """Re-fit the outline of nucleus ``nucleus_id`` to the maps (or the image).

    The new outline is the part of the foreground (as in :func:`add_nucleus_at`) that
    the nucleus' own markers (those lying mostly inside its current outline) win in
    the watershed against the other markers, within ``reach`` px of the current outline
    (default: half its equivalent radius, at least 3) and on its own or background
    pixels only: neighbours are never changed.  ``near`` (a pixel of the nucleus) lets
    it be found without scanning the whole image.

    With ``image`` (also next to ``maps``) that refit is only one candidate: the
    outline grown / shrunk by 1 to :data:`EDGE_STEPS` px, the maps' probability cut at
    :data:`PROB_LEVELS` (without maps: the image's signal cut around its Otsu level)
    are the others, each one connected region of the same allowed pixels, and the one
    whose boundary has the highest contrast of the smoothed nuclear signal (Welch's t
    between rings of :data:`EDGE_RING` px inside and outside) wins.  A flat image
    counts as no image.

    Raises
    ------
    CorrectionRefused
        If the nucleus does not exist, neither maps nor an image are given, the maps /
        image keep less than a fifth of it (without image evidence), or the current
        outline already has the strongest edge (the outline is left as it is).
    """
    old = check_labels(labels)
    nid = int(nucleus_id)
    hint = None if near is None else _point(old, near, "the point")
    if nid <= 0:
        raise CorrectionRefused("choose a nucleus to refine, not the background")
    m, layout = _maps_or_image(maps, image, stain, old.shape, "refine the outline with")
    nbox = _nucleus_box(old, nid, hint)
    area = _box_area(old, nbox, nid)
    radius = math.sqrt(area / math.pi)
    reach = max(3, round(radius / 2)) if reach is None else max(int(reach), 0)
    box = _grow_box(nbox, reach + max(8, round(2 * radius)), old.shape)
    win = old[box]
    own = win == nid
    near_own = ndi.distance_transform_edt(~own) <= reach
    allowed = near_own & ((win == 0) | own)
    st = _stages(m, image, layout, box, allowed, params=params, stain=stain)
    region = _own_basins(st, own, allowed)
    kept = int(region.sum())
    too_little = kept < max(MIN_AREA, area // 5)
    signal = _evidence(image, stain, old.shape, box, layout)
    if signal is not None:
        prob = None if m is None else m.prob[box]
        extra = [] if too_little else [region]
        region = _edge_choice(own, allowed, signal, prob, extra)
        if region is None:
            raise CorrectionRefused(
                f"the outline of nucleus {nid} already lies on the strongest image edge here; "
                "unchanged (use grow / shrink)"
            )
    elif too_little:
        what = "model maps" if m is not None else "image"
        raise CorrectionRefused(
            f"the {what} keep only {kept} of the {area} px of nucleus {nid}; outline unchanged"
        )
    new = old.copy()
    nwin = new[box]
    nwin[own & ~region] = 0
    nwin[region] = nid
    return _make_edit(old, new, box)


def _evidence(image: Any, stain: str, shape: tuple[int, int], box: Box, layout: str) -> Any:
    """The image's smoothed nuclear signal in ``box``; None without an image or when the
    image is flat there (no edge to choose by)."""
    if image is None:
        return None
    if not layout:  # maps were given: the image was not checked yet
        _check_stain(stain)
        layout = _check_image(image, shape)
    s = ndi.gaussian_filter(_signal(image, layout, box, stain), EDGE_SIGMA, mode="nearest")
    return s if float(s.var()) > 1e-12 * max(1.0, float(np.abs(s).max())) ** 2 else None


def _edge_choice(
    own: np.ndarray,
    allowed: np.ndarray,
    signal: np.ndarray,
    prob: np.ndarray | None,
    extra: Sequence[np.ndarray] = (),
) -> np.ndarray | None:
    """The candidate outline with the strongest image edge, or None when ``own`` has it.

    Candidates (each one connected region of ``allowed``, holes filled): ``own`` grown
    and shrunk by 1 to :data:`EDGE_STEPS` px, the maps' probability thresholded at each
    of :data:`PROB_LEVELS` (with ``prob``) or else the signal thresholded around its
    Otsu level near ``own``, and ``extra``.  Each is scored by :func:`_edge_score`.
    """
    whole = (slice(0, own.shape[0]), slice(0, own.shape[1]))
    sub = _mask_box(allowed | own, whole)
    if sub is None:
        return None
    sub = _grow_box(sub, EDGE_RING + 1, own.shape)  # the rings fit: work on this crop
    own_s, signal_s = own[sub], signal[sub]
    best, best_score = None, _edge_score(own_s, signal_s)
    crops = [x[sub] for x in extra]
    prob_s = None if prob is None else prob[sub]
    for cand in _outline_candidates(own_s, allowed[sub], signal_s, prob_s, crops):
        score = _edge_score(cand, signal_s)
        if score > best_score + 1e-9 and not np.array_equal(cand, own_s):
            best, best_score = cand, score
    if best is None:
        return None
    out = np.zeros(own.shape, bool)
    out[sub] = best
    return out


def _outline_candidates(
    own: np.ndarray,
    allowed: np.ndarray,
    signal: np.ndarray,
    prob: np.ndarray | None,
    extra: Sequence[np.ndarray],
) -> list[np.ndarray]:
    d_out = ndi.distance_transform_edt(~own)
    d_in = ndi.distance_transform_edt(np.pad(own, 1))[1:-1, 1:-1]
    raw = [own | ((d_out <= k) & allowed) for k in range(1, EDGE_STEPS + 1)]
    raw += [own & (d_in > k) for k in range(1, EDGE_STEPS + 1)]
    if prob is not None:
        raw += [(prob > t) & allowed for t in PROB_LEVELS]
    else:
        zone = (d_out <= EDGE_STEPS + 1) & allowed
        level, spread = threshold_otsu(signal[zone]), float(signal[zone].std())
        raw += [ndi.binary_opening((signal > level + q * spread) & zone) for q in SIGNAL_OFFSETS]
    raw += list(extra)
    cands = (largest_part(_overlapping(c, own) & allowed) for c in raw)  # one piece
    return [c for c in cands if c.sum() >= MIN_AREA]


def _overlapping(mask: np.ndarray, own: np.ndarray) -> np.ndarray:
    """The connected region of ``mask`` that holds most of ``own``, holes filled."""
    comps, n = ndi.label(mask)
    if n == 0:
        return mask
    hits = np.bincount(comps[own], minlength=n + 1)
    hits[0] = 0
    if not hits.any():
        return np.zeros(mask.shape, bool)
    return ndi.binary_fill_holes(comps == int(np.argmax(hits)))


def _edge_score(mask: np.ndarray, signal: np.ndarray) -> float:
    """Boundary contrast: Welch's t of the signal just inside versus just outside ``mask``.

    The rings are :data:`EDGE_RING` px wide; a boundary on a strong, clean edge of the
    nuclear signal scores highest, whether the outline moved in or out.
    """
    inner = mask & ~ndi.binary_erosion(mask, _SQUARE, iterations=EDGE_RING, border_value=1)
    outer = ndi.binary_dilation(mask, _SQUARE, iterations=EDGE_RING) & ~mask
    if inner.sum() < 3 or outer.sum() < 3:
        return -math.inf
    a, b = signal[inner], signal[outer]
    noise = math.sqrt(float(a.var()) / a.size + float(b.var()) / b.size)
    return (float(a.mean()) - float(b.mean())) / max(noise, 1e-12)


def _box_area(labels: np.ndarray, box: Box, nid: int) -> int:
    return int(np.count_nonzero(labels[box] == nid))


def _own_basins(st: _Stages, own: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Pixels won by the nucleus' own markers (relabelled 1) in the allowed foreground."""
    mask = st.foreground & allowed
    markers = np.where(mask, st.markers, 0)
    ids = np.unique(markers[markers > 0])
    inside = ndi.sum_labels(own, markers, ids) if ids.size else np.zeros(0)
    sizes = ndi.sum_labels(np.ones_like(own), markers, ids) if ids.size else np.zeros(0)
    mine = ids[inside * 2 >= sizes]
    core = np.isin(markers, mine) if mine.size else ndi.binary_erosion(own & mask)
    if not core.any():
        core = own & mask
    if not core.any():
        return core
    seeds = np.where(markers > 0, markers + 1, 0).astype(np.int32)
    seeds[core] = 1
    region = largest_part(_flood(st.energy, seeds, mask) == 1)
    return ndi.binary_fill_holes(region) & allowed


def _check_px(px: int) -> int:
    if isinstance(px, bool) or not isinstance(px, int | np.integer) or px < 1:
        raise CorrectionRefused(f"grow / shrink by a whole number of pixels >= 1, got {px!r}")
    return int(px)


def grow(
    labels: np.ndarray, nucleus_id: int, px: int = 1, *, near: Sequence[float] | None = None
) -> Edit:
    """Grow nucleus ``nucleus_id`` by ``px`` pixels (Euclidean) into the background only.

    Raises
    ------
    CorrectionRefused
        If the nucleus does not exist, ``px`` is not a positive whole number, or no
        background pixel lies within ``px`` of it.
    """
    old = check_labels(labels)
    px, nid = _check_px(px), int(nucleus_id)
    if nid <= 0:
        raise CorrectionRefused("choose a nucleus to grow, not the background")
    hint = None if near is None else _point(old, near, "the point")
    box = _grow_box(_nucleus_box(old, nid, hint), px + 1, old.shape)
    win = old[box]
    ring = (ndi.distance_transform_edt(win != nid) <= px) & (win == 0)
    if not ring.any():
        raise CorrectionRefused(f"nucleus {nid} has no background around it to grow into")
    new = old.copy()
    new[box][ring] = nid
    return _make_edit(old, new, box)


def shrink(
    labels: np.ndarray, nucleus_id: int, px: int = 1, *, near: Sequence[float] | None = None
) -> Edit:
    """Shrink nucleus ``nucleus_id`` by ``px`` pixels: its pixels that near anything else.

    A pixel of the nucleus within ``px`` (Euclidean) of a pixel that is not the nucleus,
    or of the image border, becomes background.

    Raises
    ------
    CorrectionRefused
        If the nucleus does not exist, ``px`` is not a positive whole number, or fewer
        than :data:`MIN_AREA` pixels would be left.
    """
    old = check_labels(labels)
    px, nid = _check_px(px), int(nucleus_id)
    if nid <= 0:
        raise CorrectionRefused("choose a nucleus to shrink, not the background")
    hint = None if near is None else _point(old, near, "the point")
    box = _grow_box(_nucleus_box(old, nid, hint), 1, old.shape)
    own = np.pad(old[box] == nid, 1)  # the image border counts as outside
    rim = (ndi.distance_transform_edt(own) <= px)[1:-1, 1:-1] & own[1:-1, 1:-1]
    left = int(own.sum()) - int(rim.sum())
    if left < MIN_AREA:
        raise CorrectionRefused(f"nucleus {nid} is too small to shrink ({left} px would be left)")
    new = old.copy()
    new[box][rim] = 0
    return _make_edit(old, new, box)


def split_two_seeds(
    labels: np.ndarray,
    seeds: Sequence[Sequence[float]],
    maps: Any = None,
    *,
    params: PostprocessParams | None = None,
    min_piece: int = MIN_AREA,
) -> Edit:
    """Split the nucleus holding two seed points (row, col) into two nuclei.

    The nucleus is flooded from both seeds: over the HV energy of ``maps`` (high where
    two nuclei touch), or without maps over its negated distance transform, each seed
    first extended along the steepest ascent of the distance to the centre of its part.
    Energies below the shallower seed's level are raised to it, so both parts grow at
    the same pace until they meet where the energy rises (at the contact, or the
    narrowest part).  The first seed's part keeps the id; the second gets a new id.

    Raises
    ------
    CorrectionRefused
        If a seed is outside the image or on the background, the seeds lie in
        different nuclei or on the same pixel, the nucleus has fewer than
        ``2 * min_piece`` pixels, or a part would be smaller than ``min_piece``.
    """
    old = check_labels(labels)
    pts = [_point(old, s, "a seed") for s in seeds]
    if len(pts) != 2:
        raise CorrectionRefused(f"place exactly two seeds to split a nucleus (got {len(pts)})")
    ids = {int(old[p]) for p in pts}
    if 0 in ids:
        raise CorrectionRefused("a seed lies on the background; place both inside the nucleus")
    if len(ids) > 1:
        raise CorrectionRefused(
            f"the seeds lie in different nuclei ({', '.join(map(str, sorted(ids)))})"
        )
    nid = ids.pop()
    nbox = _nucleus_box(old, nid, pts[0])
    area = _box_area(old, nbox, nid)
    if area < 2 * max(min_piece, 1):
        raise CorrectionRefused(f"nucleus {nid} has {area} px: too small to split")
    if pts[0] == pts[1]:
        raise CorrectionRefused("place the two seeds on different pixels of the nucleus")
    m = _read_maps(maps, old.shape)
    pad = 8 if m is None else 8 + _params(m, params).sobel_size
    box = _grow_box(nbox, pad, old.shape)
    mask = old[box] == nid
    local = [_local(p, box) for p in pts]
    energy, markers = _split_energy(mask, local, m, box, params)
    pieces = _flood(_fair(energy, markers), markers, mask)
    sizes = [int((pieces == k).sum()) for k in (1, 2)]
    if min(sizes) < max(min_piece, 1):
        raise CorrectionRefused(
            f"the seeds cut nucleus {nid} into parts of {sizes[0]} and {sizes[1]} px; "
            f"each needs at least {max(min_piece, 1)}"
        )
    new = old.copy()
    new[box][pieces == 2] = _free_id(old)
    return _make_edit(old, new, box)


def _split_energy(
    mask: np.ndarray,
    local: list[tuple[int, int]],
    m: _Maps | None,
    box: Box,
    params: PostprocessParams | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Energy to flood and the two markers (1, 2) of a split."""
    markers = np.zeros(mask.shape, np.int32)
    if m is not None:
        energy = _map_stages(m, box, params).energy.astype(np.float64)
        for k, p in enumerate(local, start=1):
            markers[p] = k
        return energy, markers
    dist = ndi.distance_transform_edt(mask)
    paths = [_ascent(dist, p) for p in local]
    if set(paths[0]) & set(paths[1]):  # both climb to the same centre: use the seeds
        paths = [[p] for p in local]
    for k, path in enumerate(paths, start=1):
        markers[tuple(np.array(path).T)] = k
    return -dist, markers


def _ascent(dist: np.ndarray, start: tuple[int, int]) -> list[tuple[int, int]]:
    """Pixels of the steepest-ascent path of ``dist`` from ``start`` to a maximum."""
    path = [start]
    r, c = start
    while True:
        r0, c0 = max(r - 1, 0), max(c - 1, 0)
        nb = dist[r0 : r + 2, c0 : c + 2]
        k = int(np.argmax(nb))
        rr, cc = r0 + k // nb.shape[1], c0 + k % nb.shape[1]
        if dist[rr, cc] <= dist[r, c]:
            return path
        r, c = rr, cc
        path.append((r, c))


def _fair(energy: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """``energy`` raised to the level of the shallower marker's lowest point."""
    level = max(float(energy[markers == k].min()) for k in (1, 2))
    return np.maximum(energy, level)


@dataclass(frozen=True, eq=False)
class OutlineEdit(Edit):
    """The :class:`~napari_medinst.editing.Edit` of :func:`polygon_nucleus`, and what it did.

    Attributes
    ----------
    nucleus : int
        The id of the drawn nucleus: a new id, or the redrawn nucleus' own.
    redrawn : bool
        Whether an existing nucleus was redrawn (else a new nucleus was added).
    taken : dict
        Pixels each other nucleus lost (drawn over, or cut off from its largest piece),
        by id; empty when only background was filled.
    gone : tuple of int
        The nuclei of ``taken`` that lost every pixel.
    spared : tuple of int
        Protected (``keep``) nuclei the outline overlapped: they kept every pixel.
    """

    nucleus: int = 0
    redrawn: bool = False
    taken: dict[int, int] = field(default_factory=dict)
    gone: tuple[int, ...] = ()
    spared: tuple[int, ...] = ()

    @property
    def message(self) -> str:
        """One line for the user, e.g. ``new nucleus 40; took 35 px from nucleus 7``."""
        text = f"nucleus {self.nucleus} redrawn" if self.redrawn else f"new nucleus {self.nucleus}"
        if self.taken:
            parts = [
                f"{n} px from nucleus {k}" + (" (now gone)" if k in self.gone else "")
                for k, n in sorted(self.taken.items())
            ]
            text += "; took " + ", ".join(parts)
        if self.spared:
            ids = ", ".join(map(str, self.spared))
            text += f"; verified / edited nucleus {ids} kept its pixels"
        return text


def _outline_edit(old: np.ndarray, new: np.ndarray, box: Box, nid: int, **kw: Any) -> OutlineEdit:
    edit = _make_edit(old, new, box)
    base = {f.name: getattr(edit, f.name) for f in fields(Edit)}
    return OutlineEdit(**base, nucleus=nid, **kw)


def _polygon_mask(
    shape: tuple[int, int], points: Sequence[Sequence[float]]
) -> tuple[Box, np.ndarray]:
    """The window around an outline and its filled inside (polygon and outline pixels)."""
    pts = np.asarray(points, np.float64).reshape(-1, 2) if len(points) else np.zeros((0, 2))
    if not np.isfinite(pts).all():
        raise CorrectionRefused("the outline has a point that is not in the image")
    if len(np.unique(np.round(pts), axis=0)) < 3:
        raise CorrectionRefused("draw an outline with at least three points")
    lo = np.maximum(np.floor(pts.min(0)).astype(np.int64) - 1, 0)
    hi = np.minimum(np.ceil(pts.max(0)).astype(np.int64) + 2, shape)
    if (hi <= lo).any():
        raise CorrectionRefused("the outline lies outside the image")
    box = (slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1])))
    size = (box[0].stop - box[0].start, box[1].stop - box[1].start)
    rel = pts - lo
    inside = np.zeros(size, bool)
    rr, cc = draw_polygon(rel[:, 0], rel[:, 1], size)
    inside[rr, cc] = True
    inside |= _rasterise(np.vstack([rel, rel[:1]]), size)
    if not inside.any():
        raise CorrectionRefused("the outline covers no pixel of the image")
    return box, inside


def polygon_nucleus(
    labels: np.ndarray,
    points: Sequence[Sequence[float]],
    *,
    overwrite: bool = False,
    replace: bool = False,
    keep: Iterable[int] = (),
) -> OutlineEdit:
    """A nucleus from an outline: the polygon through ``points`` (row, col), filled.

    By default the polygon (its inside and its outline) becomes a new nucleus (the next
    free id) on background pixels only, or on every pixel with ``overwrite``.

    With ``replace`` (the editor's ``Q``) it acts like a brush that knows nuclei:

    * **redraw** - when more than :data:`REDRAW_SHARE` of the pixels of the nucleus the
      outline overlaps most lie inside the outline, that nucleus is redrawn as the drawn
      shape: it keeps its id, its pixels outside the shape become background.  A
      nucleus in ``keep`` is redrawn only when, moreover, more than that share of the
      outline lies over it (an outline that merely overlaps expert work never
      replaces it).
    * **new nucleus** - otherwise the shape becomes a new nucleus.

    Either way the shape takes background and the pixels of every other nucleus that
    is *not* in ``keep`` (the ids the user verified or edited: they keep every pixel,
    so expert work is never overwritten).  A nucleus that lost pixels keeps its
    largest connected piece (pieces cut off become background, and so does a rest
    smaller than :data:`MIN_AREA` px).

    A nucleus must be one piece: when kept nuclei cut the fill apart, only its largest
    piece is drawn.  The part of the polygon outside the image is ignored.

    Returns
    -------
    OutlineEdit
        The edit, with the id drawn, whether it was redrawn, the pixels taken from
        each other nucleus and :attr:`OutlineEdit.message` saying so.

    Raises
    ------
    CorrectionRefused
        If fewer than three distinct vertices are given, the polygon covers no pixel of
        the image, or no pixel it may fill (without ``overwrite`` or ``replace``: no
        background; with ``replace``: only kept nuclei).
    ValueError
        If both ``overwrite`` and ``replace`` are set.
    """
    if overwrite and replace:
        raise ValueError("polygon_nucleus: choose overwrite or replace, not both")
    old = check_labels(labels)
    box, inside = _polygon_mask(old.shape, points)
    if replace:
        return _replace_with_outline(old, box, inside, {int(i) for i in keep} - {0})
    win = old[box]
    fill = largest_part(inside if overwrite else inside & (win == 0))
    if not fill.any():
        raise CorrectionRefused("the outline covers only existing nuclei (no background to fill)")
    nid = _free_id(old)
    new = old.copy()
    new[box][fill] = nid
    taken = _counts(win[fill & (win != 0)])
    return _outline_edit(old, new, box, nid, taken=taken, gone=_gone(new, old, box, taken))


def _counts(values: np.ndarray) -> dict[int, int]:
    ids, n = np.unique(values, return_counts=True)
    return {int(i): int(k) for i, k in zip(ids, n, strict=True) if i != 0}


def _gone(new: np.ndarray, old: np.ndarray, box: Box, ids: Iterable[int]) -> tuple[int, ...]:
    """Those of ``ids`` no longer in ``new`` (each was entirely inside ``box``)."""
    gone = []
    for k in sorted(ids):
        whole = _nucleus_box(old, k, None)
        if not (new[whole] == k).any():
            gone.append(k)
    return tuple(gone)


def _redraw_target(old: np.ndarray, box: Box, inside: np.ndarray, keep: set[int]) -> int:
    """The nucleus the outline redraws (see :func:`polygon_nucleus`), or 0."""
    over = _counts(old[box][inside])
    if not over:
        return 0
    target = max(over, key=lambda k: (over[k], -k))
    near = _first_pixel(old[box] == target, inside, box)
    area = _box_area(old, _nucleus_box(old, target, near), target)
    mostly_covered = over[target] > REDRAW_SHARE * area
    mostly_over = over[target] > REDRAW_SHARE * int(inside.sum())
    return target if mostly_covered and (target not in keep or mostly_over) else 0


def _first_pixel(mask: np.ndarray, inside: np.ndarray, box: Box) -> tuple[int, int]:
    r, c = np.argwhere(mask & inside)[0]
    return int(r) + box[0].start, int(c) + box[1].start


def _union(a: Box, b: Box) -> Box:
    return (
        slice(min(a[0].start, b[0].start), max(a[0].stop, b[0].stop)),
        slice(min(a[1].start, b[1].start), max(a[1].stop, b[1].stop)),
    )


def _replace_with_outline(
    old: np.ndarray, box: Box, inside: np.ndarray, keep: set[int]
) -> OutlineEdit:
    """:func:`polygon_nucleus` with ``replace``: redraw a nucleus or add one (see there)."""
    win = old[box]
    target = _redraw_target(old, box, inside, keep)
    protected = keep - {target}
    blocked = np.isin(win, list(protected)) if protected else np.zeros(win.shape, bool)
    fill = largest_part(inside & ~blocked)
    if not fill.any():
        raise CorrectionRefused(
            "the outline covers only verified or edited nuclei: they keep their pixels"
        )
    nid = target or _free_id(old)
    new = old.copy()
    edit_box = box
    if target:
        tbox = _nucleus_box(old, target, _first_pixel(win == target, inside, box))
        new[tbox][old[tbox] == target] = 0
        edit_box = _union(edit_box, tbox)
    new[box][fill] = nid
    losers = set(_counts(win[fill])) - {nid}
    for k in sorted(losers):
        kbox = _nucleus_box(old, k, _first_pixel(win == k, fill, box))
        rest = new[kbox] == k
        keep_piece = largest_part(rest)
        if int(keep_piece.sum()) < MIN_AREA:
            keep_piece = np.zeros_like(rest)
        new[kbox][rest & ~keep_piece] = 0
        edit_box = _union(edit_box, kbox)
    taken = {
        k: int(np.count_nonzero(old[edit_box] == k)) - int(np.count_nonzero(new[edit_box] == k))
        for k in sorted(losers)
    }
    gone = tuple(k for k in sorted(losers) if not (new[edit_box] == k).any())
    spared = tuple(sorted(set(_counts(win[inside])) & protected))
    return _outline_edit(
        old, new, edit_box, nid, redrawn=bool(target), taken=taken, gone=gone, spared=spared
    )
