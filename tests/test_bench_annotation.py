"""The annotation-effort benchmark's scripted annotator on a tile with known errors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from napari_medinst.metrics import evaluate
from napari_medinst.postprocess import Postprocessor
from napari_medinst.targets import make_targets

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_annotation.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_annotation", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


R = 11
#: gt disks: 1-2 touch (merged in the prediction), 3 is missed, 4 has a loose outline,
#: 5-6 are right; the prediction adds a false positive at FP.
CENTRES = ((30, 30), (30, 50), (30, 110), (90, 30), (90, 80), (90, 130))
FP = (60, 140)


def disks(shape, centres, radius=R) -> np.ndarray:
    """Disks (ids 1..n); where two overlap, each pixel goes to the nearer centre."""
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    d = np.stack([(rr - r) ** 2 + (cc - c) ** 2 for r, c in centres])
    return np.where(d.min(0) <= radius**2, d.argmin(0) + 1, 0).astype(np.int32)


def known_errors():
    """gt, the prediction with one error of each kind, perfect maps of gt."""
    gt = disks((120, 160), CENTRES)
    pred = gt.copy()
    pred[(ndi.distance_transform_edt(~np.isin(gt, [1, 2])) <= 1) & (gt == 0)] = 1
    pred[pred == 2] = 1  # merge (a pixel wider, so that it matches neither)
    pred[pred == 3] = 0  # miss
    pred[(ndi.distance_transform_edt(gt != 4) <= 3) & (gt == 0)] = 4  # loose outline
    pred[disks(gt.shape, [FP], 7) > 0] = 9  # false positive
    t = make_targets(gt)
    maps = Postprocessor(t.foreground.astype(np.float32), t.hv, t.contour.astype(np.float32))
    return gt, pred, maps


def run(bench, gt, pred, maps, *, policy, outline):
    truth = bench.truth_nuclei(gt)
    return bench.fix_prediction(pred, gt, truth, maps, None, policy=policy, outline=outline)


def test_new_tools_tried_first_fix_each_error_in_one_step(bench):
    gt, pred, maps = known_errors()
    ann = run(bench, gt, pred, maps, policy=bench.TOOLS_FIRST, outline=True)
    # D; K + two seeds; A; O
    assert dict(ann.tally.errors) == {"fp": 1, "merge": 1, "miss": 1, "outline": 1}
    assert dict(ann.tally.actions) == {"fp": 1, "merge": 3, "miss": 1, "outline": 1}
    assert ann.tally.events["A accepted"] == 1 and ann.tally.events["O accepted"] == 1
    assert ann.tally.events["merge cut (seeds)"] == 1
    assert evaluate(gt, ann.labels).aji >= 0.9
    np.testing.assert_array_equal(pred, known_errors()[1])  # the prediction is not modified


def test_without_outline_fixes_the_loose_nucleus_is_left(bench):
    gt, pred, maps = known_errors()
    ann = run(bench, gt, pred, maps, policy=bench.TOOLS_FIRST, outline=False)
    assert dict(ann.tally.actions) == {"fp": 1, "merge": 3, "miss": 1}
    np.testing.assert_array_equal(ann.labels == 4, pred == 4)
    assert evaluate(gt, ann.labels).aji >= 0.85


def test_old_tools_follow_the_issue_cost_model(bench):
    gt, pred, maps = known_errors()
    ann = run(bench, gt, pred, maps, policy=None, outline=True)
    paint = 1 + 3  # a 22 px wide disk: 1 + ceil(22 / 10) strokes
    assert bench.truth_nuclei(gt)[3].paint == paint
    # D; K + one line; N + paint; erase the 3 px ring: L + click + P + E + one stroke
    assert dict(ann.tally.actions) == {"fp": 1, "merge": 2, "miss": 1 + paint, "outline": 5}
    assert evaluate(gt, ann.labels).aji >= 0.9
    scratch = sum(1 + g.paint for g in bench.truth_nuclei(gt).values())
    assert scratch == 6 * (1 + paint)


def test_a_refused_add_is_paid_for_and_falls_back_to_painting(bench):
    gt, pred, _ = known_errors()
    t = make_targets(np.where(gt == 3, 0, gt))  # the model sees nothing at nucleus 3
    blind = Postprocessor(t.foreground.astype(np.float32), t.hv, t.contour.astype(np.float32))
    ann = run(bench, gt, pred, blind, policy=bench.TOOLS_FIRST, outline=True)
    assert ann.tally.events["A refused"] == 1 and ann.tally.events["paint"] == 1
    assert ann.tally.actions["miss"] == 1 + 1 + bench.truth_nuclei(gt)[3].paint
    assert evaluate(gt, ann.labels).aji >= 0.9


def test_trained_order_cuts_lines_presses_keys_and_lassos(bench):
    gt, pred, maps = known_errors()
    paint = bench.truth_nuclei(gt)[3].paint
    ann = run(bench, gt, pred, maps, policy=bench.TRAINED, outline=True)
    # D; K + a line; N + paint (A is not tried on a miss); one press of "," (shrink)
    assert dict(ann.tally.actions) == {"fp": 1, "merge": 2, "miss": 1 + paint, "outline": 1}
    assert ann.tally.events["merge cut (line)"] == 1 and ann.tally.events["grow/shrink x1"] == 1
    # the annotator stops pressing at IoU 0.7 (the 3 px ring shrunk by one: IoU 0.72)
    assert evaluate(gt, ann.labels).aji >= 0.85
    lasso = run(bench, gt, pred, maps, policy=bench.LASSO, outline=True)
    # Q + drag around one of the merged nuclei (the blob keeps the other); Q stays on
    # through D and the other fixes: one drag for the miss, one redraws the loose outline
    # (as cheap as a press of ",", and a better fit)
    assert dict(lasso.tally.actions) == {"fp": 1, "merge": 2, "miss": 1, "outline": 1}
    assert lasso.tally.events["lasso"] == 2 and lasso.tally.events["merge by Q"] == 1
    assert lasso.tally.events["lasso redrew"] == 1 and lasso.mode == "Q"
    assert bench.truth_nuclei(gt)[4].iou(lasso.labels, 4) > 0.9
    assert evaluate(gt, lasso.labels).aji >= 0.9


def test_main_reports_a_tile_from_cached_maps(bench, tmp_path, capsys):
    gt, _, maps = known_errors()
    folder = tmp_path / "monuseg"
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    (folder / "index.csv").write_text("id,split\ntile,MoNuSeg2018-train\nother,MoNuSeg2018-test\n")
    tifffile.imwrite(folder / "images" / "tile.tif", np.zeros((*gt.shape, 3), np.uint8))
    tifffile.imwrite(folder / "labels" / "tile.tif", gt.astype(np.uint16))
    cache = tmp_path / "cache"
    cache.mkdir()
    np.savez(cache / "tile.npz", prob=maps.prob, hv=maps.hv, contour=maps.contour, px=0.5)
    bench.main(["--data", str(tmp_path), "--split", "train", "--cache", str(cache)])
    out = capsys.readouterr().out
    assert "MoNuSeg train" in out and "6 gt nuclei" in out
    assert "from prediction, with outlines" in out and "AJI" in out


def test_o_reads_the_tile_when_the_maps_share_the_loose_outline(bench):
    """The model's maps agree with the loose outline: O fixes it only from the image."""
    gt = disks((120, 160), CENTRES)
    pred = gt.copy()
    pred[(ndi.distance_transform_edt(gt != 4) <= 3) & (gt == 0)] = 4
    t = make_targets(pred)
    maps = Postprocessor(t.foreground.astype(np.float32), t.hv, t.contour.astype(np.float32))
    soft = ndi.gaussian_filter((gt > 0).astype(np.float64), 1.5)[..., None]
    pink, purple = -np.log([0.93, 0.75, 0.85]), -np.log([0.35, 0.25, 0.55])
    image = (np.exp(-(pink + soft * (purple - pink))) * 255).astype(np.uint8)
    truth = bench.truth_nuclei(gt)
    kw = {"policy": bench.TOOLS_FIRST, "outline": True}
    blind = bench.fix_prediction(pred, gt, truth, maps, None, **kw)
    assert blind.tally.events["O accepted"] == 0 and blind.tally.actions["outline"] > 1
    seeing = bench.fix_prediction(pred, gt, truth, maps, None, image=image, **kw)
    assert dict(seeing.tally.actions) == {"outline": 1} and seeing.tally.events["O accepted"] == 1
    assert evaluate(gt, seeing.labels).aji >= 0.9


