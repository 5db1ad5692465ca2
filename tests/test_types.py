"""Nucleus types: typed data folders, patch mosaics, the type loss, type metrics, evaluate."""

import csv
import json

import numpy as np
import pytest
import tifffile
import torch

from conftest import disk_labels
from napari_medinst._io import InputError
from napari_medinst.class_metrics import class_counts, type_scores, type_table
from napari_medinst.cli import main
from napari_medinst.metrics import evaluate, evaluate_dataset, overlap_table
from napari_medinst.model.augment import copy_paste
from napari_medinst.model.data import Sample, load_folder
from napari_medinst.model.folder import ModelError, load_model
from napari_medinst.model.losses import hovernet_loss
from napari_medinst.model.network import NetConfig, NucleusNet
from napari_medinst.model.train import TrainConfig, _from_init, _Sampler, split_samples, train
from napari_medinst.model.type_head import class_weights


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, arr)


def _patched_folder(root, tiles=2, size=96, patch=56):
    """Tiles cut into four overlapping patches the way HoVer-Net's extractor cuts
    CoNSeP (index with tile / y0 / x0, nuclei.csv with tile_label)."""
    rng = np.random.default_rng(1)
    folder = root / "patched"
    rows, nuclei, truth = [], [], {}
    for t in range(tiles):
        centres = [
            (y + int(rng.integers(-4, 5)), x + int(rng.integers(-4, 5)))
            for y in (16, 48, 80)
            for x in (16, 48, 80)
        ]
        lab = disk_labels((size, size), centres, 6)
        classes = np.zeros(lab.max() + 1, np.uint8)
        classes[1:] = rng.integers(1, 4, lab.max())
        tmap = classes[lab]
        img = np.where(lab > 0, 60, 220).astype(np.uint8)
        img = np.repeat(img[..., None], 3, axis=2)
        truth[f"tile{t}"] = (lab, classes)
        starts = [0, size - patch]
        for k, (y0, x0) in enumerate((y, x) for y in starts for x in starts):
            key = f"tile{t}_{k}"
            sub = lab[y0 : y0 + patch, x0 : x0 + patch]
            ids = np.unique(sub[sub > 0])
            local = np.zeros(lab.max() + 1, np.uint16)
            local[ids] = np.arange(1, ids.size + 1)  # patch labels are sequential
            _write(folder / "images" / f"{key}.tif", img[y0 : y0 + patch, x0 : x0 + patch])
            _write(folder / "labels" / f"{key}.tif", local[sub])
            _write(folder / "types" / f"{key}.tif", tmap[y0 : y0 + patch, x0 : x0 + patch])
            rows.append({"id": key, "tile": f"tile{t}", "y0": y0, "x0": x0})
            nuclei += [
                {"id": key, "label": int(local[i]), "tile_label": int(i)} for i in ids.tolist()
            ]
    for name, table in (("index.csv", rows), ("nuclei.csv", nuclei)):
        with open(folder / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
    return folder, truth


def test_patches_are_put_back_into_their_tiles_with_types(tmp_path):
    folder, truth = _patched_folder(tmp_path)
    samples = load_folder(f"{folder}@0.5")
    assert sorted(s.name for s in samples) == ["patched/tile0", "patched/tile1"]
    for s in samples:
        lab, classes = truth[s.name.split("/")[1]]
        assert s.labels.shape == lab.shape == s.native[0].shape
        # every nucleus is whole again (one id, same pixels) and keeps its class
        assert s.labels.max() == lab.max()
        table = overlap_table(lab, s.labels)
        assert np.all(table.pair_iou == 1.0) and table.n_pairs == lab.max()
        for g, p in zip(table.pair_gt_index, table.pair_pred_index, strict=True):
            assert s.types[table.pred_ids[p]] == classes[table.gt_ids[g]]
    # the validation split falls by tile: a tile is either all train or all val
    train_s, val_s = split_samples(samples, 0.5)
    assert len(val_s) == 1 and len(train_s) == 1


def test_types_survive_rescaling_to_the_working_pixel_size(tmp_path):
    folder, truth = _patched_folder(tmp_path, tiles=1)
    s = load_folder(f"{folder}@0.25")[0]  # halved
    lab, classes = truth["tile0"]
    assert s.labels.shape == (48, 48)
    # each surviving nucleus has the class of the original nucleus under it
    up = np.kron(s.labels, np.ones((2, 2), np.int32))
    for i in range(1, s.labels.max() + 1):
        orig = np.bincount(lab[up == i]).argmax()
        assert s.types[i] == classes[orig]


def test_label_sources_outside_the_list_are_never_validated_on():
    class S:
        def __init__(self, name, source):
            self.name, self.label_source, self.group = name, source, "g"

    samples = [S(f"a{i}", "xml") for i in range(4)] + [S(f"b{i}", "weak") for i in range(8)]
    _, val = split_samples(samples, 0.5, ["", "xml"])
    assert len(val) == 2 and all(s.label_source == "xml" for s in val)


def test_copy_paste_carries_the_donor_class():
    rng = np.random.default_rng(0)
    lab = disk_labels((64, 64), [(16, 16)], 5)
    donor = disk_labels((64, 64), [(40, 40)], 5)
    img = np.zeros((3, 64, 64), np.float32)
    types = (lab > 0).astype(np.uint8) * 1
    d_types = (donor > 0).astype(np.uint8) * 3
    _, new_lab, n = copy_paste(
        img, lab, img, donor, rng, n_max=1, max_overlap=0.0, types=types, donor_types=d_types
    )
    assert n == 1
    pasted = (new_lab > 0) & (lab == 0)
    assert pasted.any() and np.all(types[pasted] == 3) and np.all(types[lab > 0] == 1)


def test_images_without_types_add_no_type_loss():
    torch.manual_seed(0)
    net = NucleusNet(NetConfig(widths=(8, 16), n_types=3))
    x = torch.rand(2, 3, 32, 32)
    fg = torch.zeros(2, 32, 32, dtype=torch.long)
    fg[:, 8:20, 8:20] = 1
    hv = torch.zeros(2, 2, 32, 32)
    ct = torch.zeros(2, 32, 32)
    typed = fg * 2
    untyped = torch.full_like(fg, -1)
    out = net(x)
    _, parts = hovernet_loss(out, fg, hv, ct, types=torch.stack([typed[0], untyped[1]]))
    _, only = hovernet_loss(
        type(out)(out.np_logits[:1], out.hv[:1], out.contour_logits[:1], out.type_logits[:1]),
        fg[:1],
        hv[:1],
        ct[:1],
        types=typed[:1],
    )
    assert parts["type_ce"] == pytest.approx(only["type_ce"], rel=1e-5)
    _, none = hovernet_loss(out, fg, hv, ct, types=torch.stack([untyped[0], untyped[1]]))
    assert "type_ce" not in none


def _tiny_typed_run(tmp_path):
    """Three typed tiles and the settings of a training run over them that takes seconds."""
    folder, _ = _patched_folder(tmp_path, tiles=3)
    cfg = dict(
        data=[f"{folder}@0.5"],
        epochs=1,
        steps_per_epoch=2,
        batch_size=2,
        crop=48,
        warmup_steps=1,
        val_fraction=0.34,
        net=NetConfig(widths=(8, 16, 16)),
        device="cpu",
    )
    return folder, cfg


def test_training_adds_a_type_head_to_an_untyped_model(tmp_path):
    folder, cfg = _tiny_typed_run(tmp_path)
    first = train(TrainConfig(out=str(tmp_path / "a"), **cfg), verbose=False)
    typed = train(
        TrainConfig(out=str(tmp_path / "b"), init=str(first), type_names=["x", "y", "z"], **cfg),
        verbose=False,
    )
    config = json.loads((typed / "config.json").read_text())
    assert config["net"]["n_types"] == 4 and config["net"]["widths"] == [8, 16, 16]
    assert [t["name"] for t in config["types"]] == ["x", "y", "z"]
    # fine-tuning the typed model without naming classes keeps its head and names
    again = train(TrainConfig(out=str(tmp_path / "c"), init=str(typed), **cfg), verbose=False)
    config = json.loads((again / "config.json").read_text())
    assert config["net"]["n_types"] == 4 and [t["name"] for t in config["types"]] == ["x", "y", "z"]
    # segment writes each nucleus' class: CSV column, measurements with names, QuPath class
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, np.asarray(tifffile.imread(next((folder / "images").iterdir()))))
    out = tmp_path / "seg"
    args = ["segment", str(img), "-o", str(out), "--model", str(typed), "--pixel-size", "0.5"]
    assert main([*args, "--format", "tif,csv,measurements,geojson"]) == 0
    rows = list(csv.DictReader((out / "img_instances.csv").read_text().splitlines()))
    meas = list(csv.DictReader((out / "img_measurements.csv").read_text().splitlines()))
    feats = json.loads((out / "img.geojson").read_text())
    feats = feats["features"] if isinstance(feats, dict) else feats
    assert rows and all(r["type"] in {"1", "2", "3"} for r in rows)
    by_label = {r["label"]: r["type"] for r in rows}
    names = {"1": "x", "2": "y", "3": "z"}
    assert all(m["type_name"] == names[by_label[m["label"]]] for m in meas)
    assert sorted(f["properties"]["classification"]["name"] for f in feats) == sorted(
        names[t] for t in by_label.values()
    )
    # the sampler's batches carry classes (0 background, -1 never for typed data)
    import numpy.random as npr

    samples = load_folder(f"{folder}@0.5")
    b = _Sampler(samples, TrainConfig(out="x", **cfg), npr.default_rng(0)).batch()
    assert b["types"].min() >= 0 and set(b["types"].unique().tolist()) <= {0, 1, 2, 3}
    assert torch.equal(b["types"] > 0, b["fg"] > 0)


