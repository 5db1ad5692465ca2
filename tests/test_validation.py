"""Every user-supplied number, model folder and training set is checked up front.

Pixel sizes, post-processing parameters, a model folder's ``config.json`` and weights,
``index.csv`` files, training sets and training checkpoints: bad ones are refused with
one line naming the argument or file, before any work, and never with a traceback.
"""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from conftest import disk_labels
from napari_medinst._io import InputError
from napari_medinst.cli import main
from napari_medinst.export import export_sample
from napari_medinst.model.data import find_pairs, load_folder, parse_folder_spec, read_index
from napari_medinst.model.folder import ModelError, load_model, save_model_folder
from napari_medinst.model.network import MAX_PARAMETERS, NetConfig, NucleusNet
from napari_medinst.model.train import TrainConfig, train
from napari_medinst.postprocess import Postprocessor, PostprocessParams
from napari_medinst.preprocess import PixelSizeWarning, check_pixel_size
from napari_medinst.segment import segment

TINY = NetConfig(widths=(8, 16, 16))
BAD_PIXEL_SIZES = ["nan", "inf", "-inf", "1e-9", "0", "-0.5", "0.04", "5.5", "1e9"]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def blank_image(tmp_path):
    path = tmp_path / "blank.tif"
    tifffile.imwrite(path, np.full((64, 64), 10, np.uint8))
    return path


def make_set(folder, n=3, empty=False):
    rng = np.random.default_rng(0)
    for k in range(n):
        centres = [tuple(rng.integers(12, 84, 2)) for _ in range(6)]
        lab = disk_labels((96, 96), centres, 7)
        img = (np.where(lab > 0, 200, 20) + rng.integers(0, 20, lab.shape)).astype(np.uint8)
        if empty:  # export_sample refuses empty labels: write the pair directly
            for sub, arr in (("images", img), ("labels", np.zeros_like(lab))):
                (folder / sub).mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(folder / sub / f"img{k}.tif", arr)
        else:
            export_sample(folder, img, lab, name=f"img{k}", modality="fluorescence", pixel_size=0.5)
    return folder


def tiny_config(data, out):
    return TrainConfig(
        data=[str(data)],
        out=str(out),
        epochs=1,
        steps_per_epoch=1,
        batch_size=1,
        crop=64,
        warmup_steps=1,
        val_fraction=0.34,
        net=TINY,
        device="cpu",
    )


# --- pixel sizes --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [*BAD_PIXEL_SIZES, "abc", True])
def test_check_pixel_size_refuses_implausible_values(value):
    with pytest.raises(InputError, match="--pixel-size: pixel size"):
        check_pixel_size(value, "--pixel-size")


def test_check_pixel_size_warns_outside_the_typical_band():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_pixel_size("0.25", "x") == 0.25  # typical: silent
    for value in (0.06, 3.0):
        with pytest.warns(PixelSizeWarning, match="results may be empty"):
            assert check_pixel_size(value, "x") == value


@pytest.mark.parametrize("px", [*BAD_PIXEL_SIZES, "", "abc"])
def test_data_at_pixel_size_is_validated_at_parse_time(px):
    spec = f"some/folder@{px}"
    with pytest.raises(InputError, match=f"^{spec}: pixel size"):
        parse_folder_spec(spec)


def test_data_at_pixel_size_good_values():
    assert parse_folder_spec("a@b/set@0.25") == (Path("a@b/set"), 0.25)
    assert parse_folder_spec("set")[1] is None


@pytest.mark.parametrize("px", ["nan", "inf", "1e-9"])
def test_cli_train_refuses_a_bad_data_pixel_size_before_training(tmp_path, capsys, px):
    data = make_set(tmp_path / "set")
    out = tmp_path / "run"
    rc = main(["train", f"{data}@{px}", "--out", str(out), "--epochs", "1", "--device", "cpu"])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and f"{data}@{px}" in line and "pixel size" in line
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("px", ["nan", "inf", "1e-9", "0.01", "40"])
def test_cli_segment_refuses_a_bad_pixel_size(tmp_path, capsys, blank_image, px):
    out = tmp_path / "out"
    argv = ["segment", str(blank_image), "-o", str(out), "--model", "classical"]
    rc = main([*argv, "--pixel-size", px])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and "--pixel-size" in line and "0.05-5" in line
    assert not out.exists() or not any(out.iterdir())


def test_segment_api_refuses_and_warns(tmp_path):
    img = np.full((64, 64), 10, np.uint8)
    with pytest.raises(InputError, match="pixel_size: pixel size nan"):
        segment(img, "classical", pixel_size=math.nan)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seg = segment(img, "classical", pixel_size=0.06, modality="fluorescence")
    assert seg.result.n_instances == 0
    messages = [str(w.message) for w in caught if w.category is PixelSizeWarning]
    assert any("far from the typical" in m for m in messages)
    assert any(m.startswith("no nuclei found at the given pixel size 0.06") for m in messages)


