"""The model's maps of a big image computed once per region and shared by the blocks.

A block of :mod:`.blockwise` gets the whole image's maps on its window by running the
whole image's model tiles over it; a tile that straddles a block's border is then run by
each block that needs it (about 1.6 times the whole-image path's tiles at 2048 px
blocks). Here the tiles are run once instead.

Between two neighbouring tiles of the whole image's grid (:func:`~.model.inference.
predict_maps`: 512 px tiles at the working scale, 64 px overlap) the blending weights do
not overlap: a tile's weight is zero in the outer half of each overlap, so each pixel's
maps come from the one tile whose *kept part* covers it, except next to the image's far
edges, where the last tile (moved back to end there) blends with the one before it. The
kept parts of consecutive tiles therefore cut each axis into spans with no pixel shared;
:func:`plan_regions` groups the tiles (:data:`REGION`: one row of tiles high, two wide,
keeping the last two tiles of an axis together, and cutting at the blocks' core edges
where they fall between tiles, see :func:`~.blockwise.snap_edges`), and a *region* is one
row group times one column group. Regions are small so that a region task needs little
memory (its input and the maps of about 448 × 896 working px: some 15 MB with a typed
model), the tasks spread evenly over the workers, and between two rows of blocks only
one row of tiles' maps waits for the next; how many there are changes nothing else, as
every tile is run once whatever the grouping. A region's maps, computed from its own
tiles only, are the whole image's on every one of its pixels, bit for bit on the same
device; a block assembles its window's maps from the regions it meets (:func:`assemble`)
and resamples them to image px as :func:`~.segment.maps_on_grid` does, so its nuclei are
those of the whole-image path, with every tile run once.

A region is computed only where some block needs it (:attr:`MapRegion.part`: a block at
the edge of the tissue reads only a strip of a background neighbour's region). The
slide engine keeps regions on disk until their blocks are done; :func:`~.blockwise.
segment_blockwise` keeps them in memory.

The classical fallback has no tiles: its blocks compute their own maps.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from .model.folder import LoadedModel
from .model.inference import OVERLAP, Maps, _kept, _tile_starts, resample_stack, tile_side
from .preprocess import Modality, network_scale
from .segment import grid_maps, tiles_read_box, window_geometry, working_need, working_shape

__all__ = ["REGION", "MapRegion", "assemble", "plan_regions", "region_maps"]

#: Height and width of a map region, px at the working scale: one row of tiles (their
#: 448 px step) by two. One row, so that between two rows of blocks (cut where the tiles'
#: maps change) the maps held for the next row are one row of tiles.
REGION = (448, 1024)

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class MapRegion:
    """A group of the whole image's model tiles and the maps they alone decide.

    Boxes are ``(row0, row1, col0, col1)``, half-open; ``box`` and ``part`` in working
    px (the network's scale), ``read`` in image px.
    """

    index: int  # row-major over the full grid of regions
    box: Box  # every pixel whose maps come from this region's tiles
    part: Box  # the pixels some block needs (inside ``box``): what is computed
    read: Box  # the image pixels that computation reads


def _kept_spans(length: int, stride: int) -> list[tuple[int, int]]:
    tile = tile_side(stride)
    return [_kept(s, length, tile, OVERLAP) for s in _tile_starts(length, tile, tile - OVERLAP)]


def _clean(kept: list[tuple[int, int]]) -> list[int]:
    """Indices of the kept spans that start where the one before ends (not blended)."""
    return [k for k in range(1, len(kept)) if kept[k - 1][1] == kept[k][0]]


def clean_cuts(length: int, stride: int) -> list[int]:
    """Working px (one axis) where the maps change from one group of tiles to the next:
    the starts of the tiles' kept parts, except where the last tile blends with the one
    before it. A cut there splits no pixel's tiles."""
    kept = _kept_spans(length, stride)
    return [kept[k][0] for k in _clean(kept)]


def _axis_groups(
    length: int, target: int, stride: int, forced: Iterable[int] = ()
) -> list[tuple[int, int]]:
    """Kept spans ``[lo, hi)`` of about ``target`` px of tiles each, partitioning the axis,
    cut at every clean cut in ``forced`` (working px)."""
    kept = _kept_spans(length, stride)
    step = tile_side(stride) - OVERLAP
    per = max(1, round(target / step))
    clean = set(_clean(kept))
    hard = sorted({k for k in clean if kept[k][0] in set(forced)} | {0, len(kept)})
    cuts = []
    for a, b in itertools.pairwise(hard):  # groups of ``per`` tiles between forced cuts
        cuts += [k for k in range(a, b, per) if k in clean or k == a]
    bounds = sorted({*cuts, len(kept)} - {0})
    return [(kept[a][0], kept[b - 1][1]) for a, b in itertools.pairwise([0, *bounds])]


def intersect(a: Box, b: Box) -> Box | None:
    box = (max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3]))
    return box if box[0] < box[1] and box[2] < box[3] else None


def bounding(boxes: Iterable[Box]) -> Box:
    boxes = list(boxes)
    return (min(b[0] for b in boxes), max(b[1] for b in boxes),
            min(b[2] for b in boxes), max(b[3] for b in boxes))  # fmt: skip