def test_hovernet_class_f1_and_mpq_by_hand():
    gt = np.zeros((20, 60), np.int32)
    pred = np.zeros_like(gt)
    for i in range(5):  # five gt nuclei, 8x8 px each
        gt[5:13, 2 + 12 * i : 10 + 12 * i] = i + 1
    pred[5:13, 2:10] = 1  # matches gt 1
    pred[5:13, 14:22] = 2  # matches gt 2
    pred[5:13, 26:34] = 3  # matches gt 3
    pred[0:3, 50:58] = 4  # false positive
    gt_types = {1: 1, 2: 1, 3: 2, 4: 2, 5: 1}
    pred_types = {1: 1, 2: 2, 3: 2, 4: 1}
    s = class_counts(overlap_table(gt, pred), gt_types, pred_types)
    assert (s.det_tp, s.det_fp, s.det_fn) == (3, 1, 2)
    c1, c2 = s.counts[1], s.counts[2]
    # class 1: pairs (1:1,1) TP, (2:1,2) FN_c, (3:2,2) TN; unpaired gt 5 FN_d, pred 4 FP_d
    assert (c1.tp_c, c1.tn_c, c1.fp_c, c1.fn_c, c1.fp_d, c1.fn_d) == (1, 1, 0, 1, 1, 1)
    assert c1.f1 == pytest.approx(2 * 2 / (2 * 2 + 0 + 2 + 1 + 1))
    # class 2: (3) TP, (1) TN, (2) FP_c; unpaired gt 4 FN_d
    assert (c2.tp_c, c2.tn_c, c2.fp_c, c2.fn_c, c2.fp_d, c2.fn_d) == (1, 1, 1, 0, 0, 1)
    # PQ within class 2: gt {3, 4}, pred {2, 3}: one match at IoU 1
    assert c2.pq == pytest.approx(1 / (1 + 0.5 * (1 + 1)))
    assert s.mpq == pytest.approx(np.mean([c1.pq, c2.pq]))
    assert s.f1_d == pytest.approx(6 / (6 + 1 + 2))
    # pooled over two copies of the image: same ratios, doubled counts
    both = type_scores([s, s])
    assert both.counts[1].tp_c == 2 and both.counts[1].f1 == pytest.approx(c1.f1)
    # through evaluate / evaluate_dataset
    scores = evaluate(gt, pred, gt_types=gt_types, pred_types=pred_types)
    pooled = evaluate_dataset([scores, scores]).pooled["types"]
    assert pooled["classes"]["1"]["f1"] == pytest.approx(c1.f1)
    assert pooled["mpq"] == pytest.approx(s.mpq)


