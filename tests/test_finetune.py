"""Fine-tuning core: export, augmentation preview, pseudo-labels, finetune, compare, registry."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
import torch

from conftest import disk_labels
from napari_medinst import finetune as ft
from napari_medinst._io import InputError
from napari_medinst.model import registry
from napari_medinst.model.augment import AugmentConfig
from napari_medinst.model.folder import ModelError, load_model, save_model_folder
from napari_medinst.model.inference import CancelledError
from napari_medinst.model.network import NetConfig, NucleusNet
from napari_medinst.postprocess import PostprocessParams
from napari_medinst.targets import make_targets

TINY = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "crop": 64, "device": "cpu"}


@pytest.fixture
def base(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_model_folder(
        tmp_path / "base",
        NucleusNet(NetConfig(widths=(8, 16, 16))),
        extra_config={"name": "tiny base"},
        postprocess={"he": PostprocessParams(fg_threshold=0.42)},
    )


def blob_image(seed: int, shape=(96, 96), n=6, radius=7):
    rng = np.random.default_rng(seed)
    centres = [tuple(rng.integers(radius + 2, min(shape) - radius - 2, 2)) for _ in range(n)]
    lab = disk_labels(shape, centres, radius)
    img = np.where(lab > 0, 200, 20).astype(np.uint8) + rng.integers(0, 20, shape).astype(np.uint8)
    return img, lab


@pytest.fixture
def user_set(tmp_path) -> Path:
    folder = tmp_path / "set"
    for k in range(2):
        img, lab = blob_image(k)
        ft.export_ground_truth(folder, img, lab, name=f"img{k}", pixel_size=0.5)
    return folder


# ------------------------------------------------------------------------ export


def test_export_never_overwrites_and_guards(tmp_path):
    img, lab = blob_image(1)
    a = ft.export_ground_truth(tmp_path / "s", img, lab, name="slide", pixel_size=0.5)
    b = ft.export_ground_truth(tmp_path / "s", img, lab, name="slide", pixel_size=0.5)
    assert (a.sample_id, b.sample_id) == ("slide", "slide-2")
    assert tifffile.imread(a.labels_path).max() == lab.max()
    status = {int(i): "edited" for i in np.unique(lab) if i}
    with pytest.raises(InputError, match="no review status"):
        ft.export_ground_truth(tmp_path / "s", img, lab, name="v", verified_only=True)
    with pytest.raises(InputError, match="verified yet"):
        ft.export_ground_truth(
            tmp_path / "s", img, lab, name="v", status=status, verified_only=True
        )
    status[2] = "verified"
    res = ft.export_ground_truth(
        tmp_path / "s", img, lab, name="v", status=status, verified_only=True
    )
    assert res.n_nuclei == 1
    with pytest.raises(InputError, match="empty"):
        ft.export_ground_truth(tmp_path / "s", img, np.zeros_like(lab), name="e")
    with pytest.raises(InputError, match="same size"):
        ft.export_ground_truth(tmp_path / "s", img, lab[:90], name="m")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(InputError, match=r"cannot write|is a file"):
        ft.export_ground_truth(tmp_path / "a-file" / "sub", img, lab, name="w")
    assert len(list((tmp_path / "s" / "images").iterdir())) == 3


# ------------------------------------------------------------------ augmentation


@pytest.mark.parametrize("modality", ["he", "fluorescence"])
def test_augmentation_preview_targets_are_recomputed(modality):
    lab = disk_labels((128, 128), ((30, 30), (30, 90), (90, 40), (95, 95)), 9)
    if modality == "he":
        img = np.where(lab[..., None] > 0, [90, 40, 140], [230, 200, 220]).astype(np.uint8)
    else:
        img = np.where(lab > 0, 180, 15).astype(np.uint8)
    cfg = AugmentConfig(copy_paste_max=6, copy_paste_max_overlap=0.0, blur_prob=0, noise_prob=0)
    image, labels, targets = ft.augmentation_preview(img, lab, modality, cfg, seed=3)
    assert image.shape == ((128, 128, 3) if modality == "he" else (128, 128))
    assert labels.max() > lab.max()  # nuclei were pasted
    fresh = make_targets(labels)
    np.testing.assert_array_equal(targets.hv, fresh.hv)
    np.testing.assert_array_equal(targets.foreground, fresh.foreground)
    np.testing.assert_array_equal(targets.contour, fresh.contour)
    again = ft.augmentation_preview(img, lab, modality, cfg, seed=3)
    np.testing.assert_array_equal(again.labels, labels)  # reproducible from the seed
    none = ft.augmentation_preview(img, lab, modality, AugmentConfig(copy_paste_max=0), seed=3)
    np.testing.assert_array_equal(none.labels > 0, lab > 0)
    with pytest.raises(InputError, match="empty"):
        ft.augmentation_preview(img, np.zeros_like(lab), modality)
    with pytest.raises(InputError, match="same size"):
        ft.augmentation_preview(img, lab[:100], modality)


# ------------------------------------------------------------------ pseudo-labels


def test_pseudo_labels_respect_min_score_and_exclusion(tmp_path, monkeypatch):
    lab = disk_labels((96, 96), ((20, 20), (20, 70), (70, 20), (70, 70)), 8)
    img = np.where(lab > 0, 200, 20).astype(np.uint8)
    scores = np.array([0.95, 0.5, 0.9, 0.99], np.float32)

    def fake_segment(image, model, **kw):
        return SimpleNamespace(labels=lab.astype(np.uint32), scores=scores)

    monkeypatch.setattr(ft, "segment", fake_segment)
    monkeypatch.setattr(ft, "_as_model", lambda m, d="cpu": m)
    exclude = np.zeros(lab.shape, bool)
    exclude[70, 25] = True  # one pixel of nucleus 3
    pl = ft.pseudo_labels(img, "any", min_score=0.8, exclude_mask=exclude)
    assert (pl.n_predicted, pl.n_low_score, pl.n_excluded, pl.n_kept) == (4, 1, 1, 2)
    assert pl.labels[20, 20] > 0 and pl.labels[70, 70] > 0
    assert pl.labels[20, 70] == 0 and pl.labels[70, 20] == 0
    assert pl.ignore[20, 70] and pl.ignore[70, 20] and not pl.ignore[20, 20]
    np.testing.assert_allclose(sorted(pl.scores), [0.95, 0.99])
    res = ft.export_pseudo_labels(tmp_path / "pl", img, pl, name="unlabelled", pixel_size=0.5)
    out = tifffile.imread(res.labels_path)
    assert out.max() == 2
    exported = tifffile.imread(res.image_path)
    r0, c0 = res.region[:2]
    # the low-score and the excluded nucleus are painted as background
    assert exported[20 - r0, 70 - c0] < 100 and exported[70 - r0, 20 - c0] < 100
    assert exported[70 - r0, 70 - c0] == 200
    none = ft.pseudo_labels(img, "any", min_score=1.0)
    with pytest.raises(InputError, match="not confident"):
        ft.export_pseudo_labels(tmp_path / "pl", img, none, name="x")
    with pytest.raises(InputError, match="exclusion mask"):
        ft.pseudo_labels(img, "any", exclude_mask=exclude[:10])


# ------------------------------------------------------------------ fine-tuning


def test_finetune_records_parent_resumes_and_refuses_other_runs(user_set, base, tmp_path):
    out = tmp_path / "run"
    events = []
    aug = AugmentConfig(copy_paste_max=2)
    gen = ft.iter_finetune([user_set], base, out, **TINY, augment=aug)
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            model_dir = stop.value
            break
    kinds = {e["event"] for e in events}
    assert {"epoch", "step", "phase"} <= kinds
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1]
    model = load_model(model_dir)
    assert Path(model.config["parent"]).resolve() == base.resolve()
    assert model.config["parent_weights_sha256"] == load_model(base).config["weights_sha256"]
    assert model.config["training"]["manifest"]
    assert model.config["net"]["widths"] == [8, 16, 16]
    assert model.config["finetune"]["sets"] == [str(user_set.resolve())]
    assert model.params_for("he").fg_threshold == pytest.approx(0.42)  # kept from the parent
    assert "fluorescence" in model.postprocess  # tuned on the held-out tile
    run = ft.read_run(out)
    assert run["status"] == "finished" and run["notes"]["validation"]
    # resuming with more epochs continues the history
    ft.finetune([user_set], base, out, **{**TINY, "epochs": 2}, augment=aug)
    history = json.loads((model_dir / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    with pytest.raises(InputError, match="other training sets"):
        ft.finetune([user_set], base, out, **{**TINY, "lr": 0.1}, augment=aug)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        ft.finetune([user_set], base, tmp_path / "busy", **TINY)


def test_cancel_keeps_a_loadable_model(user_set, base, tmp_path):
    out = tmp_path / "run"
    epochs = []
    with pytest.raises(CancelledError):
        ft.finetune(
            [user_set],
            base,
            out,
            **{**TINY, "epochs": 3},
            on_epoch=epochs.append,
            should_stop=lambda: bool(epochs),  # cancel during the second epoch
        )
    assert [e["epoch"] for e in epochs] == [1]
    model = load_model(out / "model")
    assert model.params_for("he").fg_threshold == pytest.approx(0.42)
    assert ft.read_run(out)["status"] == "cancelled"
    assert (out / "checkpoint.pt").exists()
    with pytest.raises(CancelledError):  # cancelled before the first step: nothing lost
        ft.finetune([user_set], base, out, **{**TINY, "epochs": 3}, should_stop=lambda: True)
    assert load_model(out / "model").net is not None


def test_finetune_bad_inputs(user_set, base, tmp_path):
    with pytest.raises(InputError, match="at least one"):
        ft.finetune([], base, tmp_path / "o", **TINY)
    with pytest.raises(InputError, match="not found"):
        ft.finetune([tmp_path / "missing"], base, tmp_path / "o", **TINY)
    with pytest.raises(InputError, match="crop"):
        ft.finetune([user_set], base, tmp_path / "o", **{**TINY, "crop": 50})
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in base.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "weights.pt").write_bytes(b"not weights")
    with pytest.raises(ModelError, match="checksum"):
        ft.finetune([user_set], corrupt, tmp_path / "o", **TINY)
    empty = tmp_path / "empty-set"
    (empty / "images").mkdir(parents=True)
    (empty / "labels").mkdir()
    with pytest.raises(InputError, match="no usable"):
        ft.finetune([empty], base, tmp_path / "o2", **TINY)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"is a file|not empty"):
        ft.finetune([user_set], base, tmp_path / "file", **TINY)


def test_disk_full_while_saving_leaves_no_half_model(user_set, base, tmp_path, monkeypatch):
    real_save = torch.save

    def failing(obj, f, *a, **kw):
        if Path(str(f)).name == "weights.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing)
    out = tmp_path / "run"
    with pytest.raises(InputError, match="No space left"):
        ft.finetune([user_set], base, out, **TINY)
    assert not (out / "model").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".model")]
    assert registry.registered_models() == []


def test_small_sets_are_tiled_and_mixing_repeats_them(tmp_path):
    img, lab = blob_image(0, shape=(200, 200), n=12)
    ft.export_ground_truth(tmp_path / "mine", img, lab, name="one", pixel_size=0.5)
    big_img, big_lab = blob_image(1, shape=(400, 400), n=40)
    ft.export_ground_truth(tmp_path / "bundled", big_img, big_lab, name="b", pixel_size=0.5)
    specs, notes = ft._stage(
        tmp_path / "out", [str(tmp_path / "mine")], [str(tmp_path / "bundled")], 0.5, 0.15
    )
    assert notes["pieces"] == 4 and len(notes["validation"]) == 1  # 200 px: 2 x 2 tiles
    repeats = [s for s in specs if "repeat" in s]
    assert len(repeats) == 3 and notes["repeats"]["fluorescence"] >= 1
    assert 0.3 < notes["share"]["fluorescence"] < 0.7
    mosaic = tifffile.imread(next((Path(repeats[0]) / "labels").iterdir()))
    assert mosaic.size > 100 * 100


def test_finetune_mixes_bundled_data(user_set, base, tmp_path):
    big_img, big_lab = blob_image(1, shape=(300, 300), n=30)
    ft.export_ground_truth(tmp_path / "bundled", big_img, big_lab, name="b", pixel_size=0.5)
    model_dir = ft.finetune(
        [user_set], base, tmp_path / "run", **TINY, include_bundled_data=[tmp_path / "bundled"]
    )
    training = load_model(model_dir).config["training"]
    assert str(tmp_path / "bundled") in training["config"]["data"]
    names = {m["name"].split("/")[0] for m in training["manifest"]}
    assert "bundled" in names and any(n.startswith("repeat-") for n in names)


def test_bundled_training_data_is_found_by_folder_name(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for name in ("dsb2018_stage1_test",):
        (data / name / "images").mkdir(parents=True)
        (data / name / "labels").mkdir()
    monkeypatch.setenv(ft.DATA_ENV_VAR, str(data))
    monkeypatch.chdir(tmp_path)
    found = ft.bundled_training_data("default")
    assert str((data / "dsb2018_stage1_test").resolve()) in found
    assert ft.bundled_training_data(tmp_path / "no-model") == []


def test_compare_models_scores_each(base):
    img, lab = blob_image(3)
    scores = ft.compare_models({"parent": base, "again": base}, img, lab, pixel_size=0.5)
    assert list(scores) == ["parent", "again"]
    assert scores["parent"].aji == pytest.approx(scores["again"].aji)
    table = ft.summarise_scores(scores)
    assert table["parent"]["nuclei in ground truth"] == lab.max()
    with pytest.raises(InputError, match="empty"):
        ft.compare_models([base], img, np.zeros_like(lab))


def test_registry(tmp_path, base, user_models):
    calls = []
    registry.add_listener(lambda: calls.append(1))
    try:
        path = registry.register_model(base)
        assert registry.registered_models() == [str(base.resolve())] == [path]
        assert registry.is_registered(base) and calls
        registry.register_model(base)  # no duplicate
        assert len(registry.registered_models()) == 1
        assert registry.unregister_model(base) and registry.registered_models() == []
        assert not registry.unregister_model(base)
        with pytest.raises(FileNotFoundError):
            registry.register_model(tmp_path)
        dropped = save_model_folder(
            user_models / "dropped-in", NucleusNet(NetConfig(widths=(8, 16, 16)))
        )
        assert registry.registered_models() == [str(dropped.resolve())]
    finally:
        registry._LISTENERS.clear()


def test_a_set_too_small_to_validate_warns_and_still_trains(base, tmp_path):
    img, lab = blob_image(2, shape=(40, 40), n=2, radius=5)
    ft.export_ground_truth(tmp_path / "tiny-set", img, lab, name="t", pixel_size=0.5)
    events = []
    model_dir = ft.finetune(
        [tmp_path / "tiny-set"], base, tmp_path / "run", **TINY, on_progress=events.append
    )
    warnings = [e["text"] for e in events if e["event"] == "warning"]
    assert warnings and "validation" in warnings[0]
    assert load_model(model_dir).params_for("he").fg_threshold == pytest.approx(0.42)


def _index_set(root: Path, rows: list[dict[str, str]], bom: bool = False) -> Path:
    """A data folder whose index.csv has the given modality / pixel_size per image."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    lab = disk_labels((64, 64), [(20, 20), (40, 44)], 8)
    for k, row in enumerate(rows):
        nucleus, stroma = np.array([90, 60, 150], np.uint8), np.array([235, 180, 215], np.uint8)
        rgb = np.where(lab[..., None] > 0, nucleus, stroma)  # H&E-like colours
        grey = np.where(lab > 0, 200, 20).astype(np.uint8)  # bright nuclei on dark
        row["channels"] = "3" if row.pop("rgb") else "1"
        tifffile.imwrite(root / "images" / f"i{k}.tif", rgb if row["channels"] == "3" else grey)
        tifffile.imwrite(root / "labels" / f"i{k}.tif", lab.astype(np.uint16))
    fields = ["id", "height", "width", "channels", "modality", "pixel_size"]
    lines = [",".join(fields)]
    for k, row in enumerate(rows):
        lines.append(f"i{k},64,64,{row['channels']},{row['modality']},{row['pixel_size']}")
    (root / "index.csv").write_text(
        "\n".join(lines) + "\n", encoding="utf-8-sig" if bom else "utf-8"
    )
    return root