def plan_regions(
    image_shape: tuple[int, int],
    windows: dict[int, Box],
    *,
    pixel_size: float,
    stride: int,
    align: int = 1,
    region: tuple[int, int] = REGION,
    edges: tuple[Iterable[int], Iterable[int]] = ((), ()),
) -> tuple[tuple[MapRegion, ...], dict[int, tuple[int, ...]]]:
    """The regions the blocks ``windows`` ({block: window in image px}) need.

    Returns the needed regions (in index order, each with the union of what its blocks
    need as :attr:`MapRegion.part`) and, per block, the indices of the regions it
    reads. ``region`` is the regions' (height, width) at the working scale; ``edges``
    (image px, per axis: the blocks' core edges) cut regions too where they fall on a
    clean cut (:func:`clean_cuts`), so that no region straddles two blocks' cores.
    """
    scale = network_scale(pixel_size)
    gshape = working_shape(image_shape, scale)
    rows, cols = (_axis_groups(gshape[a], region[a], stride,
                               [round(e * scale) for e in edges[a]]) for a in (0, 1))  # fmt: skip
    row_starts = np.array([lo for lo, _ in rows])
    col_starts = np.array([lo for lo, _ in cols])

    def hits(starts: np.ndarray, lo: int, hi: int) -> range:  # groups meeting [lo, hi)
        return range(int(np.searchsorted(starts, lo, "right")) - 1,
                     int(np.searchsorted(starts, hi, "left")))  # fmt: skip

    parts: dict[int, list[Box]] = {}
    uses: dict[int, tuple[int, ...]] = {}
    for b, window in windows.items():
        need = working_need(window, image_shape, pixel_size)
        hit = []
        for i in hits(row_starts, need[0], need[1]):
            for j in hits(col_starts, need[2], need[3]):
                g = i * len(cols) + j
                inside = intersect(need, (*rows[i], *cols[j]))
                if inside is not None:
                    parts.setdefault(g, []).append(inside)
                    hit.append(g)
        uses[b] = tuple(hit)
    boxes = {g: (*rows[g // len(cols)], *cols[g % len(cols)]) for g in parts}
    regions = []
    for g in sorted(parts):
        part = bounding(parts[g])
        read = tiles_read_box(part, image_shape, pixel_size, stride, align)
        regions.append(MapRegion(g, boxes[g], part, read))
    return tuple(regions), uses


def region_maps(
    x: np.ndarray,
    region: MapRegion,
    model: LoadedModel,
    *,
    image_shape: tuple[int, int],
    modality: Modality,
    pixel_size: float,
    device: str = "auto",
    should_stop: Callable[[], bool] | None = None,
    tta: bool | int = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The stacked maps (:meth:`~.model.inference.Maps.channels` in one array) of
    ``region.part``.

    ``x`` is the normalised network input of the image pixels in ``region.read``.
    ``out``, when given, is filled and returned: a ``(4 + types, h, w)`` float32 array
    of the part's shape (a memory-mapped file, say), so that no other copy is made.
    """
    maps, (r0, r1, c0, c1) = grid_maps(x, model, read=region.read, need=region.part,
                                       image_shape=image_shape, modality=modality,
                                       pixel_size=pixel_size, device=device,
                                       should_stop=should_stop, tta=tta)  # fmt: skip
    channels = maps.channels()
    n = sum(c.shape[0] for c in channels)
    shape = (n, r1 - r0, c1 - c0)
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape:
        raise ValueError(f"region {region.index}: out has shape {out.shape}, the maps {shape}")
    k = 0
    for c in channels:
        out[k : k + c.shape[0]] = c[:, r0:r1, c0:c1]
        k += c.shape[0]
    return out


def assemble(
    window: Box,
    parts: dict[int, np.ndarray],
    regions: dict[int, MapRegion],
    *,
    image_shape: tuple[int, int],
    pixel_size: float,
) -> Maps:
    """A window's maps (image px) from the stacked maps of the regions it meets."""
    need = working_need(window, image_shape, pixel_size)
    channels = {p.shape[0] for p in parts.values()}
    if len(channels) != 1:
        raise ValueError(f"regions disagree on their maps' channels: {sorted(channels)}")
    out = np.full((channels.pop(), need[1] - need[0], need[3] - need[2]), np.nan, np.float32)
    for g, stack in parts.items():
        part = regions[g].part
        inside = intersect(need, part)
        if inside is None:
            continue
        y0, y1, x0, x1 = inside
        out[:, y0 - need[0] : y1 - need[0], x0 - need[2] : x1 - need[2]] = stack[
            :, y0 - part[0] : y1 - part[0], x0 - part[2] : x1 - part[2]
        ]
    if np.isnan(out[0]).any():
        raise ValueError(f"the regions do not cover the maps of window {window}")
    # maps_to_window's resampling and crop on the stack as it is: no copy of each channel
    size, (r0, r1, c0, c1) = window_geometry(need, window, network_scale(pixel_size))
    out = resample_stack(out, size)
    return Maps.from_stack(out[:, r0:r1, c0:c1], out.shape[0] - 4)
