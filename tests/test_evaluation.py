"""Tests of napari_medinst.evaluation: file pairing, score CSVs, JSON result, report, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from napari_medinst import evaluation as E
from napari_medinst._io import InputError

THRESHOLD_KEYS = ["0.50", "0.55", "0.60", "0.65", "0.70", "0.75", "0.80", "0.85", "0.90", "0.95"]
IMAGE_KEYS = [
    "name", "n_gt", "n_pred", "accuracy", "ap", "precision", "recall", "f1",
    "map", "pq", "dq", "sq", "aji", "aji_plus", "dice",
]  # fmt: skip


def case_a() -> tuple[np.ndarray, np.ndarray]:
    """Same as test_metrics.case_a: TP IoU 1, TP IoU 0.75, one FN, one FP (3 gt, 3 pred)."""
    gt = np.zeros((10, 10), np.uint16)
    gt[0:4, 0:4] = 1
    gt[0:4, 6:10] = 2
    gt[6:10, 0:2] = 3
    pred = np.zeros((10, 10), np.uint16)
    pred[0:4, 0:4] = 1
    pred[0:4, 7:10] = 2
    pred[6:10, 6:10] = 3
    return gt, pred


def perfect() -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((6, 6), np.uint16)
    gt[1:3, 1:3] = 5
    return gt, gt.copy()


@pytest.fixture
def folders(tmp_path):
    """pred/{a,b}_instances.tif and gt/{a,b}.tif; a = case_a, b = a perfect prediction."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    for name, (gt, pred) in {"a": case_a(), "b": perfect()}.items():
        tifffile.imwrite(gt_dir / f"{name}.tif", gt)
        tifffile.imwrite(pred_dir / f"{name}_instances.tif", pred)
    return pred_dir, gt_dir


def cli(argv: list[str]) -> int:
    """The real ``napari-medinst`` command (its parser lives in the CLI module)."""
    from napari_medinst.cli import main

    return main(argv)


# ----------------------------------------------------------------------------- pairing


def test_pair_folders_ignores_instances_suffix(folders):
    pred_dir, gt_dir = folders
    (pred_dir / "notes.txt").write_text("not an image")
    pairs = E.pair_files(pred_dir, gt_dir)
    assert [p.name for p in pairs] == ["a", "b"]
    assert pairs[0].pred.name == "a_instances.tif"
    assert pairs[0].gt.name == "a.tif"
    assert pairs[0].scores is None


def test_unpaired_names_are_listed(folders):
    pred_dir, gt_dir = folders
    tifffile.imwrite(pred_dir / "c_instances.tif", np.zeros((3, 3), np.uint8))
    tifffile.imwrite(gt_dir / "d.tif", np.zeros((3, 3), np.uint8))
    with pytest.raises(InputError, match=r"without ground truth.*: c;.*without prediction.*: d"):
        E.pair_files(pred_dir, gt_dir)


def test_two_files_for_one_stem_is_an_error(folders):
    pred_dir, gt_dir = folders
    tifffile.imwrite(pred_dir / "a.tif", np.zeros((3, 3), np.uint8))
    with pytest.raises(InputError, match="two label images for 'a'"):
        E.pair_files(pred_dir, gt_dir)


def test_file_and_folder_combinations(folders):
    pred_dir, gt_dir = folders
    one = E.pair_files(pred_dir / "b_instances.tif", gt_dir)
    assert [(p.name, p.gt.name) for p in one] == [("b", "b.tif")]
    one = E.pair_files(pred_dir, gt_dir / "a.tif")
    assert [(p.name, p.pred.name) for p in one] == [("a", "a_instances.tif")]
    files = E.pair_files(pred_dir / "a_instances.tif", gt_dir / "b.tif")  # explicit: any names
    assert [(p.name, p.pred.name, p.gt.name) for p in files] == [("b", "a_instances.tif", "b.tif")]
    with pytest.raises(InputError, match="no ground truth named 'zz'"):
        tifffile.imwrite(pred_dir / "zz.tif", np.zeros((3, 3), np.uint8))
        E.pair_files(pred_dir / "zz.tif", gt_dir)


def test_missing_and_empty_paths(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"missing\.tif: prediction not found"):
        E.pair_files(tmp_path / "missing.tif", empty)
    with pytest.raises(InputError, match="no label images"):
        E.pair_files(empty, empty)
    (tmp_path / "x.csv").write_text("label,score\n")
    with pytest.raises(InputError, match="must be a label image"):
        E.pair_files(tmp_path / "x.csv", empty)


# ------------------------------------------------------------------------- evaluate


def test_evaluate_paths_json_structure(folders):
    result = E.evaluate_paths(*folders)
    assert list(result) == ["images", "mean", "pooled"]
    assert [img["name"] for img in result["images"]] == ["a", "b"]
    for img in result["images"]:
        assert list(img) == IMAGE_KEYS
        for key in ("accuracy", "ap", "precision", "recall", "f1"):
            assert list(img[key]) == THRESHOLD_KEYS
            assert all(type(v) is float for v in img[key].values())
    assert list(result["mean"]) == IMAGE_KEYS[1:]
    assert {
        "accuracy",
        "ap",
        "precision",
        "recall",
        "f1",
        "map",
        "pq",
        "aji",
        "aji_plus",
        "dice",
    } <= set(result["pooled"])
    assert json.loads(json.dumps(result)) == result
    a, b = result["images"]
    assert (a["n_gt"], a["n_pred"]) == (3, 3)
    assert a["accuracy"]["0.50"] == pytest.approx(0.5)
    assert b["map"] == 1.0
    assert result["mean"]["accuracy"]["0.50"] == pytest.approx(0.75)
    # pooled at 0.5: TP 2 + 1, FP 1, FN 1 -> 3/5
    assert result["pooled"]["accuracy"]["0.50"] == pytest.approx(0.6)
    assert result["pooled"]["tp"]["0.50"] == 3