def test_cli_warns_when_an_unusual_pixel_size_finds_nothing(tmp_path, capsys, blank_image):
    out = tmp_path / "out"
    argv = ["segment", str(blank_image), "-o", str(out), "--model", "classical"]
    assert main([*argv, "--pixel-size", "0.06"]) == 0
    captured = capsys.readouterr()
    assert "0 nuclei" in captured.out
    lines = captured.err.strip().splitlines()
    assert lines and all(line.startswith(f"{blank_image}: warning: ") for line in lines)
    assert any("no nuclei found" in line for line in lines)
    assert (out / "blank_instances.tif").exists()


# --- post-processing parameters -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ('{"min_nucleus_size": Infinity}', "Infinity"),
        ('{"smoothing": NaN}', "NaN"),
        ('{"fg_threshold": -Infinity}', "-Infinity"),
    ],
)
def test_params_json_non_numbers_are_refused(text, name):
    with pytest.raises(ValueError, match=f"{name} is not a number JSON allows"):
        PostprocessParams.from_json(text)


@pytest.mark.parametrize(
    "data",
    [
        {"min_nucleus_size": math.inf},
        {"min_marker_size": -math.inf},
        {"smoothing": math.nan},
        {"min_nucleus_size": 10**400},
        {"sobel_size": 10**9 + 1},
        {"pixel_size": math.inf},
    ],
)
def test_params_non_finite_or_huge_values_are_value_errors(data):
    (key,) = data
    with pytest.raises(ValueError, match=f"parameter {key}") as info:
        PostprocessParams.from_dict(data)
    assert len(str(info.value)) < 120  # a 400-digit number is not pasted into the message
    with pytest.raises(ValueError, match=f"parameter {key}"):
        PostprocessParams(**data)


def test_scaling_never_fails_on_a_value_the_user_set():
    p = PostprocessParams(smoothing=200.0, marker_opening=200, sobel_size=63)
    q = p.scaled_to(0.45)  # 200 * 0.5 / 0.45 = 222.2: clipped to the range
    assert q.smoothing == 200.0 and q.marker_opening == 200 and q.sobel_size == 63
    assert q.pixel_size == 0.45
    big = PostprocessParams(min_nucleus_size=9_000_000).scaled_to(0.05)
    assert big.min_nucleus_size == 10_000_000
    # lengths still scale inside the range
    assert PostprocessParams(smoothing=2.0).scaled_to(0.25).smoothing == pytest.approx(4.0)
    with pytest.raises(ValueError, match="pixel size"):
        p.scaled_to(math.nan)
    prob = np.zeros((32, 32), np.float32)
    res = Postprocessor(prob, np.zeros((2, 32, 32), np.float32), pixel_size=0.45).run(p)
    assert res.n_instances == 0 and res.params is p


def test_cli_smoothing_200_runs(tmp_path, blank_image):
    params = tmp_path / "p.json"
    params.write_text('{"smoothing": 200}')
    out = tmp_path / "out"
    argv = ["segment", str(blank_image), "-o", str(out), "--model", "classical"]
    assert main([*argv, "--pixel-size", "0.45", "--params", str(params)]) == 0


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"min_nucleus_size": Infinity}', "Infinity is not a number"),
        ('{"min_nucleus_size": 1e400}', "finite"),
        ("folder", "is a folder"),
        (b"\xff\xfe{", "not a UTF-8 text file"),
        ('{"smoothing": 201}', "smoothing=201"),
    ],
)
def test_cli_params_errors_are_one_line(tmp_path, capsys, blank_image, content, match):
    params = tmp_path / "params.json"
    if content == "folder":
        params.mkdir()
    elif isinstance(content, bytes):
        params.write_bytes(content)
    else:
        params.write_text(content)
    out = tmp_path / "out"
    argv = ["segment", str(blank_image), "-o", str(out), "--model", "classical"]
    rc = main([*argv, "--params", str(params)])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and match in line and f"--params {params}" in line


# --- network configs and model folders ----------------------------------------------------


