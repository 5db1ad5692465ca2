"""Big images segmented block by block, with memory that does not grow with the image.

The image is cut into a grid of *cores* (``block`` px square, the last ones a little
smaller so that all are about equal). Each core is read with a *halo* of context around
it and segmented on its own: normalised with statistics of the whole image, run
through the model at one pixel size, post-processed. A block keeps the nuclei whose
centroid lies inside its core, with their full outline (which may reach into the
halo); the nuclei centred in the halo belong to a neighbour. So a nucleus on a seam is
neither cut nor counted twice. A block's nuclei are a pure function of its window's maps
and a :class:`BlockSetup` decided once for the whole image
(:func:`block_from_maps`), so that a distributed driver can run blocks in any order,
anywhere. :func:`segment_blockwise` is the sequential driver for in-memory images used
by the command line.

Halo: :data:`HALO_UM` = 32 µm = twice a large nucleus (16 µm, about three times the
median nucleus of MoNuSeg at 40x), so an owned nucleus and its neighbours are whole in
the window; 128 px at 0.25 µm/px (40x). The model's context needs no halo: a block's
maps are the whole image's on its window, taken from *map regions*
(:mod:`.tilemaps`): groups of the whole image's 512 px model tiles, each run once and
kept until the last block that reads it is done, so the network does the whole-image
path's work whatever the block size, and the nuclei are the whole-image path's.
:func:`segment_block` (used for the classical fallback, which has no tiles) instead
runs the whole image's tiles over its own window, reading the pixels they cover
(:attr:`BlockSpec.read`).

Memory: besides the image itself only the output labels (4 bytes a pixel) are
full-size; the maps of about one row of the model's tiles across the image (448 working
px high, 36 bytes a working px with a typed model, kept between two rows of blocks) and
one block's post-processing (about 60 bytes a pixel of a block with its
halo: some 400 MB for the default 2048 px blocks at 40x) live at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from . import tilemaps
from ._io import InputError
from .editing import largest_part
from .model.folder import LoadedModel
from .model.inference import DEFAULT_TTA, OVERLAP, CancelledError, Maps, tile_side
from .postprocess import Postprocessor, PostprocessParams
from .preprocess import (
    Modality,
    check_pixel_size,
    colour_divisor,
    detect_modality,
    network_scale,
    percentile_range,
    prepare_image,
    work_dtype,
)
from .segment import (
    compute_maps,
    default_params,
    get_model,
    grid_read_box,
    maps_on_grid,
    working_need,
    working_shape,
)

__all__ = [
    "AUTO_BLOCK_PIXELS",
    "DEFAULT_BLOCK",
    "HALO_UM",
    "BlockResult",
    "BlockSetup",
    "BlockSpec",
    "BlockwiseResult",
    "Normalisation",
    "block_from_maps",
    "plan_blocks",
    "prepare_setup",
    "segment_block",
    "segment_blockwise",
]

#: Core size (px) of a block of an image in memory. Blocks cost no network time (every
#: model tile runs once, see :mod:`.tilemaps`) and little post-processing time (their
#: halo), so they are kept small: a 1024 px block with its 256 px halo (40x) and a typed
#: model needs about 150 MB while it is post-processed, a 2048 px one about 500 MB.
DEFAULT_BLOCK = 1024
#: Context around a block's core, µm (see the module's docstring for the numbers).
HALO_UM = 32.0
#: Images above this many pixels are segmented in blocks by the command line.
AUTO_BLOCK_PIXELS = 16_000_000
#: Side (px) of the central crop on which the pixel size is estimated.
ESTIMATE_CROP = 2048
_MIN_HALO_PX = 16


@dataclass(frozen=True)
class Normalisation:
    """Fixed mapping of raw pixel values to the network's range, the same for every block.

    A block's network input is ``clip((value - lo) / span, clip_lo, clip_hi)`` of the
    image (H&E) or of its channel maximum (fluorescence), repeated to three channels
    where the image is grey. ``span == 0`` gives zeros (a flat image).
    """

    modality: Modality
    lo: float
    span: float
    clip_lo: float
    clip_hi: float

    @classmethod
    def of_image(cls, image: np.ndarray, modality: Modality) -> Normalisation:
        """Statistics of the whole image, as :func:`~.preprocess.to_network_input` takes them.

        H&E: integers by 255 (or by their maximum above 255), floats above 1 by 255 (or
        their maximum). Fluorescence: the 1st and 99.8th percentiles of about a million
        pixels on a regular grid. No full-size copy is made.
        """
        if modality == "he":
            return cls(modality, 0.0, colour_divisor(image), 0.0, 1.0)
        step = max(1, math.isqrt(image.shape[0] * image.shape[1] // 1_000_000))
        sample = image[::step, ::step].astype(work_dtype(image))
        gray = sample if sample.ndim == 2 else sample.max(axis=-1)
        lo, span = percentile_range(gray)
        return cls(modality, lo, span, -0.2, 1.5)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """A block's pixels ``(h, w)`` or ``(h, w, 3)`` as the network's ``(3, h, w)`` float32."""
        arr = pixels.astype(work_dtype(pixels))  # float64 stays float64 until scaled
        if self.modality == "fluorescence" and arr.ndim == 3:
            arr = arr.max(axis=-1)
        if self.span == 0:
            arr = np.zeros(arr.shape, np.float32)
        else:
            arr -= arr.dtype.type(self.lo)
            arr /= arr.dtype.type(self.span)
            np.clip(arr, self.clip_lo, self.clip_hi, out=arr)
            arr = arr.astype(np.float32, copy=False)
        if arr.ndim == 2:
            return np.ascontiguousarray(np.broadcast_to(arr, (3, *arr.shape)))
        return np.ascontiguousarray(arr.transpose(2, 0, 1))


@dataclass(frozen=True)
class BlockSetup:
    """What every block of one image shares: decided once, before the first block."""

    modality: Modality
    pixel_size: float  # µm/px, given or estimated on a central crop
    pixel_size_estimated: bool
    params: PostprocessParams
    norm: Normalisation
    model_name: str
    tta: bool | int = DEFAULT_TTA


@dataclass(frozen=True)
class BlockSpec:
    """One block: its core (owned pixels) and its window (core plus halo), image coordinates.

    Boxes are ``(row0, row1, col0, col1)``, half-open.
    """

    index: int
    core: tuple[int, int, int, int]
    window: tuple[int, int, int, int]
    #: The pixels read for the block: the window, or more where the model needs the
    #: whole image's tiles around it (see :func:`~.segment.grid_read_box`).
    read: tuple[int, int, int, int] | None = None

    @property
    def window_slices(self) -> tuple[slice, slice]:
        r0, r1, c0, c1 = self.window
        return slice(r0, r1), slice(c0, c1)

    @property
    def read_box(self) -> tuple[int, int, int, int]:
        return self.window if self.read is None else self.read

    @property
    def read_slices(self) -> tuple[slice, slice]:
        r0, r1, c0, c1 = self.read_box
        return slice(r0, r1), slice(c0, c1)


@dataclass
class BlockResult:
    """The nuclei a block owns, in its window's coordinates."""

    spec: BlockSpec
    labels: np.ndarray  # (window h, window w) uint32, owned nuclei only, ids 1..n
    scores: np.ndarray  # (n,) float32
    types: np.ndarray | None  # (n,) int16, or None
    n_truncated: int  # owned nuclei touching the window's edge inside the image