def test_scores_sidecar_is_used(folders):
    pred_dir, gt_dir = folders
    (pred_dir / "a_instances_scores.csv").write_text("label,score\n1,0.9\n2,0.8\n3,0.1\n")
    # an instance table with a score column (and extra columns) also works
    (pred_dir / "b_instances.csv").write_text("label,area,score\n5,4,0.7\n")
    pairs = E.pair_files(pred_dir, gt_dir)
    assert [p.scores.name for p in pairs] == ["a_instances_scores.csv", "b_instances.csv"]
    a = E.evaluate_paths(pred_dir, gt_dir)["images"][0]
    # COCO 101-point AP with the FP ranked last: 67/101 at IoU <= 0.75, else 34/101
    assert a["ap"]["0.50"] == pytest.approx(67 / 101)
    assert a["map"] == pytest.approx((6 * 67 + 4 * 34) / 1010)


def test_instance_table_without_score_column_is_ignored(folders):
    pred_dir, gt_dir = folders
    (pred_dir / "a_instances.csv").write_text("label,area\n1,16\n")
    assert E.pair_files(pred_dir, gt_dir)[0].scores is None
    a = E.evaluate_paths(pred_dir, gt_dir)["images"][0]
    assert a["ap"]["0.50"] == pytest.approx(4 / 9)  # precision x recall


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id,value\n1,0.5\n", "needs columns 'label' and 'score'"),
        ("label,score\n1,high\n", "line 2: malformed"),
        ("label,score\n1,0.5\n1,0.6\n", "line 3: label 1 listed twice"),
        ("label,score\n0,0.5\n", "line 2: label must be a positive integer"),
        ("label,score\n1.5,0.5\n", "line 2: label must be a positive integer"),
        ("label,score\n1,nan\n", "line 2: score must be a finite number"),
        ("label,score\n1,0.9\n2,0.8\n", "no value for ids 3"),
    ],
)
def test_malformed_scores_are_reported_with_the_file(folders, text, message):
    pred_dir, gt_dir = folders
    (pred_dir / "a_scores.csv").write_text(text)
    with pytest.raises(InputError, match=message) as info:
        E.evaluate_paths(pred_dir, gt_dir)
    assert "a_scores.csv" in str(info.value)


def test_shape_mismatch_names_the_files(tmp_path):
    tifffile.imwrite(tmp_path / "p.tif", np.zeros((4, 4), np.uint8))
    tifffile.imwrite(tmp_path / "g.tif", np.zeros((4, 5), np.uint8))
    with pytest.raises(InputError, match=r"shapes differ.*p\.tif \(4, 4\).*g\.tif \(4, 5\)"):
        E.evaluate_paths(tmp_path / "p.tif", tmp_path / "g.tif")


def test_png_labels(tmp_path):
    from skimage import io as skio

    gt, pred = case_a()
    skio.imsave(tmp_path / "g.png", gt.astype(np.uint8), check_contrast=False)
    skio.imsave(tmp_path / "p.png", pred.astype(np.uint8), check_contrast=False)
    result = E.evaluate_paths(tmp_path / "p.png", tmp_path / "g.png")
    assert result["images"][0]["pq"] == pytest.approx(2 / 3 * 0.875)


# ------------------------------------------------------------------------- report, CLI


def test_format_report_rows(folders):
    text = E.format_report(E.evaluate_paths(*folders))
    lines = text.splitlines()
    assert lines[0].split() == ["image", "n_gt", "n_pred", "acc@0.5", "mAP", "PQ", "AJI", "Dice"]
    assert lines[1].split()[:4] == ["a", "3", "3", "0.500"]
    assert lines[2].split()[:2] == ["b", "1"]
    assert any(line.split()[:4] == ["mean", "2.0", "2.0", "0.750"] for line in lines)
    assert any(line.split()[:4] == ["pooled", "4", "4", "0.600"] for line in lines)
    assert " ".join(THRESHOLD_KEYS) in " ".join(text.split())


def test_cli_prints_table_or_json(folders, capsys):
    pred_dir, gt_dir = folders
    assert cli(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir)]) == 0
    assert "pooled" in capsys.readouterr().out
    assert cli(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"][0]["name"] == "a"


def test_cli_missing_file_returns_2_and_names_it(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "gt.tif", np.zeros((3, 3), np.uint8))
    missing = tmp_path / "nope_instances.tif"
    assert cli(["evaluate", "--pred", str(missing), "--gt", str(tmp_path / "gt.tif")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1
    assert "nope_instances.tif" in err[0] and "not found" in err[0]


def test_cli_unreadable_image_returns_2(tmp_path, capsys):
    (tmp_path / "p.tif").write_bytes(b"not a tiff")
    tifffile.imwrite(tmp_path / "g.tif", np.zeros((3, 3), np.uint8))
    assert (
        cli(["evaluate", "--pred", str(tmp_path / "p.tif"), "--gt", str(tmp_path / "g.tif")]) == 2
    )
    assert "p.tif" in capsys.readouterr().err
