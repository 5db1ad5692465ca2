"""Segment panel (issue 17): markers that leave small nuclei visible; undo / redo of
parameter and marker changes, with the instances layer's own undo for brush edits."""

from __future__ import annotations

import numpy as np
import pytest
from napari.utils.key_bindings import coerce_keybinding
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QSlider

from napari_medinst._napari import _segment_widget as sw
from napari_medinst._napari._history import History, PanelState
from napari_medinst.postprocess import PostprocessParams

from .test_segment_widget import IMAGE, Notes, instances, make_widget, run, settle

pytestmark = pytest.mark.gui


@pytest.fixture
def notes(monkeypatch) -> Notes:
    return Notes(monkeypatch)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """The same nuclei, pixel for pixel, whatever their ids (colours)."""
    if a.shape != b.shape or not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def markers_of(viewer):
    return viewer.layers[f"{IMAGE} markers"]


def drag(slider_widget, values) -> None:
    """A user's drag: press the slider, pass through ``values``, release it."""
    (slider,) = slider_widget.native.findChildren(QSlider)
    slider.setSliderDown(True)  # emits sliderPressed, as a mouse press does
    for v in values:
        slider_widget.value = v
    slider.setSliderDown(False)  # emits sliderReleased


# ----------------------------------------------------------------------------- history


def test_history_is_bounded_and_a_new_step_clears_redo():
    changes = []
    h: History[int] = History(limit=3, on_change=lambda: changes.append(1))
    assert not h.can_undo and h.undo(0) is None and h.redo(0) is None
    for before in range(5):  # states 0..4 left, 5 on show
        h.record(before)
    assert [h.undo(5), h.undo(4), h.undo(3), h.undo(2)] == [4, 3, 2, None]  # 3 kept
    assert h.can_redo and h.redo(2) == 3 and h.redo(3) == 4
    h.undo(4)
    h.record(30)  # a new step after an undo: the undone steps are gone
    assert not h.can_redo and h.undo(31) == 30
    assert len(changes) >= 10
    with pytest.raises(ValueError, match="limit"):
        History(limit=0)


def test_panel_state_compares_parameters_and_markers():
    p = PostprocessParams()
    a = PanelState(p, {(): np.array([[1.0, 2.0]])})
    assert a.same(PanelState(p, {(): np.array([[1.0, 2.0]])}))
    assert not a.same(PanelState(p, {(): np.array([[1.0, 3.0]])}))
    assert not a.same(PanelState(p)) and not a.same(None)
    assert not PanelState(p).same(PanelState(PostprocessParams(fg_threshold=0.6)))


# ----------------------------------------------------------------------------- markers