@dataclass
class BlockwiseResult:
    """Instances of a whole image segmented block by block."""

    labels: np.ndarray  # (H, W) uint32, ids 1..n unique over the image
    scores: np.ndarray  # (n,) float32, confidence of instance i + 1
    types: np.ndarray | None
    pixel_size: float
    pixel_size_estimated: bool
    modality: Modality
    model_name: str
    n_blocks: int
    n_truncated: int = 0  # nuclei wider than the halo allows (cut at a window's edge)

    @property
    def n_instances(self) -> int:
        return int(self.scores.shape[0])


def _edges(length: int, block: int) -> list[int]:
    n = max(1, math.ceil(length / block))
    return [round(i * length / n) for i in range(n + 1)]


def snap_edges(edges: list[int], length: int, pixel_size: float, stride: int) -> list[int]:
    """Core edges (image px, one axis) moved to where the whole image's model tiles hand
    over (:func:`.tilemaps.clean_cuts`), when one lies within half a tile step.

    A block's core then holds whole map regions: the blocks around it read only strips
    of theirs, and the in-memory path holds one row of tiles' maps between two rows of
    blocks. Blocks narrower than two tile steps are left as they are.
    """
    scale = network_scale(pixel_size)
    glen = working_shape((length, length), scale)[0]
    step = tile_side(stride) - OVERLAP
    if len(edges) <= 2 or (edges[1] - edges[0]) * scale < 2 * step:
        return edges
    cuts = np.array([round(c / scale) for c in tilemaps.clean_cuts(glen, stride)])
    out = [0]
    for e in edges[1:-1]:
        near = cuts[np.abs(cuts - e) * scale <= step / 2] if cuts.size else cuts
        e = int(near[np.argmin(np.abs(near - e))]) if near.size else e
        if out[-1] < e < length:
            out.append(e)
    return [*out, length]