@pytest.mark.parametrize(
    ("net", "field"),
    [
        ({"widths": [30000, 30000]}, "widths[0]=30000"),
        ({"widths": [8] * 7}, "widths must list 2-6 levels"),
        ({"widths": [8]}, "widths must list 2-6 levels"),
        ({"widths": [8, 16.5]}, "widths[1] must be a whole number"),
        ({"widths": "8,16"}, "widths must be a list"),
        ({"in_channels": 5}, "in_channels=5"),
        ({"in_channels": True}, "in_channels must be a whole number"),
        ({"n_types": 65}, "n_types=65"),
        ({"blocks": [1, 1, 1, 9]}, "blocks[3]=9"),
        ({"blocks": [1, 1]}, "blocks must have one entry per level"),
        ({"widths": [1024] * 6, "blocks": [8] * 5}, "M parameters"),
    ],
)
def test_network_config_bounds(net, field):
    with pytest.raises(ValueError, match="invalid network config") as info:
        NetConfig.from_dict(net)
    assert field in str(info.value)


@pytest.mark.parametrize(
    "cfg",
    [
        NetConfig(),
        TINY,
        NetConfig(in_channels=1, widths=(5, 7, 9, 11, 13, 17), blocks=(1, 2, 3, 4, 5), n_types=6),
        NetConfig(widths=(32, 64), n_types=1),
        NetConfig(widths=(8, 16, 24, 32), n_types=5, type_context=12),
        NetConfig(widths=(8, 16), n_types=3, type_context=4),  # branch on the coarsest level
        NetConfig(widths=(8, 16), type_context=4),  # no classes: no branch
    ],
)
def test_parameter_count_is_exact_without_building(cfg):
    assert cfg.n_parameters() == sum(p.numel() for p in NucleusNet(cfg).parameters())


def test_a_large_but_sane_network_is_allowed():
    big = NetConfig(widths=(32, 64, 128, 256, 512), blocks=(2, 2, 2, 2))  # a classic U-Net
    assert 10_000_000 < big.n_parameters() <= MAX_PARAMETERS


def _model_with_net(tmp_path, net: dict):
    folder = save_model_folder(tmp_path / "m", NucleusNet(TINY))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["net"] = net
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_model_config_asking_for_32_gb_is_refused(tmp_path, capsys, blank_image):
    folder = _model_with_net(tmp_path, {"widths": [30000, 30000]})
    with pytest.raises(ModelError, match=r"config\.json: invalid network config .*widths"):
        load_model(folder)
    rc = main(["segment", str(blank_image), "-o", str(tmp_path / "o"), "--model", str(folder)])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and "config.json" in line and "widths[0]=30000" in line


def test_wrong_architecture_weights_are_one_line(tmp_path, capsys, blank_image):
    folder = _model_with_net(tmp_path, {"widths": [16, 16, 16]})
    with pytest.raises(ModelError) as info:
        load_model(folder)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400
    assert "weights.pt: weights do not fit the configured network" in msg
    assert "0 missing, 0 unexpected," in msg and "shape mismatches" in msg
    assert "first: stem.0.0.weight expects (16,3,3,3), file has (8,3,3,3)" in msg
    folder = _model_with_net(tmp_path, {"widths": [8, 16, 16, 16]})  # one more level
    with pytest.raises(ModelError, match=r"\d+ missing, 0 unexpected, \d+ shape mismatches"):
        load_model(folder)
    rc = main(["segment", str(blank_image), "-o", str(tmp_path / "o"), "--model", str(folder)])
    assert rc == 2 and "do not fit" in one_line(capsys.readouterr().err)


def test_weights_that_are_not_a_state_dict(tmp_path):
    folder = save_model_folder(tmp_path / "m", NucleusNet(TINY))
    torch.save([1, 2, 3], folder / "weights.pt")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("weights_sha256")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="not a state dict of named tensors"):
        load_model(folder)


# --- index.csv and data folders -----------------------------------------------------------


def test_latin1_index_names_the_file_and_line(tmp_path):
    folder = make_set(tmp_path / "set")
    (folder / "index.csv").write_bytes(
        "id,modality\nimg0,fluorescence\nimg1,caf\xe9\n".encode("latin-1")
    )
    with pytest.raises(InputError, match=r"index\.csv: not UTF-8 text \(byte 38, line 3\)"):
        read_index(folder)


def test_index_with_bom_is_read(tmp_path):
    (tmp_path / "index.csv").write_bytes("id,modality\nimg0,he\n".encode("utf-8-sig"))
    assert read_index(tmp_path)["img0"]["modality"] == "he"


def test_duplicate_ids_in_index_are_refused(tmp_path, capsys):
    folder = make_set(tmp_path / "set")
    rows = "id,pixel_size,modality\nimg0,0.5,he\nimg1,0.5,he\nimg0,0.25,fluorescence\n"
    (folder / "index.csv").write_text(rows)
    with pytest.raises(InputError, match=r"index\.csv: id 'img0' appears twice \(lines 2 and 4\)"):
        load_folder(folder)
    rc = main(["train", str(folder), "--out", str(tmp_path / "run"), "--device", "cpu"])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and "index.csv" in line and "'img0'" in line