def test_lasso_redraws_a_loose_outline_in_two_actions(bench):
    """Q + one drag over a misplaced outline redraws it (same id): no D first (was 3)."""
    gt = disks((120, 160), CENTRES)
    pred = gt.copy()
    pred[gt == 4] = 0
    pred[np.roll(gt == 4, 5, axis=1)] = 4  # moved 5 px: matched (IoU 0.55), loose
    maps = Postprocessor(*(np.zeros(gt.shape, np.float32), np.zeros((2, *gt.shape))))
    truth = bench.truth_nuclei(gt)
    ann = bench.fix_prediction(pred, gt, truth, maps, None, policy=bench.LASSO, outline=True)
    assert dict(ann.tally.errors) == {"outline": 1}
    assert dict(ann.tally.actions) == {"outline": 2}  # Q + drag
    assert ann.tally.events["lasso redrew"] == 1 and ann.tally.events["grow/shrink x1"] == 0
    assert truth[4].iou(ann.labels, 4) >= 0.85  # the same id, redrawn
    trained = bench.fix_prediction(pred, gt, truth, maps, None, policy=bench.TRAINED, outline=True)
    assert trained.tally.actions["outline"] == 1 + 1 + truth[4].paint  # D + N + paint


def test_lasso_takes_a_miss_hidden_under_a_neighbour_in_two_actions(bench):
    """The neighbour's over-large outline covers part of the missed nucleus: Q + drag."""
    gt = disks((80, 100), ((40, 35), (40, 57)))
    pred = np.where(gt == 1, 1, 0).astype(np.int32)
    pred[(gt == 2) & (np.arange(100) < 53)] = 1  # a third of nucleus 2 under nucleus 1
    t = make_targets(gt)
    maps = Postprocessor(t.foreground.astype(np.float32), t.hv, t.contour.astype(np.float32))
    truth = bench.truth_nuclei(gt)
    ann = bench.fix_prediction(pred, gt, truth, maps, None, policy=bench.LASSO, outline=True)
    assert dict(ann.tally.errors) == {"miss": 1}
    assert dict(ann.tally.actions) == {"miss": 2} and ann.tally.events["lasso"] == 1
    assert ndi.label(ann.labels == 1)[1] == 1 and evaluate(gt, ann.labels).aji >= 0.85
    assert ann.edited == {2}  # the neighbour only lost pixels: still "predicted"