def plan_blocks(
    shape: tuple[int, int],
    block: int,
    halo: int,
    align: int = 1,
    *,
    grid: tuple[float, int] | None = None,
) -> list[BlockSpec]:
    """Cores of at most ``block`` px tiling ``shape``, each in a window of ``halo`` px more.

    A window's first row and column are moved back (by less than ``align`` px, widening
    the halo there) to a multiple of ``align``: at ``align`` = the network's stride at the
    image's scale, every block sees the image on the same pixel grid as the whole-image
    path (a CNN with strided layers is not invariant to shifts off that grid).

    ``grid`` = (pixel size in µm, network stride) gives each block the pixels it must
    read for the model to run the whole image's tiles over its window
    (:attr:`BlockSpec.read`), so that its maps, and hence its nuclei, are the
    whole-image path's whatever the block size.
    """
    if block < 1 or halo < 0 or align < 1:
        raise ValueError(f"need block >= 1, halo >= 0 and align >= 1 px: {block}, {halo}, {align}")
    h, w = shape
    rows, cols = _edges(h, block), _edges(w, block)
    if grid is not None:  # cores end where the model's tiles hand over (see snap_edges)
        rows, cols = snap_edges(rows, h, *grid), snap_edges(cols, w, *grid)

    def start(x: int) -> int:
        return max(0, x - halo) // align * align

    specs = []
    for r0, r1 in itertools.pairwise(rows):
        for c0, c1 in itertools.pairwise(cols):
            window = (start(r0), min(h, r1 + halo), start(c0), min(w, c1 + halo))
            read = None if grid is None else grid_read_box(window, shape, *grid)
            specs.append(BlockSpec(len(specs), (r0, r1, c0, c1), window, read))
    return specs


def core_edges(specs: list[BlockSpec]) -> tuple[list[int], list[int]]:
    """The blocks' core edges, rows and columns (for :func:`.tilemaps.plan_regions`)."""
    return (sorted({e for s in specs for e in s.core[:2]}),
            sorted({e for s in specs for e in s.core[2:]}))  # fmt: skip


def _tile_grid(model: str | LoadedModel, pixel_size: float) -> tuple[float, int] | None:
    """``plan_blocks``' ``grid`` for a network model (None for the classical fallback)."""
    return (pixel_size, model.net.stride) if isinstance(model, LoadedModel) else None


def _grid_step(model: str | LoadedModel, pixel_size: float) -> int:
    """The network's stride in image pixels (1 for the classical fallback)."""
    if not isinstance(model, LoadedModel):
        return 1
    return max(1, round(model.net.stride / network_scale(pixel_size)))


def _check_image(image: np.ndarray) -> np.ndarray:
    """Shape and dtype checks without full-size copies; returns ``(H, W)`` or ``(H, W, 3)``."""
    arr = np.asarray(image)
    if arr.dtype == bool:
        arr = arr.view(np.uint8)
    prepare_image(arr[:64, :64])  # dtype, layout and the 8 px minimum, on a corner
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if np.issubdtype(arr.dtype, np.floating):
        for r in range(0, arr.shape[0], 256):  # a bounded temporary, not one of the image's size
            if not np.all(np.isfinite(arr[r : r + 256])):
                raise InputError("image contains NaN or infinite values")
    return arr