def test_markers_are_small_rings_that_leave_the_nucleus_visible(make_napari_viewer, qtbot, notes):
    viewer, widget = make_widget(make_napari_viewer, show=True)
    run(qtbot, widget)
    markers, labels = markers_of(viewer), instances(viewer)
    px = labels.metadata["pixel_size_um"]
    small = 5.0 / px  # a small (5 µm) nucleus, in pixels
    assert np.all(markers.size <= small / 3 + 1e-6) and np.all(markers.size >= 3)
    assert markers.canvas_size_limits[1] <= 16  # a few screen px even when zoomed in
    assert np.all(markers.face_color[:, 3] == 0) and np.all(markers.border_color[:, 3] == 1)
    assert np.all(markers.border_width > 0)
    # what is drawn: at the marker's centre, the nucleus (unchanged); around it, a ring
    centre = markers.data[len(markers.data) // 2]
    camera = sw._camera(viewer)
    camera.center = tuple(labels.data_to_world(centre))
    camera.zoom = 6.0
    shots = {}
    for visible in (False, True):
        markers.visible = visible
        qtbot.wait(50)
        shots[visible] = viewer.screenshot(canvas_only=True, flash=False).astype(int)
    h, w = shots[True].shape[:2]
    mid = (slice(h // 2 - 1, h // 2 + 2), slice(w // 2 - 1, w // 2 + 2))
    assert np.abs(shots[True][mid] - shots[False][mid]).max() <= 8, "the centre shows through"
    near = (slice(h // 2 - 12, h // 2 + 13), slice(w // 2 - 12, w // 2 + 13))
    ring = np.abs(shots[True][near] - shots[False][near]).max(axis=-1) > 60
    assert 8 <= ring.sum() <= 25 * 25 // 2, "a thin ring is drawn"
    # a marker the user adds, and markers rewritten by tuning, are rings too
    markers.add(centre + 3)
    assert markers.face_color[-1, 3] == 0 and markers.size[-1] == markers.size[0]
    settle(qtbot, widget)
    widget._reset_markers.native.click()
    widget._fg_threshold.value = 0.6
    settle(qtbot, widget)
    assert len(markers.data) and np.all(markers.face_color[:, 3] == 0)
    assert not notes.errors


# ----------------------------------------------------------------------------- undo


def test_undo_redo_parameter_changes_moves_sliders_and_labels_back(
    make_napari_viewer, qtbot, notes
):
    viewer, widget = make_widget(make_napari_viewer)
    run(qtbot, widget)
    layer = instances(viewer)
    fg0, size0 = widget._fg_threshold.value, widget._min_nucleus_size.value
    assert not widget._undo.enabled and not widget._redo.enabled  # a run: a new history
    l0 = layer.data.copy()
    drag(widget._fg_threshold, [fg0 + 0.05, fg0 + 0.1, fg0 + 0.15])  # one step
    settle(qtbot, widget)
    l1 = layer.data.copy()
    widget._min_nucleus_size.value = size0 + 60  # one step
    settle(qtbot, widget)
    l2 = layer.data.copy()
    assert not same_partition(l0, l1) and not same_partition(l1, l2)
    assert widget._undo.enabled and not widget._redo.enabled

    widget._undo.native.click()
    settle(qtbot, widget)
    assert widget._min_nucleus_size.value == size0
    assert widget._fg_threshold.value == pytest.approx(fg0 + 0.15)
    assert same_partition(layer.data, l1)
    widget._undo.native.click()  # the whole drag at once
    settle(qtbot, widget)
    assert widget._fg_threshold.value == pytest.approx(fg0)
    assert same_partition(layer.data, l0)
    assert not widget._undo.enabled and widget._redo.enabled

    widget._redo.native.click()
    widget._redo.native.click()
    settle(qtbot, widget)
    assert widget._fg_threshold.value == pytest.approx(fg0 + 0.15)
    assert widget._min_nucleus_size.value == size0 + 60
    assert same_partition(layer.data, l2) and not widget._redo.enabled
    assert not notes.errors


def test_undo_redo_marker_add_move_delete(make_napari_viewer, qtbot, notes):
    viewer, widget = make_widget(make_napari_viewer)
    run(qtbot, widget)
    layer, markers = instances(viewer), markers_of(viewer)
    auto = markers.data.copy()
    sizes = np.bincount(layer.data.ravel())
    sizes[0] = 0
    rr, cc = np.nonzero(layer.data == sizes.argmax())
    inside = np.array([rr[len(rr) // 5], cc[len(rr) // 5]], float)
    states = [(auto, layer.data.copy())]
    markers.add(inside)  # add
    settle(qtbot, widget)
    states.append((markers.data.copy(), layer.data.copy()))
    moved = markers.data.copy()
    moved[-1] += 2
    markers.data = moved  # move: one "changed" data event, as at the end of a drag
    settle(qtbot, widget)
    states.append((markers.data.copy(), layer.data.copy()))
    markers.selected_data = {0}
    markers.remove_selected()  # delete
    settle(qtbot, widget)
    states.append((markers.data.copy(), layer.data.copy()))
    assert not same_partition(states[0][1], states[1][1])

    undo_key = markers.keymap[coerce_keybinding("Control-z")]  # on the markers layer
    for points, labels in states[-2::-1]:  # back, one step each
        undo_key(markers)
        settle(qtbot, widget)
        np.testing.assert_allclose(markers.data, points)
        assert same_partition(layer.data, labels)
    assert not widget._session.seeds  # back to the automatic markers
    for points, labels in states[1:]:
        widget._redo.native.click()
        settle(qtbot, widget)
        np.testing.assert_allclose(markers.data, points)
        assert same_partition(layer.data, labels)
    np.testing.assert_allclose(widget._session.seeds[()], states[-1][0])
    assert not notes.errors


def test_ctrl_z_undoes_brush_edits_first_then_panel_steps(make_napari_viewer, qtbot, notes):
    """On the instances layer, Ctrl+Z undoes the layer's own (brush) edits while there
    are any since the panel's last write, then parameter changes; on the panel too."""
    from napari_medinst._napari._segment_widget import SegmentWidget

    viewer, widget = make_widget(make_napari_viewer, show=True)
    assert isinstance(widget, SegmentWidget)
    run(qtbot, widget)
    layer = instances(viewer)
    fg0 = widget._fg_threshold.value
    l0 = layer.data.copy()
    widget._fg_threshold.value = fg0 + 0.15
    settle(qtbot, widget)
    l1 = layer.data.copy()
    layer.paint((5, 5), 999, refresh=True)  # a brush stroke
    viewer.layers.selection.active = layer
    canvas = viewer.window._qt_viewer.canvas.native
    canvas.setFocus()
    ctrl, shift = Qt.KeyboardModifier.ControlModifier, Qt.KeyboardModifier.ShiftModifier
    qtbot.keyClick(canvas, Qt.Key.Key_Z, ctrl)  # the brush stroke
    np.testing.assert_array_equal(layer.data, l1)
    assert widget._fg_threshold.value == pytest.approx(fg0 + 0.15)
    qtbot.keyClick(canvas, Qt.Key.Key_Z, ctrl)  # the slider change
    settle(qtbot, widget)
    assert widget._fg_threshold.value == pytest.approx(fg0)
    assert same_partition(layer.data, l0)
    qtbot.keyClick(canvas, Qt.Key.Key_Z, ctrl | shift)
    settle(qtbot, widget)
    assert widget._fg_threshold.value == pytest.approx(fg0 + 0.15)
    assert same_partition(layer.data, l1)
    # the same keys on the panel
    (slider,) = widget._fg_threshold.native.findChildren(QSlider)
    slider.setFocus()
    qtbot.keyClick(slider, Qt.Key.Key_Z, ctrl)
    settle(qtbot, widget)
    assert widget._fg_threshold.value == pytest.approx(fg0)
    qtbot.keyClick(slider, Qt.Key.Key_Z, ctrl | shift)
    settle(qtbot, widget)
    assert widget._fg_threshold.value == pytest.approx(fg0 + 0.15)
    assert not notes.errors
