import json

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from conftest import disk_labels
from napari_medinst._io import InputError
from napari_medinst.metrics import evaluate
from napari_medinst.model.augment import AugmentConfig, copy_paste, photometric, random_crop
from napari_medinst.model.folder import ModelError, load_model, save_model_folder
from napari_medinst.model.inference import CancelledError, predict_maps
from napari_medinst.model.losses import hovernet_loss
from napari_medinst.model.network import NetConfig, NucleusNet
from napari_medinst.postprocess import postprocess
from napari_medinst.targets import hv_maps

TINY = NetConfig(widths=(8, 16, 16))


@pytest.mark.parametrize("shape", [(37, 53), (64, 64), (129, 70)])
def test_forward_any_size(shape):
    net = NucleusNet(TINY).eval()
    maps = predict_maps(net, np.random.default_rng(0).random((3, *shape), dtype=np.float32))
    assert maps.prob.shape == shape and maps.hv.shape == (2, *shape)
    assert maps.prob.min() >= 0 and maps.prob.max() <= 1


def test_type_head_and_loss_backward():
    net = NucleusNet(NetConfig(widths=(8, 16), n_types=3))
    x = torch.rand(2, 3, 32, 32)
    out = net(x)
    assert out.type_logits.shape == (2, 3, 32, 32)
    lab = disk_labels((32, 32), ((10, 10), (20, 22)), 5)
    fg = torch.from_numpy(np.stack([lab > 0] * 2).astype(np.int64))
    hv = torch.from_numpy(np.stack([hv_maps(lab)] * 2))
    contour = fg.float()
    loss, parts = hovernet_loss(out, fg, hv, contour, types=fg)
    loss.backward()
    assert set(parts) >= {"np_ce", "np_dice", "hv_mse", "hv_msge", "contour_bce", "type_ce"}
    assert all(np.isfinite(v) for v in parts.values())


def test_flip_tta_is_equivariant_and_close_to_plain():
    torch.manual_seed(0)
    net = NucleusNet(TINY).eval()
    x = np.random.default_rng(3).random((3, 64, 96), dtype=np.float32)
    plain = predict_maps(net, x)
    tta = predict_maps(net, x, tta=True)
    mirrored = predict_maps(net, np.ascontiguousarray(x[:, :, ::-1]), tta=True)
    # the average over all four mirror images commutes with mirroring: the horizontal
    # map changes sign, everything else just mirrors
    np.testing.assert_allclose(mirrored.prob, tta.prob[:, ::-1], atol=1e-5)
    np.testing.assert_allclose(mirrored.hv[0], -tta.hv[0][:, ::-1], atol=1e-5)
    np.testing.assert_allclose(mirrored.hv[1], tta.hv[1][:, ::-1], atol=1e-5)
    np.testing.assert_allclose(mirrored.contour, tta.contour[:, ::-1], atol=1e-5)
    assert not np.allclose(plain.hv, tta.hv, atol=1e-4)  # it did average something
    with pytest.raises(AssertionError):  # and the plain network is not equivariant
        np.testing.assert_allclose(
            predict_maps(net, np.ascontiguousarray(x[:, :, ::-1])).hv[0],
            -plain.hv[0][:, ::-1],
            atol=1e-5,
        )


def test_save_load_round_trip(tmp_path):
    net = NucleusNet(TINY).eval()
    save_model_folder(tmp_path / "m", net, half=False)
    loaded = load_model(tmp_path / "m")
    x = np.random.default_rng(1).random((3, 48, 48), dtype=np.float32)
    np.testing.assert_allclose(
        predict_maps(net, x).prob, predict_maps(loaded.net, x).prob, atol=1e-5
    )