def test_training_and_finetuning_read_an_index_the_same_way(tmp_path):
    from napari_medinst.model.data import index_modality, load_folder
    from napari_medinst.preprocess import CANONICAL_PIXEL_SIZE

    assert index_modality({"modality": " H&E "}) == "he"
    assert index_modality({"modality": "histology-stain"}) == "he"
    assert index_modality({"modality": "Fluorescence"}) == "fluorescence"
    assert index_modality({"modality": "dapi"}) is None  # unknown: the image decides
    assert index_modality({}) is None
    rows = [
        {"rgb": True, "modality": "he", "pixel_size": "0.5"},
        {"rgb": False, "modality": "dapi", "pixel_size": "NA"},  # grey: fluorescence
        {"rgb": True, "modality": "", "pixel_size": "0.5"},  # RGB: H&E
        {"rgb": False, "modality": "fluorescence", "pixel_size": "0.5"},
    ]
    folder = _index_set(tmp_path / "set", rows, bom=True)  # as a spreadsheet saves it
    want = ["he", "fluorescence", "he", "fluorescence"]
    assert [s.modality for s in load_folder(folder)] == want
    assert [item[4] for item in ft._read_set(folder)] == want
    s = 0.5 / CANONICAL_PIXEL_SIZE  # rows 0, 2, 3 at 0.5 µm/px, row 1 at the canonical size
    areas = ft._bundled_areas([str(folder)])
    assert areas == pytest.approx(
        {"he": 2 * 64 * 64 * s * s, "fluorescence": 64 * 64 * (1 + s * s)}
    )

    bad = _index_set(tmp_path / "bad", [{"rgb": True, "modality": "he", "pixel_size": "40x"}])
    for read in (load_folder, ft._read_set, lambda f: ft._bundled_areas([str(f)])):
        with pytest.raises(InputError, match="pixel_size '40x' is not a size"):
            read(bad)
