import json

import numpy as np
import pytest

from conftest import disk_labels
from napari_medinst.cli import main
from napari_medinst.export import export_sample
from napari_medinst.model.folder import load_model
from napari_medinst.model.inference import CancelledError
from napari_medinst.model.network import NetConfig
from napari_medinst.model.train import TrainConfig, retune, train


@pytest.fixture
def tiny_set(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "set"
    for k in range(3):
        centres = [tuple(rng.integers(12, 84, 2)) for _ in range(6)]
        lab = disk_labels((96, 96), centres, 7)
        img = np.where(lab > 0, 200, 20).astype(np.uint8) + rng.integers(0, 20, lab.shape).astype(
            np.uint8
        )
        export_sample(folder, img, lab, name=f"img{k}", modality="fluorescence", pixel_size=0.5)
    return folder


def tiny_config(data, out, epochs):
    return TrainConfig(
        data=[str(data)],
        out=str(out),
        epochs=epochs,
        steps_per_epoch=2,
        batch_size=2,
        crop=64,
        warmup_steps=1,
        val_fraction=0.34,
        net=NetConfig(widths=(8, 16, 16)),
        device="cpu",
    )


def test_train_resume_and_model_folder(tiny_set, tmp_path):
    out = tmp_path / "run"
    model_dir = train(tiny_config(tiny_set, out, 1), verbose=False)
    ck1 = (out / "checkpoint.pt").stat().st_mtime_ns
    model = load_model(model_dir)
    assert model.config["training"]["manifest"][0]["sha256"]
    assert set(model.postprocess) == {"fluorescence"}
    train(tiny_config(tiny_set, out, 2), verbose=False)  # resumes at epoch 1
    history = json.loads((model_dir / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert (out / "checkpoint.pt").stat().st_mtime_ns != ck1
    assert json.loads((out / "train_config.json").read_text())["epochs"] == 2
    # the post-processing defaults can be re-tuned later without retraining
    weights = (model_dir / "weights.pt").read_bytes()
    scores = retune(out, device="cpu")
    assert set(scores) == {"fluorescence"} and set(scores["fluorescence"]) >= {"aji", "pq"}
    assert (model_dir / "weights.pt").read_bytes() == weights
    assert load_model(model_dir).metrics["history"] == history
    # ... but only on the images the run held out
    val = next(
        m for m in load_model(model_dir).config["training"]["manifest"] if m["split"] == "val"
    )
    label_file = next((tiny_set / "labels").glob(val["name"].split("/")[1] + ".*"))
    label_file.write_bytes(
        next(p for p in (tiny_set / "labels").iterdir() if p != label_file).read_bytes()
    )
    with pytest.raises(ValueError, match="validation images found now differ"):
        retune(out, device="cpu")


def test_cancel_keeps_a_loadable_checkpoint(tiny_set, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_set, out, 1), verbose=False)
    calls = iter(range(100))
    with pytest.raises(CancelledError):
        train(tiny_config(tiny_set, out, 3), verbose=False, should_stop=lambda: next(calls) > 0)
    assert load_model(out / "model").net is not None


def test_train_cli_reports_bad_data(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "images/" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "name"),
    [
        ("--he-fraction", "1.5", "he_fraction"),
        ("--epochs", "0", "epochs"),
        ("--lr", "-1", "lr"),
        ("--type-balance", "2", "type_balance"),
        ("--blocks", "1", "network config"),
    ],
)
def test_train_cli_rejects_bad_settings(tiny_set, tmp_path, capsys, flag, value, name):
    args = ["train", str(tiny_set), "--out", str(tmp_path / "o"), flag, value]
    assert main(args) == 2
    assert name in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_out_folder_is_never_clobbered_and_runs_are_not_mixed(tiny_set, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        train(tiny_config(tiny_set, busy, 1), verbose=False)
    out = tmp_path / "run"
    train(tiny_config(tiny_set, out, 1), verbose=False)
    other = tiny_config(tiny_set, out, 2)
    other.seed = 7  # a different run in the same folder
    with pytest.raises(ValueError, match="other data or another network"):
        train(other, verbose=False)


def test_postprocessing_is_tuned_at_the_images_own_pixels(tmp_path):
    """Samples are stored at the working scale; tuning scores them as users see them:
    maps resized back to the image, labels as annotated, sizes at its pixel size."""
    from napari_medinst.model.data import load_folder
    from napari_medinst.model.inference import Maps
    from napari_medinst.model.train import _native_postprocessors, tune_postprocess
    from napari_medinst.targets import make_targets

    for k in range(2):
        centres = [(24 + k, 24), (24, 70), (70, 26), (68 - k, 70), (47, 47)]
        lab = disk_labels((96, 96), centres, 11)
        img = np.where(lab > 0, 200, 20).astype(np.uint8)
        export_sample(
            tmp_path / "fine", img, lab, name=f"i{k}", modality="fluorescence", pixel_size=0.25
        )
    samples = load_folder(tmp_path / "fine")  # 0.25 µm/px: stored at half size
    assert samples[0].labels.shape == (48, 48)
    maps = []
    for s in samples:
        t = make_targets(s.labels)
        maps.append(Maps(t.foreground.astype(np.float32), t.hv, t.contour.astype(np.float32)))
    posts = _native_postprocessors(maps, samples)
    assert all(labels.shape == (96, 96) and pp.pixel_size == 0.25 for pp, labels in posts)
    _params, scores = tune_postprocess(maps, samples)
    assert set(scores) == {"aji", "pq", "objective"}
    assert scores["aji"] > 0.8 and scores["pq"] > 0.7
    assert scores["objective"] == pytest.approx(0.5 * (scores["aji"] + scores["pq"]))


def test_train_cli_type_head_only_needs_a_typed_model(tiny_set, tmp_path, capsys):
    args = ["train", str(tiny_set), "--out", str(tmp_path / "o"), "--type-head-only"]
    assert main(args) == 2
    assert "--init" in capsys.readouterr().err
    assert main([*args, "--init", "default"]) == 2  # untyped data: nothing to learn from
    assert "no image has nucleus types" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
