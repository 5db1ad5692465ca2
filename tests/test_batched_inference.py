"""The GPU path of predict_maps (batched tiles and mirror passes, autocast), run on CPU."""

import numpy as np
import pytest
import torch

from napari_medinst.model.inference import predict_maps, tta_flips
from napari_medinst.model.network import NetConfig, NucleusNet


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return NucleusNet(NetConfig(widths=(8, 16, 16), n_types=3)).eval()


@pytest.mark.parametrize("tta", [1, 2, 4])
def test_batched_tiles_and_passes_give_the_one_tile_maps(net, tta):
    x = np.random.default_rng(0).random((3, 150, 130)).astype(np.float32)
    one = predict_maps(net, x, tile=64, overlap=16, tta=tta, tta_std=True)
    many = predict_maps(net, x, tile=64, overlap=16, tta=tta, tta_std=True, batch_size=5)
    for a, b in ((one.prob, many.prob), (one.hv, many.hv), (one.type_prob, many.type_prob)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    if tta > 1:
        np.testing.assert_allclose(one.tta_std, many.tta_std, atol=1e-3)
        assert many.tta_std.max() > 0
    else:
        assert many.tta_std is None


def test_mixed_precision_stays_close_to_float32(net):
    x = np.random.default_rng(1).random((3, 96, 96)).astype(np.float32)
    ref = predict_maps(net, x, tile=64, overlap=16, tta=4)
    low = predict_maps(net, x, tile=64, overlap=16, tta=4, batch_size=4, amp="bf16")
    assert low.prob.dtype == np.float32
    assert np.abs(low.prob - ref.prob).max() < 0.1
    with pytest.raises(ValueError, match="amp must be"):
        predict_maps(net, x, tile=64, overlap=16, batch_size=2, amp="int8")


def test_two_passes_are_the_image_and_its_half_turn():
    assert tta_flips(2) == ((False, False), (True, True))
    assert len(tta_flips(True)) == 4 and len(tta_flips(False)) == 1
    with pytest.raises(ValueError, match="1, 2 or 4"):
        tta_flips(3)


@pytest.mark.parametrize(
    ("argv", "want"),
    [([], None), (["--tta"], 4), (["--tta", "2"], 2), (["--no-tta"], 1), (["--tta", "1"], 1)],
)
def test_tta_passes_on_the_command_line(argv, want):
    from napari_medinst.cli import build_parser
    from napari_medinst.model.inference import DEFAULT_TTA

    args = build_parser().parse_args(["segment", "img.tif", "-o", "out", *argv])
    assert args.tta == (DEFAULT_TTA if want is None else want)
    slide = build_parser().parse_args(["segment-slide", "s.svs", "-o", "o.zarr", *argv])
    assert slide.tta == args.tta


def test_tta_other_than_1_2_4_is_refused(capsys):
    from napari_medinst.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["segment", "img.tif", "-o", "out", "--tta", "3"])
    assert "invalid choice" in capsys.readouterr().err