def test_index_that_is_a_folder_or_has_no_id_column(tmp_path):
    (tmp_path / "index.csv").mkdir()
    with pytest.raises(InputError, match=r"index\.csv: is not a file"):
        read_index(tmp_path)
    other = tmp_path / "o"
    other.mkdir()
    (other / "index.csv").write_text("name,modality\na,he\n")
    with pytest.raises(InputError, match="needs an 'id' column"):
        read_index(other)


def test_two_images_with_one_stem_are_refused(tmp_path):
    folder = make_set(tmp_path / "set", n=1)
    tifffile.imwrite(folder / "images" / "img0.png.tif", np.zeros((8, 8), np.uint8))
    (folder / "images" / "img0.png").write_bytes((folder / "images" / "img0.tif").read_bytes())
    with pytest.raises(InputError, match=r"img0\.tif: same name as img0\.png"):
        find_pairs(folder)


# --- training -----------------------------------------------------------------------------


def test_all_empty_labels_are_nothing_to_learn(tmp_path, capsys):
    folder = make_set(tmp_path / "empty", empty=True)
    out = tmp_path / "run"
    with pytest.raises(InputError, match=r"every label image is empty .*nothing to learn"):
        train(tiny_config(folder, out), verbose=False)
    assert not (out / "model").exists() and not (out / "checkpoint.pt").exists()
    rc = main(["train", str(folder), "--out", str(tmp_path / "run2"), "--device", "cpu"])
    assert rc == 2 and "nothing to learn" in one_line(capsys.readouterr().err)


class _Payload:
    """A pickle that creates a file when it is loaded by an unsafe unpickler."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["malicious", "corrupt", "foreign"])
def test_bad_checkpoint_is_one_line_and_never_executed(tmp_path, capsys, kind):
    data = make_set(tmp_path / "set")
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "pwned"
    ckpt = out / "checkpoint.pt"
    if kind == "malicious":
        torch.save({"model": _Payload(marker)}, ckpt)
    elif kind == "corrupt":
        ckpt.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    else:
        torch.save({"weights": torch.zeros(3)}, ckpt)
    with pytest.raises(ModelError, match=r"checkpoint\.pt: not a (readable|napari-medinst)"):
        train(tiny_config(data, out), verbose=False)
    assert not marker.exists()
    rc = main(["train", str(data), "--out", str(out), "--device", "cpu", "--widths", "8", "16"])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and str(ckpt) in line
    assert not marker.exists() and not (out / "model").exists()


def test_checkpoint_of_another_shape_is_one_line(tmp_path):
    data = make_set(tmp_path / "set")
    out = tmp_path / "run"
    cfg = tiny_config(data, out)
    train(cfg, verbose=False)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    ck["model"]["stem.0.0.weight"] = torch.zeros(9, 3, 3, 3)
    torch.save(ck, out / "checkpoint.pt")
    cfg.epochs = 2
    with pytest.raises(ModelError, match=r"checkpoint\.pt: weights do not fit .*first: stem"):
        train(cfg, verbose=False)


def test_deeply_nested_json_is_a_one_line_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ValueError, match="nested too deeply"):
        PostprocessParams.from_json(deep)
    folder = save_model_folder(tmp_path / "m", NucleusNet(TINY))
    (folder / "config.json").write_text(deep)
    with pytest.raises(ModelError, match=r"config\.json: not valid JSON \(nested too deeply\)"):
        load_model(folder)
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    with pytest.raises(ModelError, match=r"config\.json: cannot be read"):
        load_model(folder)


def test_five_d_image_error_names_the_file(tmp_path, capsys, blank_image):
    five = tmp_path / "five.tif"
    tifffile.imwrite(five, np.zeros((2, 2, 2, 2, 16, 16), np.uint8))
    out = tmp_path / "out"
    rc = main(["segment", str(blank_image), str(five), "-o", str(out), "--model", "classical"])
    line = one_line(capsys.readouterr().err)
    assert rc == 2 and f"error: {five}: " in line
    assert not out.exists() or not any(out.iterdir())  # refused before the first image ran


def test_nan_training_image_names_the_file(tmp_path):
    folder = make_set(tmp_path / "set", n=2)
    tifffile.imwrite(folder / "images" / "img1.tif", np.full((96, 96), np.nan, np.float32))
    with pytest.raises(InputError, match=r"img1\.tif: image contains NaN"):
        load_folder(folder)


@pytest.mark.parametrize(
    ("field", "value"),
    [("lr", math.inf), ("lr", math.nan), ("weight_decay", math.inf), ("batch_size", 10**6)],
)
def test_training_numbers_are_bounded(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"training setting {field} must be"):
        TrainConfig(data=["x"], out=str(tmp_path), **{field: value})