def test_type_table_majority_and_bad_maps():
    lab = np.array([[1, 1, 1, 2], [0, 0, 2, 2]])
    tmap = np.array([[3, 3, 1, 2], [0, 0, 2, 0]], np.uint8)
    assert type_table(lab, tmap).tolist() == [0, 3, 2]
    with pytest.raises(ValueError, match="differ"):
        type_table(lab, tmap[:, :2])
    with pytest.raises(ValueError, match="whole classes"):
        type_table(lab, tmap.astype(np.float32))


def test_evaluate_cli_scores_types_from_the_type_map_and_the_instances_csv(tmp_path, capsys):
    gt = disk_labels((64, 64), [(16, 16), (16, 48), (48, 16), (48, 48)], 6)
    classes = np.array([0, 1, 2, 2, 1], np.uint8)
    _write(tmp_path / "gt" / "labels" / "a.tif", gt.astype(np.uint16))
    _write(tmp_path / "gt" / "types" / "a.tif", classes[gt])
    _write(tmp_path / "pred" / "a_instances.tif", gt.astype(np.uint16))
    (tmp_path / "pred" / "a_instances.csv").write_text(
        "label,score,type\n1,0.9,1\n2,0.8,2\n3,0.7,1\n4,0.6,1\n"
    )
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(tmp_path / "pred"),
                "--gt",
                str(tmp_path / "gt" / "labels"),
                "--json",
            ]
        )
        == 0
    )
    t = json.loads(capsys.readouterr().out)["pooled"]["types"]
    assert t["f1_d"] == 1.0
    # class 2: gt {2, 3}, predicted {2}: pair 3 is FN_c -> F = 2*(1+2) / (2*3 + 2) = 0.75
    assert t["classes"]["2"]["f1"] == pytest.approx(0.75)
    assert (
        main(
            ["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt" / "labels")]
        )
        == 0
    )
    assert "detection F1 1.000" in capsys.readouterr().out