def test_encoder_blocks_round_trip_and_legacy_configs(tmp_path):
    deep = NetConfig(widths=(8, 16, 16), blocks=(1, 3))
    net = NucleusNet(deep).eval()
    assert len(net.down[1]) == 1 + 3  # strided conv + three residual blocks
    save_model_folder(tmp_path / "deep", net, half=False)
    loaded = load_model(tmp_path / "deep")
    assert loaded.net.config == deep
    x = np.random.default_rng(2).random((3, 40, 40), dtype=np.float32)
    np.testing.assert_allclose(predict_maps(net, x).hv, predict_maps(loaded.net, x).hv, atol=1e-5)
    # a config saved before ``blocks`` existed means one block per level
    legacy = NetConfig.from_dict({"in_channels": 3, "widths": [8, 16, 16], "n_types": 0})
    assert legacy.encoder_blocks() == (1, 1)
    with pytest.raises(ValueError, match="invalid network config"):
        NetConfig.from_dict({"widths": [8, 16, 16], "blocks": [1]})
    with pytest.raises(ValueError, match="one entry per level"):
        NucleusNet(NetConfig(widths=(8, 16, 16), blocks=(1, 1, 1)))


def test_bad_model_folders_give_clear_errors(tmp_path):
    save_model_folder(tmp_path / "m", NucleusNet(TINY))
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "nope")
    weights = tmp_path / "m" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelError, match="checksum"):
        load_model(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.pop("weights_sha256")
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="cannot be read"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(ModelError, match=r"config\.json"):
        load_model(tmp_path / "m")
    assert issubclass(ModelError, InputError)


def test_tiled_equals_whole(monuseg_train_labels):
    torch.manual_seed(0)
    net = NucleusNet(TINY).eval()
    # a smooth input with structure, so the random network gives structured maps
    lab = monuseg_train_labels[0][:300, :300]
    x = np.stack([(lab > 0).astype(np.float32)] * 3) * 0.8 + 0.1
    whole = predict_maps(net, x, tile=1024)
    tiled = predict_maps(net, x, tile=128, overlap=48)
    assert np.abs(whole.prob - tiled.prob).max() < 0.02
    a = postprocess(whole.prob, whole.hv, whole.contour).labels
    b = postprocess(tiled.prob, tiled.hv, tiled.contour).labels
    if a.max() > 0:
        assert evaluate(a, b).aji > 0.98


def test_cancel_stops_prediction():
    net = NucleusNet(TINY)
    with pytest.raises(CancelledError):
        predict_maps(net, np.zeros((3, 300, 300), np.float32), tile=128, should_stop=lambda: True)


def test_pasted_nucleus_hv_equals_scratch():
    rng = np.random.default_rng(3)
    lab = disk_labels((80, 80), ((20, 20),), 8)
    donor = disk_labels((80, 80), ((40, 40), (60, 20)), 7)
    img, dimg = np.zeros((3, 80, 80), np.float32), np.ones((3, 80, 80), np.float32)
    new_img, new_lab, n = copy_paste(img, lab, dimg, donor, rng, n_max=2, max_overlap=0.0)
    assert n >= 1 and new_lab.max() == 1 + n
    hv = hv_maps(new_lab)
    for i in range(2, new_lab.max() + 1):
        alone = np.where(new_lab == i, i, 0)
        np.testing.assert_allclose(hv[:, new_lab == i], hv_maps(alone)[:, new_lab == i])
        assert np.all(new_img[:, new_lab == i] == 1.0)  # pixels came with the mask
    assert np.all(new_lab[lab == 1] == 1)  # no overlap allowed: original untouched


def test_crop_and_photometric_keep_alignment():
    rng = np.random.default_rng(0)
    lab = disk_labels((120, 120), ((30, 30), (80, 90)), 12)
    img = np.stack([(lab > 0).astype(np.float32)] * 3)
    for _ in range(5):
        ci, cl = random_crop(img, lab, 64, rng, (0.7, 1.4))
        assert ci.shape == (3, 64, 64) and cl.shape == (64, 64)
        inner = ndi.binary_erosion(cl > 0)
        outer = ~ndi.binary_dilation(cl > 0)
        assert np.all(ci[0][inner] > 0.75) and np.all(ci[0][outer] < 0.25)  # no shift
    out = photometric(img * 0.5 + 0.25, "he", AugmentConfig(), rng)
    assert out.shape == img.shape and out.dtype == np.float32


@pytest.mark.parametrize("bad", [{"widths": []}, {"widths": [8, 0]}, {"n_types": -1}, {"depth": 3}])
def test_invalid_network_config_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="network config"):
        NetConfig.from_dict(bad)