def test_a_mode_key_is_paid_only_when_the_mode_is_off(bench):
    """Q, K and J stay on through one-key actions; another mode or the brush ends them."""
    gt = disks((80, 100), ((40, 30), (40, 70)))
    truth = bench.truth_nuclei(gt)
    maps = Postprocessor(*(np.zeros(gt.shape, np.float32), np.zeros((2, *gt.shape))))
    ann = bench.Annotator(np.zeros_like(gt), truth, maps, None, policy=bench.LASSO, accept=0.7)
    assert ann.q_cost(truth[1])[0] == 2  # Q + drag
    ann.draw(truth[1], "miss")
    assert ann.mode == "Q" and ann.tally.actions["miss"] == 2
    assert ann.q_cost(truth[2])[0] == 1  # the outline mode is still on: the drag only
    ann.mode = "J"  # a join in between ends it
    assert ann.q_cost(truth[2])[0] == 2
    ann.q_failed.add(2)  # painted by hand: N picks the brush
    ann.draw(truth[2], "miss")
    assert ann.mode == "paint" and ann.tally.events["paint"] == 1
    assert evaluate(gt, ann.labels).aji > 0.9


def test_spatial_order_pays_each_mode_change(bench):
    """Miss, split, miss from left to right: kind by kind J then Q once; in place Q, J, Q."""
    gt = disks((60, 160), ((30, 25), (30, 80), (30, 135)))
    pred = np.zeros_like(gt)
    col = np.arange(160)
    pred[gt == 2] = 5
    pred[(gt == 2) & (col >= 76)] = 6  # nucleus 2 split in three: none matches it
    pred[(gt == 2) & (col >= 84)] = 7
    maps = Postprocessor(*(np.zeros(gt.shape, np.float32), np.zeros((2, *gt.shape))))
    truth = bench.truth_nuclei(gt)
    kw = {"policy": bench.LASSO, "outline": False}
    by_kind = bench.fix_prediction(pred, gt, truth, maps, None, **kw)
    assert dict(by_kind.tally.actions) == {"split": 2, "miss": 2 + 1}  # J + drag; Q + 2 drags
    in_place = bench.fix_prediction(pred, gt, truth, maps, None, order="spatial", **kw)
    assert dict(in_place.tally.actions) == {"split": 2, "miss": 2 + 2}  # Q again after J
    assert in_place.tally.events["split joined (J)"] == 1
    for ann in (by_kind, in_place):
        assert evaluate(gt, ann.labels).aji > 0.85
