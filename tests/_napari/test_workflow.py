"""End to end through both widgets: segment the sample, score it, auto-tune, apply."""

import numpy as np
import pytest

from napari_medinst._napari import _evaluate_widget as EW
from napari_medinst.metrics import evaluate

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def recovery(tmp_path, monkeypatch):
    monkeypatch.setenv(EW.RECOVERY_ENV, str(tmp_path / "recovery"))


def test_segment_then_evaluate_and_autotune(make_napari_viewer, qtbot, monkeypatch):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medinst", "he")
    _, seg = viewer.window.add_plugin_dock_widget("napari-medinst", "Segment nuclei")
    seg._model.value = "classical"
    seg._run.native.click()
    qtbot.waitUntil(
        lambda: "he sample instances" in viewer.layers and seg._job is None, timeout=60000
    )
    pred, gt = viewer.layers["he sample instances"], viewer.layers["he sample ground truth"]
    gt_before = np.array(gt.data, copy=True)

    _, ev = viewer.window.add_plugin_dock_widget("napari-medinst", "Evaluate")
    ev._pred.value, ev._gt.value = pred, gt
    got = ev.evaluate_now().scores
    want = evaluate(gt.data, pred.data)
    assert got.aji == pytest.approx(want.aji) and got.pq == pytest.approx(want.pq)
    assert got.has_scores  # confidences travel from the Segment widget

    monkeypatch.setattr(EW, "TUNE_GRID", {"fg_threshold": (0.3, 0.5, 0.7)})
    ev.start_autotune()
    qtbot.waitUntil(lambda: ev._tune_worker is None, timeout=60000)
    _params, _result, base, best = ev._tuned
    assert best >= base
    assert ev.apply_tuned()
    np.testing.assert_array_equal(gt.data, gt_before)  # ground truth never touched
