"""A crop predicted on the whole image's tile grid has the whole image's maps."""

import numpy as np
import pytest
import torch

from napari_medinst.model.inference import TileGrid, grid_span, predict_maps
from napari_medinst.model.network import NetConfig, NucleusNet


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return NucleusNet(NetConfig(widths=(8, 16, 16), n_types=2)).eval()


def _crop_maps(net, x, box, **kw):
    """Maps of ``x`` inside ``box``, predicted from the least input the grid needs."""
    h, w = x.shape[1:]
    r0, r1, c0, c1 = box
    t0, t1 = grid_span(h, r0, r1, stride=net.stride, **kw)
    u0, u1 = grid_span(w, c0, c1, stride=net.stride, **kw)
    grid = TileGrid((h, w), (t0, u0), (r0 - t0, r1 - t0, c0 - u0, c1 - u0))
    maps = predict_maps(net, x[:, t0:t1, u0:u1], grid=grid, **kw)
    return maps, (slice(r0 - t0, r1 - t0), slice(c0 - u0, c1 - u0)), (t1 - t0) * (u1 - u0)


@pytest.mark.parametrize(
    "box",
    [
        (0, 40, 0, 40),  # the first tile's corner
        (90, 150, 200, 260),  # inside, across a regular seam
        (250, 333, 270, 301),  # into the last tile, which blends with the one before
    ],
)
def test_crop_on_the_grid_equals_the_whole(net, box):
    rng = np.random.default_rng(1)
    x = rng.random((3, 333, 301), dtype=np.float32)
    kw = {"tile": 96, "overlap": 32}
    whole = predict_maps(net, x, **kw)
    maps, (rs, cs), read = _crop_maps(net, x, box, **kw)
    r0, r1, c0, c1 = box
    assert read < x.shape[1] * x.shape[2]  # a crop, not the whole image again
    for name in ("prob", "contour"):
        np.testing.assert_array_equal(
            getattr(maps, name)[rs, cs], getattr(whole, name)[r0:r1, c0:c1]
        )
    np.testing.assert_array_equal(maps.hv[:, rs, cs], whole.hv[:, r0:r1, c0:c1])
    np.testing.assert_array_equal(maps.type_prob[:, rs, cs], whole.type_prob[:, r0:r1, c0:c1])


def test_crop_without_the_grid_differs(net):
    """Why the grid exists: the same crop tiled on its own gets other maps."""
    rng = np.random.default_rng(2)
    x = rng.random((3, 300, 300), dtype=np.float32)
    kw = {"tile": 96, "overlap": 32}
    whole = predict_maps(net, x, **kw)
    alone = predict_maps(net, x[:, 50:250, 50:250], **kw)
    assert not np.array_equal(alone.prob[20:180, 20:180], whole.prob[70:230, 70:230])


def test_an_input_missing_a_tile_is_refused(net):
    x = np.zeros((3, 100, 100), np.float32)
    grid = TileGrid((400, 400), (150, 150), (10, 90, 10, 90))
    with pytest.raises(ValueError, match="grid_span"):
        predict_maps(net, x, grid=grid, tile=96, overlap=32)
