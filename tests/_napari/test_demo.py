"""Issue 17, bug 4: the demo's window is a user's own session (the Segment panel made the
layers shown, so its progress, sliders and Run act on them; the plugin's panels docked)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_medinst._napari import _demo
from napari_medinst._napari import _segment_widget as sw
from napari_medinst.postprocess import PostprocessParams

from .test_segment_widget import Notes, instances, settle

pytestmark = pytest.mark.gui

IMAGE = "he sample"


@pytest.fixture
def notes(monkeypatch) -> Notes:
    return Notes(monkeypatch)


def test_demo_window_is_the_segment_panels_own_session(
    make_napari_viewer, qtbot, notes, monkeypatch
):
    calls = []
    real = sw.compute_maps
    monkeypatch.setattr(sw, "compute_maps", lambda *a, **k: calls.append(1) or real(*a, **k))
    viewer = make_napari_viewer(show=True)
    widget = _demo.populate(viewer, "he", "classical")
    assert _demo.wait_idle(widget, 120)
    docked = set(viewer.window.dock_widgets)
    assert {f"{name} (napari-medinst)" for name in _demo.PANELS} <= docked
    layer = instances(viewer)
    assert widget._session.layers["instances"] is layer  # the panel's own output
    assert widget._progress.value == widget._progress.max
    assert "nuclei in 'he sample'" in widget._status.value
    used = PostprocessParams.from_json(layer.metadata["postprocess_params"])
    assert used == widget._read_params()  # the sliders show what made the layer
    before = np.array(layer.data)
    widget._fg_threshold.value = round(widget._fg_threshold.value + 0.1, 2)
    settle(qtbot, widget)
    assert not np.array_equal(layer.data, before)  # a slider acts on the layer shown
    assert json.loads(layer.metadata["postprocess_params"])["fg_threshold"] == pytest.approx(
        widget._fg_threshold.value
    )
    n_layers = len(viewer.layers)
    widget._run.native.click()  # Run again: same layers, maps reused
    settle(qtbot, widget)
    assert len(viewer.layers) == n_layers and instances(viewer) is layer
    assert len(calls) == 1
    assert not any("[" in x.name or "(2)" in x.name for x in viewer.layers)
    assert not notes.errors


def test_demo_screenshot_shows_the_files_result(tmp_path, capsys, monkeypatch):
    from napari_medinst.cli import main

    monkeypatch.delenv("CI", raising=False)
    rc = main(["demo", "-o", str(tmp_path), "--gui", "screenshot", "--model", "classical"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "differs" not in err and "did not finish" not in err
    assert (tmp_path / "napari_window.png").stat().st_size > 10_000
