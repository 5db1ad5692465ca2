"""Progress and cancellation inside a tile (issue 17, bug 9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medinst.model import inference
from napari_medinst.model.inference import CancelledError, predict_maps
from napari_medinst.model.network import NetConfig, NucleusNet

TINY = NetConfig(widths=(8, 16, 16))


@pytest.fixture
def net() -> NucleusNet:
    torch.manual_seed(0)
    return NucleusNet(TINY)


def test_progress_moves_within_one_tile_and_maps_are_unchanged(net, monkeypatch):
    x = np.random.default_rng(0).random((3, 200, 200), dtype=np.float32)
    plain = predict_maps(net, x, tile=256, tta=True)
    monkeypatch.setattr(inference, "PROGRESS_INTERVAL_S", 0.0)  # report at every layer
    calls: list[tuple[int, int]] = []
    got = predict_maps(net, x, tile=256, tta=True, progress=lambda d, t: calls.append((d, t)))
    for name in ("prob", "hv", "contour"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(got, name))
    # one tile, four mirror passes: many reports, not just one at the end
    assert len(calls) > 20
    done = [d for d, _ in calls]
    assert done == sorted(done) and len({t for _, t in calls}) == 1
    assert calls[-1][0] == calls[-1][1] and 0 < done[len(done) // 2] < calls[-1][1]


def test_cancel_acts_within_a_tile(net):
    x = np.zeros((3, 200, 200), np.float32)
    layers: list[int] = []
    hooks = [m.register_forward_hook(lambda *_: layers.append(1)) for m in net.modules()]
    checks = []

    def stop() -> bool:
        checks.append(1)
        return len(checks) > 3  # asked to stop during the first pass of the only tile

    with pytest.raises(CancelledError):
        predict_maps(net, x, tile=256, tta=True, should_stop=stop)
    for h in hooks:
        h.remove()
    n_layers = sum(1 for m in net.modules() if next(m.children(), None) is None)
    assert len(layers) < n_layers  # stopped inside the first forward pass
    # the hooks are gone: a later prediction runs to the end
    assert predict_maps(net, x, tile=256).prob.shape == (200, 200)
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_progress_reaches_the_end_over_several_tiles(net):
    x = np.zeros((3, 300, 300), np.float32)
    calls: list[tuple[int, int]] = []
    predict_maps(net, x, tile=128, overlap=32, progress=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1][0] == calls[-1][1]