def test_centroid_pairing_counts_a_loose_outline_as_detected():
    from napari_medinst.class_metrics import centroid_pairs

    gt = np.zeros((40, 80), np.int32)
    gt[10:20, 10:20], gt[10:20, 50:60] = 1, 2
    pred = np.zeros_like(gt)
    pred[8:24, 8:24] = 5  # IoU 100/256 < 0.5, centre 1.5 px off
    pred[30:38, 50:58] = 6  # 17 px away from gt 2
    table = overlap_table(gt, pred)
    gi, pi = centroid_pairs(gt, pred, table, radius=12)
    assert list(zip(table.gt_ids[gi], table.pred_ids[pi], strict=True)) == [(1, 5)]
    by_iou = class_counts(table, {1: 1, 2: 1}, {5: 1, 6: 1})
    by_centre = class_counts(table, {1: 1, 2: 1}, {5: 1, 6: 1}, pairs=(gi, pi))
    assert (by_iou.det_tp, by_centre.det_tp) == (0, 1)
    assert by_centre.counts[1].tp_c == 1 and by_centre.counts[1].pq == by_iou.counts[1].pq == 0


def test_training_the_type_head_alone_keeps_the_segmentation(tmp_path):
    folder, cfg = _tiny_typed_run(tmp_path)
    first = train(
        TrainConfig(out=str(tmp_path / "a"), type_names=["x", "y", "z"], **cfg), verbose=False
    )
    head = train(
        TrainConfig(
            out=str(tmp_path / "b"),
            init=str(first),
            type_head_only=True,
            type_balance=0.5,
            lr=0.05,
            **{**cfg, "epochs": 2},
        ),
        verbose=False,
    )
    before = torch.load(first / "weights.pt", weights_only=True)
    after = torch.load(head / "weights.pt", weights_only=True)
    assert before.keys() == after.keys()
    for k in before:  # every weight but the head's, bit for bit (batch-norm statistics too)
        same = torch.equal(before[k], after[k])
        assert same != k.startswith("head_type."), k
    assert (head / "postprocess.json").read_text() == (first / "postprocess.json").read_text()
    metrics = json.loads((head / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == [1, 2]
    assert all(0.0 <= r["val_mpq"] <= 1.0 for r in metrics["history"])
    config = json.loads((head / "config.json").read_text())
    assert [t["name"] for t in config["types"]] == ["x", "y", "z"]
    # what segments is the parent's: its training record (and data, for fine-tuning) too
    parent = json.loads((first / "config.json").read_text())
    assert config["segmentation_training"] == parent["training"]
    assert config["parent_weights_sha256"] == parent["weights_sha256"]

    # a model without a type head, no --init, new classes, or no typed data: clear errors
    untyped = train(TrainConfig(out=str(tmp_path / "c"), **cfg), verbose=False)
    with pytest.raises(ModelError, match="type head"):
        train(
            TrainConfig(out=str(tmp_path / "d"), init=str(untyped), type_head_only=True, **cfg),
            verbose=False,
        )
    with pytest.raises(ValueError, match="--init"):
        TrainConfig(out=str(tmp_path / "e"), type_head_only=True, **cfg)
    with pytest.raises(ValueError, match="keeps the model's classes"):
        TrainConfig(
            out=str(tmp_path / "f"),
            init=str(first),
            type_head_only=True,
            type_names=["p", "q", "r"],
            **cfg,
        )
    plain = tmp_path / "plain"
    for sub in ("images", "labels"):
        for p in sorted((folder / sub).iterdir())[:4]:
            _write(plain / sub / p.name, tifffile.imread(p))
    with pytest.raises(InputError, match="no image has nucleus types"):
        train(
            TrainConfig(
                out=str(tmp_path / "g"),
                init=str(first),
                type_head_only=True,
                **{**cfg, "data": [f"{plain}@0.5"]},
            ),
            verbose=False,
        )
    assert not (tmp_path / "g").exists()  # a refused run leaves no folder behind


def test_class_weights_favour_rare_classes():
    folder_labels = np.zeros((20, 20), np.int32)
    folder_labels[:10, :10] = 1  # 100 px of class 1
    folder_labels[15:17, 15:17] = 2  # 4 px of class 2
    sample = Sample(
        name="s",
        image=np.zeros((3, 20, 20), np.float32),
        labels=folder_labels,
        modality="he",
        scale=1.0,
        sha256="",
        types=np.array([7, 1, 2], np.int16),  # (entry 0 is never background's class)
    )
    assert class_weights([sample], 4, 0.0) is None
    w = class_weights([sample], 4, 0.5).numpy()
    counts = np.array([296, 100, 4, 0])
    share = counts / counts.sum()
    assert w[2] > w[1] > w[0] and w[3] > 0  # a class without pixels keeps a weight
    assert float((share * w).sum()) == pytest.approx(1.0, rel=1e-5)
    assert w[2] / w[1] == pytest.approx((100 / 4) ** 0.5, rel=1e-5)
    assert w[1] / w[0] == pytest.approx((296 / 100) ** 0.5, rel=1e-5)


def test_a_type_branch_starts_from_the_head_and_trains_alone(tmp_path):
    _, cfg = _tiny_typed_run(tmp_path)
    first = train(
        TrainConfig(out=str(tmp_path / "a"), type_names=["x", "y", "z"], **cfg), verbose=False
    )
    plain = load_model(first).net.eval()
    widened = _from_init(
        load_model(first), TrainConfig(out="x", init=str(first), type_context=6, **cfg)
    )[0].eval()
    assert widened.type_branch is not None and plain.type_branch is None
    x = torch.rand(1, 3, 48, 48)
    with torch.no_grad():  # the new branch adds nothing until it has learnt
        y, context = widened.features(x)
        assert context is not None
        assert torch.equal(widened.type_logits(y, None), widened.type_logits(y, context))
        assert torch.allclose(plain(x).type_logits, widened(x).type_logits, atol=1e-5)
    head = train(
        TrainConfig(
            out=str(tmp_path / "b"),
            init=str(first),
            type_head_only=True,
            type_context=6,
            lr=0.05,
            **cfg,
        ),
        verbose=False,
    )
    model = load_model(head)
    assert model.net.config.type_context == 6
    before = torch.load(first / "weights.pt", weights_only=True)
    after = torch.load(head / "weights.pt", weights_only=True)
    assert set(after) - set(before) == {k for k in after if k.startswith("type_branch.")}
    for k in before:
        assert torch.equal(before[k], after[k]) != k.startswith("head_type."), k
    assert any(after[k].abs().sum() > 0 for k in after if k.startswith("type_branch.2."))
    # and a later warm start keeps the branch
    again = _from_init(model, TrainConfig(out="x", init=str(head), **cfg))[0]
    assert again.config.type_context == 6
    assert torch.equal(
        again.state_dict()["type_branch.0.weight"], model.net.state_dict()["type_branch.0.weight"]
    )