def _overview(arr: np.ndarray, pixels: int = 4_000_000) -> np.ndarray:
    step = max(1, math.isqrt(arr.shape[0] * arr.shape[1] // pixels))
    return arr[::step, ::step]


def _central_crop(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    r0, c0 = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return arr[r0 : r0 + size, c0 : c0 + size]


def prepare_setup(
    image: np.ndarray,
    model: str | LoadedModel = "default",
    *,
    pixel_size: float | None = None,
    modality: Modality | None = None,
    params: PostprocessParams | None = None,
    device: str = "auto",
    tta: bool | int = DEFAULT_TTA,
) -> BlockSetup:
    """Decide modality, pixel size, parameters and normalisation once for the whole image.

    The modality is detected on a regular ~4 Mpx subsample; the pixel size, when not
    given, is estimated by :func:`~.segment.compute_maps` on a central crop of
    :data:`ESTIMATE_CROP` px (without mirror averaging: only its scale is used).
    """
    arr = _check_image(image)
    if modality is None:
        modality = detect_modality(_overview(arr))
    elif modality not in ("he", "fluorescence"):
        raise InputError(f"unknown modality {modality!r}; expected 'he' or 'fluorescence'")
    loaded = get_model(model, device)
    estimated = pixel_size is None
    if estimated:
        crop = _central_crop(arr, ESTIMATE_CROP)
        pixel_size = compute_maps(
            crop, loaded, modality=modality, device=device, tta=False
        ).pixel_size
    else:  # the same range and message as the whole-image path
        pixel_size = check_pixel_size(pixel_size, "pixel_size")
    return BlockSetup(
        modality=modality,
        pixel_size=float(pixel_size),
        pixel_size_estimated=estimated,
        params=params or default_params(loaded, modality),
        norm=Normalisation.of_image(arr, modality),
        model_name=loaded if isinstance(loaded, str) else loaded.name,
        tta=tta,
    )


def _owned(labels: np.ndarray, spec: BlockSpec) -> np.ndarray:
    """Boolean per id (index 0 = background): is the nucleus' centroid inside the core?"""
    n = int(labels.max())
    flat = labels.ravel()
    at = np.flatnonzero(flat)
    ids = flat[at]
    w = labels.shape[1]
    area = np.bincount(ids, minlength=n + 1).astype(np.float64)
    area[0] = 1.0
    rows = np.bincount(ids, weights=at // w, minlength=n + 1) / area + spec.window[0]
    cols = np.bincount(ids, weights=at % w, minlength=n + 1) / area + spec.window[2]
    r0, r1, c0, c1 = spec.core
    # a centroid is a mean of pixel centres: pixel (r, c) spans [r, r + 1)
    own = (rows + 0.5 >= r0) & (rows + 0.5 < r1) & (cols + 0.5 >= c0) & (cols + 0.5 < c1)
    own[0] = False
    return own


def _n_truncated(labels: np.ndarray, spec: BlockSpec, shape: tuple[int, int]) -> int:
    r0, r1, c0, c1 = spec.window
    edges = []
    if r0 > 0:
        edges.append(labels[0])
    if r1 < shape[0]:
        edges.append(labels[-1])
    if c0 > 0:
        edges.append(labels[:, 0])
    if c1 < shape[1]:
        edges.append(labels[:, -1])
    if not edges:
        return 0
    return int(np.count_nonzero(np.unique(np.concatenate(edges))))


def segment_block(
    pixels: np.ndarray,
    spec: BlockSpec,
    setup: BlockSetup,
    model: str | LoadedModel,
    *,
    image_shape: tuple[int, int],
    device: str = "auto",
    should_stop: Callable[[], bool] | None = None,
) -> BlockResult:
    """Segment one block and return the nuclei it owns.

    Parameters
    ----------
    pixels : (h, w[, 3]) array
        The image inside ``spec.read_box`` (the window, core plus halo, or more: see
        :attr:`BlockSpec.read`).
    spec : BlockSpec
        Where the block lies in the image.
    setup : BlockSetup
        Modality, pixel size, parameters and normalisation shared by all blocks.
    model : str or LoadedModel
        The model named by ``setup.model_name`` (or the loaded model itself).
    image_shape : (H, W)
        Shape of the whole image (a window edge on the image's border cuts nothing).
    """
    r0, r1, c0, c1 = spec.read_box
    if pixels.shape[:2] != (r1 - r0, c1 - c0):
        raise ValueError(f"block {spec.index}: pixels {pixels.shape[:2]} do not match its window")
    x = setup.norm.apply(prepare_image(pixels, name=f"block {spec.index}"))
    maps = maps_on_grid(
        x,
        model,
        read=spec.read_box,
        window=spec.window,
        image_shape=image_shape,
        modality=setup.modality,
        pixel_size=setup.pixel_size,
        device=device,
        should_stop=should_stop,
        tta=setup.tta,
    )
    del x
    return block_from_maps(maps, spec, setup, image_shape)


def block_from_maps(
    maps: Maps, spec: BlockSpec, setup: BlockSetup, image_shape: tuple[int, int]
) -> BlockResult:
    """Post-process a block's window maps and keep the nuclei it owns."""
    has_types = maps.type_prob is not None
    pp = Postprocessor(maps.prob, maps.hv, maps.contour, maps.type_prob, setup.pixel_size)
    res = pp.run(setup.params)
    del pp, maps
    own = _owned(res.labels, spec)
    lut = np.zeros(own.size, np.uint32)
    lut[own] = np.arange(1, int(own.sum()) + 1, dtype=np.uint32)
    labels = lut[res.labels]
    keep = own[1:]
    types = None
    if has_types:  # (the post-processing gives no types when it finds no nuclei)
        types = np.zeros(0, np.int16) if res.types is None else res.types[keep]
    return BlockResult(
        spec=spec,
        labels=labels,
        scores=res.scores[keep],
        types=types,
        n_truncated=_n_truncated(labels, spec, image_shape),
    )


def _largest_parts(patch: np.ndarray, ids: np.ndarray) -> None:
    """In place: nuclei ``ids`` of ``patch`` keep only their largest connected part."""
    boxes = ndi.find_objects(patch)
    for i in ids:
        box = boxes[i - 1]
        if box is None:
            continue
        mask = patch[box] == i
        patch[box][mask & ~largest_part(mask)] = 0


def paste_block(out: np.ndarray, result: BlockResult, next_id: int) -> tuple[np.ndarray, int]:
    """Write a block's owned nuclei into ``out`` with ids from ``next_id + 1``.

    Only pixels still 0 are written, so two blocks' slightly different outlines never
    overwrite one another. A nucleus that finds more than half of itself already taken
    is the same nucleus claimed twice (its centroid fell on the seam differently in the
    two blocks) and is dropped; one that loses a smaller part keeps its largest piece.

    Returns
    -------
    kept : (n,) bool array
        Which of the block's nuclei were written (in id order).
    last_id : int
        The largest id now in ``out``.
    """
    patch = result.labels.copy()
    n = result.scores.shape[0]
    region = out[result.spec.window_slices]
    taken = (patch > 0) & (region != 0)
    area = np.bincount(patch.ravel(), minlength=n + 1)
    lost = np.bincount(patch[taken], minlength=n + 1)
    keep = (area > 0) & (2 * lost <= area)
    keep[0] = False
    patch[taken] = 0
    _largest_parts(patch, np.flatnonzero(keep & (lost > 0)))
    lut = np.zeros(n + 1, np.uint32)
    lut[keep] = np.arange(next_id + 1, next_id + 1 + int(keep.sum()), dtype=np.uint32)
    place = patch > 0
    region[place] = lut[patch[place]]
    return keep[1:], next_id + int(keep.sum())


class _SharedMaps:
    """Map regions (:mod:`.tilemaps`) of an in-memory image, computed when a block first
    needs them and kept only as far as later blocks need them.

    Blocks go row by row and their cores end where the tiles hand over
    (:func:`snap_edges`), so between two rows of blocks about one row of tiles' maps is
    held (448 working px by the image's width, 36 bytes a px with a typed model).
    """

    def __init__(self, arr, specs, setup, model, device, should_stop) -> None:
        self.active = isinstance(model, LoadedModel)
        if not self.active:
            return
        self.arr, self.setup, self.model = arr, setup, model
        self.device, self.should_stop = device, should_stop
        regions, self.uses = tilemaps.plan_regions(
            arr.shape[:2], {s.index: s.window for s in specs},
            pixel_size=setup.pixel_size, stride=model.net.stride,
            align=_grid_step(model, setup.pixel_size), edges=core_edges(specs))  # fmt: skip
        self.regions = {r.index: r for r in regions}
        self.needs = {s.index: working_need(s.window, arr.shape[:2], setup.pixel_size)
                      for s in specs}  # fmt: skip
        self.waiting: dict[int, list[int]] = {g: [] for g in self.regions}
        for b, used in self.uses.items():  # the blocks that will read each region
            for g in used:
                self.waiting[g].append(b)
        self.cache: dict[int, tuple[tilemaps.MapRegion, np.ndarray]] = {}

    def _compute(self, g: int) -> tuple[tilemaps.MapRegion, np.ndarray]:
        region, s = self.regions[g], self.setup
        r0, r1, c0, c1 = region.read
        x = s.norm.apply(prepare_image(self.arr[r0:r1, c0:c1], name=f"region {g}"))
        return region, tilemaps.region_maps(
            x, region, self.model, image_shape=self.arr.shape[:2], modality=s.modality,
            pixel_size=s.pixel_size, device=self.device, should_stop=self.should_stop,
            tta=s.tta)  # fmt: skip

    def window(self, spec: BlockSpec) -> Maps:
        """The block's window maps; then each region is cut to what later blocks need."""
        uses = self.uses[spec.index]
        for g in uses:
            if g not in self.cache:
                self.cache[g] = self._compute(g)
        maps = tilemaps.assemble(spec.window, {g: self.cache[g][1] for g in uses},
                                 {g: self.cache[g][0] for g in uses},
                                 image_shape=self.arr.shape[:2],
                                 pixel_size=self.setup.pixel_size)  # fmt: skip
        for g in uses:
            self.waiting[g].remove(spec.index)
            self._trim(g)
        return maps

    def _trim(self, g: int) -> None:
        region, stack = self.cache[g]
        left = [tilemaps.intersect(self.needs[b], region.part) for b in self.waiting[g]]
        left = [box for box in left if box is not None]
        if not left:
            del self.cache[g]
            return
        keep = tilemaps.bounding(left)
        if keep == region.part:
            return
        p = region.part
        cut = stack[:, keep[0] - p[0] : keep[1] - p[0], keep[2] - p[2] : keep[3] - p[2]]
        self.cache[g] = (dataclasses.replace(region, part=keep), np.ascontiguousarray(cut))


def segment_blockwise(
    image: np.ndarray,
    model: str | LoadedModel = "default",
    *,
    pixel_size: float | None = None,
    modality: Modality | None = None,
    params: PostprocessParams | None = None,
    device: str = "auto",
    tta: bool | int = DEFAULT_TTA,
    block: int = DEFAULT_BLOCK,
    halo: float = HALO_UM,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> BlockwiseResult:
    """Segment a 2-D image block by block; see :func:`~.segment.compute_maps` for the arguments.

    Parameters
    ----------
    block : int
        Core size of a block, px.
    halo : float
        Context read around each core, µm (converted to px at the image's pixel size,
        at least 16 px).
    progress : callable(done, total), optional
        Called after each block.
    should_stop : callable() -> bool, optional
        Checked before each block and between the model's tiles; raises
        :class:`~.model.inference.CancelledError`.
    """
    if isinstance(block, bool) or not isinstance(block, int) or block < 16:
        raise InputError(f"block size must be a whole number of at least 16 px, got {block!r}")
    arr = _check_image(image)
    loaded = get_model(model, device)
    setup = prepare_setup(
        arr, loaded, pixel_size=pixel_size, modality=modality, params=params, device=device, tta=tta
    )
    halo_px = max(_MIN_HALO_PX, math.ceil(halo / setup.pixel_size))
    specs = plan_blocks(
        arr.shape[:2],
        block,
        halo_px,
        _grid_step(loaded, setup.pixel_size),
        grid=_tile_grid(loaded, setup.pixel_size),
    )
    out = np.zeros(arr.shape[:2], np.uint32)
    scores, types, last, truncated = [], [], 0, 0
    shared = _SharedMaps(arr, specs, setup, loaded, device, should_stop)
    for spec in specs:
        if should_stop is not None and should_stop():
            raise CancelledError("segmentation cancelled")
        if shared.active:
            res = block_from_maps(shared.window(spec), spec, setup, arr.shape[:2])
        else:
            res = segment_block(
                arr[spec.read_slices],
                spec,
                setup,
                loaded,
                image_shape=arr.shape[:2],
                device=device,
                should_stop=should_stop,
            )
        kept, last = paste_block(out, res, last)
        scores.append(res.scores[kept])
        if res.types is not None:
            types.append(res.types[kept])
        truncated += res.n_truncated
        if progress is not None:
            progress(spec.index + 1, len(specs))
    return BlockwiseResult(
        labels=out,
        scores=np.concatenate(scores).astype(np.float32),
        types=np.concatenate(types) if types else None,
        pixel_size=setup.pixel_size,
        pixel_size_estimated=setup.pixel_size_estimated,
        modality=setup.modality,
        model_name=setup.model_name,
        n_blocks=len(specs),
        n_truncated=truncated,
    )
