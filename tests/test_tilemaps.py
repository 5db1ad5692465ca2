"""Map regions: every model tile of a big image run once, the blocks' maps unchanged."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from napari_medinst import blockwise as bw
from napari_medinst import tilemaps
from napari_medinst.model import inference
from napari_medinst.segment import segment
from test_blockwise import _he_mosaic


@pytest.mark.parametrize("length", [100, 512, 513, 960, 1000, 1500, 4100, 9999])
@pytest.mark.parametrize("target", [448, 1000, 2048])
def test_region_spans_partition_the_axis_and_keep_the_last_tiles_together(length, target):
    spans = tilemaps._axis_groups(length, target, 16)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # no gap, no overlap
    # every pixel's tiles (those whose kept part covers it) lie in one span's tiles
    starts = inference._tile_starts(length, 512, 448)
    kept = [inference._kept(s, length, 512, 64) for s in starts]
    for lo, hi in kept:
        owners = [k for k, (a, b) in enumerate(spans) if a < hi and lo < b]
        if len(owners) > 1:  # a tile's kept part never straddles two spans...
            pytest.fail(f"tile kept part {lo}-{hi} straddles spans {owners}")


class _Count:
    def __init__(self, monkeypatch):
        self.n = 0
        real = inference._forward

        def counting(*args, **kw):
            self.n += 1
            return real(*args, **kw)

        monkeypatch.setattr(inference, "_forward", counting)


@pytest.mark.parametrize("pixel_size", [0.5, 0.25])
def test_blocks_run_each_tile_once_and_match_the_whole_image(monkeypatch, pixel_size):
    image = _he_mosaic(1200)
    count = _Count(monkeypatch)
    whole = segment(image, "default", pixel_size=pixel_size, tta=False).labels
    n_whole, count.n = count.n, 0
    blocks = bw.segment_blockwise(image, "default", pixel_size=pixel_size, tta=False, block=400)
    assert blocks.n_blocks == 9
    assert count.n == n_whole  # before the regions: every straddling tile once per block
    assert np.array_equal(blocks.labels > 0, whole > 0)
    pairs = np.unique(np.stack([whole.ravel(), blocks.labels.ravel()]), axis=1)
    assert len(pairs[0][pairs[0] > 0]) == len(np.unique(pairs[0][pairs[0] > 0]))  # no nucleus cut


def test_assemble_refuses_a_window_its_regions_do_not_cover():
    regions, uses = tilemaps.plan_regions((1000, 1000), {0: (0, 600, 0, 600)}, region=(448, 448),
                                          pixel_size=0.5, stride=16)  # fmt: skip
    assert uses[0] and all(r.index in uses[0] for r in regions)
    first = regions[0]
    h, w = first.part[1] - first.part[0], first.part[3] - first.part[2]
    with pytest.raises(ValueError, match="do not cover"):
        tilemaps.assemble((0, 600, 0, 600), {first.index: np.zeros((4, h, w), np.float32)},
                          {r.index: r for r in regions}, image_shape=(1000, 1000),
                          pixel_size=0.5)  # fmt: skip


def test_a_region_is_computed_only_where_blocks_need_it():
    # one block in the top-left corner: its right neighbour's region is read as a strip
    regions, uses = tilemaps.plan_regions((2000, 2000), {0: (0, 1000, 0, 1000)}, region=(960, 960),
                                          pixel_size=0.5, stride=16)  # fmt: skip
    parts = {r.index: r.part for r in regions}
    assert len(regions) == len(uses[0]) == 4
    strips = [p for p in parts.values() if p[0] > 0 or p[2] > 0]
    assert all(min(p[1] - p[0], p[3] - p[2]) < 100 for p in strips)


def test_block_edges_move_to_where_the_tiles_hand_over():
    edges = bw._edges(3600, 1000)  # [0, 900, 1800, 2700, 3600]
    cuts = tilemaps.clean_cuts(3600, 16)
    assert bw.snap_edges(edges, 3600, 0.5, 16) == [0, 928, 1824, 2720, 3600]
    assert set(bw.snap_edges(edges, 3600, 0.5, 16)[1:-1]) <= set(cuts)
    # at half the working scale an image px is half a working px
    assert bw.snap_edges(bw._edges(7200, 2000), 7200, 0.25, 16) == [0, 1856, 3648, 5440, 7200]
    assert bw.snap_edges(bw._edges(3600, 400), 3600, 0.5, 16) == bw._edges(3600, 400)  # narrow
    # regions are cut at the blocks' edges: none straddles two cores
    specs = bw.plan_blocks((3600, 3600), 1000, 64, 16, grid=(0.5, 16))
    regions, _ = tilemaps.plan_regions((3600, 3600), {s.index: s.window for s in specs},
                                       pixel_size=0.5, stride=16, edges=bw.core_edges(specs))  # fmt: skip
    for r in regions:
        homes = [s for s in specs if tilemaps.intersect(r.box, s.core)]
        assert len(homes) == 1


def test_the_block_path_holds_about_one_row_of_tiles_maps(monkeypatch):
    m = _he_mosaic(1536)
    image = np.ascontiguousarray(np.concatenate([m, m[:, ::-1], m], axis=1)[:1536, :3600])
    held = []
    window = bw._SharedMaps.window

    def spy(self, spec):
        out = window(self, spec)
        held.append(sum(a.nbytes for _, a in self.cache.values()))
        return out

    monkeypatch.setattr(bw._SharedMaps, "window", spy)
    res = bw.segment_blockwise(image, "default", pixel_size=0.5, tta=False, block=1000)
    assert res.n_blocks == 8 and held[-1] == 0
    row_of_tiles = 448 * 3600 * 9 * 4  # one row of tiles' maps across the image
    assert max(held) <= 1.1 * row_of_tiles  # (regions held whole: about twice that)


def test_network_scale_snaps_to_a_power_of_two_within_twelve_percent():
    from napari_medinst.preprocess import network_scale

    assert network_scale(0.25) == 0.5 and network_scale(0.5) == 1.0
    assert network_scale(0.2428) == 0.5 and network_scale(0.4856) == 1.0
    assert network_scale(0.2265) == 0.5 and network_scale(0.28) == 0.5  # Hamamatsu 40x
    assert network_scale(1.05) == 2.0 and network_scale(0.126) == 0.25
    assert network_scale(0.3) == pytest.approx(0.6)  # far from any: left as it is
    assert network_scale(0.37) == pytest.approx(0.74)


@pytest.mark.parametrize("pixel_size", [0.2428, 0.504])
def test_blocks_equal_the_whole_image_at_a_slides_real_pixel_size(pixel_size):
    # scanners' pixel sizes are rarely exactly 0.25 / 0.5 µm/px: the network runs at the
    # power-of-two scale, on the whole image's grid, so blocks still give its nuclei
    image = _he_mosaic(1200)
    whole = segment(image, "default", pixel_size=pixel_size, tta=False)
    assert whole.maps.pixel_size == pixel_size  # measurements keep the true pixel size
    blocks = bw.segment_blockwise(image, "default", pixel_size=pixel_size, tta=False, block=400)
    assert np.array_equal(blocks.labels > 0, whole.labels > 0)
    pairs = np.unique(np.stack([whole.labels.ravel(), blocks.labels.ravel()]), axis=1)
    pairs = pairs[:, (pairs[0] > 0) & (pairs[1] > 0)]
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1] > 100
