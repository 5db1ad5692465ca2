"""The model-aware correction keys of the ground-truth editor, on a real viewer."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from napari.utils.key_bindings import coerce_keybinding
from scipy import ndimage as ndi

from napari_medinst._napari import _editing as editing_glue
from napari_medinst._napari._contract import POSTPROCESSOR_KEY
from napari_medinst._napari._editing import KEY_BINDINGS, editor_for, start_from_prediction
from napari_medinst._napari._evaluate_widget import RECOVERY_ENV, EvaluateWidget
from napari_medinst.postprocess import Postprocessor
from napari_medinst.targets import make_targets

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def recovery(tmp_path, monkeypatch):
    """Never touch the user's real recovery folder."""
    monkeypatch.setenv(RECOVERY_ENV, str(tmp_path / "recovery"))


@pytest.fixture
def warnings(monkeypatch):
    got: list[str] = []
    monkeypatch.setattr(editing_glue, "show_warning", got.append)
    return got


def discs(shape=(120, 120), centres=((40, 40), (40, 64), (80, 60)), radius=11) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    d = np.stack([(rr - r) ** 2 + (cc - c) ** 2 for r, c in centres])
    return np.where(d.min(0) <= radius**2, d.argmin(0) + 1, 0).astype(np.int32)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def setup(make_napari_viewer, pred_data, truth, *, with_maps=True, with_image=False):
    """A viewer with a prediction (with or without cached maps) and its ground-truth copy."""
    viewer = make_napari_viewer()
    if with_image:
        rng = np.random.default_rng(0)
        img = np.where(truth > 0, 0.8, 0.2) + rng.normal(0, 0.08, truth.shape)
        viewer.add_image(img.astype(np.float32), name="image")
    pred = viewer.add_labels(pred_data, name="instances")
    if with_maps:
        t = make_targets(truth)
        pred.metadata[POSTPROCESSOR_KEY] = Postprocessor(
            t.foreground.astype(np.float32), t.hv, t.contour.astype(np.float32)
        )
    gt = start_from_prediction(viewer, pred)
    gt.visible = True
    return viewer, gt, editor_for(viewer, gt)


def press(viewer, gt, key: str, at=None) -> None:
    if at is not None:
        viewer.cursor.position = tuple(gt.data_to_world(at))
    gt.keymap[coerce_keybinding(key)](gt)


def click(gt, at, callback) -> None:
    """A mouse press and release at ``at`` (data row, col) through a drag callback."""
    event = SimpleNamespace(position=gt.data_to_world(at), type="mouse_press")
    gen = callback(gt, event)
    next(gen)
    event.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(gen)


def test_new_keys_are_bound_and_documented(make_napari_viewer):
    truth = discs()
    _, gt, _ = setup(make_napari_viewer, truth, truth)
    for key in ("A", "O", ".", ",", "Q"):
        assert coerce_keybinding(key) in gt.keymap
    described = {k for k, _, _ in KEY_BINDINGS}
    assert {"A", "O", ".", ",", "Q"} <= described
    assert len(described) == len(KEY_BINDINGS)


@pytest.mark.parametrize("source", ["maps", "image"])
def test_add_key_grows_the_missed_nucleus_in_one_undo_step(make_napari_viewer, source):
    truth = discs()
    pred = truth.copy()
    pred[pred == 2] = 0
    viewer, gt, editor = setup(
        make_napari_viewer, pred, truth, with_maps=source == "maps", with_image=source == "image"
    )
    before = np.array(gt.data, copy=True)
    press(viewer, gt, "A", at=(45, 60))
    assert iou(np.asarray(gt.data) == 4, truth == 2) >= 0.8
    assert editor.status[4] == "edited" and editor.status[1] == "predicted"
    assert "from the " + ("model maps" if source == "maps" else "image") in viewer.status
    gt.undo()
    np.testing.assert_array_equal(gt.data, before)
    assert 4 not in editor.status


def test_refine_grow_shrink_keys_are_one_undo_step_each(make_napari_viewer):
    truth = discs()
    loose = truth.copy()
    loose[(ndi.distance_transform_edt(truth != 1) <= 3) & (truth == 0)] = 1
    viewer, gt, editor = setup(make_napari_viewer, loose, truth)
    start = np.array(gt.data, copy=True)
    press(viewer, gt, "O", at=(40, 40))
    refined = np.array(gt.data, copy=True)
    assert iou(refined == 1, truth == 1) > iou(start == 1, truth == 1) + 0.2
    np.testing.assert_array_equal(refined == 2, start == 2)
    assert editor.status[1] == "edited" and editor.status[3] == "predicted"
    press(viewer, gt, ".", at=(80, 60))
    grown = np.array(gt.data, copy=True)
    assert (grown == 3).sum() > (refined == 3).sum() and editor.status[3] == "edited"
    press(viewer, gt, ",", at=(80, 60))
    press(viewer, gt, ",", at=(80, 60))
    assert (np.asarray(gt.data) == 3).sum() < (refined == 3).sum()
    gt.undo()  # each key is one step: two undos take back the two shrinks
    gt.undo()
    np.testing.assert_array_equal(gt.data, grown)
    gt.undo()
    np.testing.assert_array_equal(gt.data, refined)
    gt.undo()
    np.testing.assert_array_equal(gt.data, start)


def test_split_key_with_two_clicks_uses_the_maps(make_napari_viewer):
    truth = discs((60, 80), ((30, 28), (30, 50)), 13)
    merged = np.where(truth > 0, 3, 0).astype(np.int32)
    viewer, gt, editor = setup(make_napari_viewer, merged, truth)
    before = np.array(gt.data, copy=True)
    press(viewer, gt, "K")
    callback = gt.mouse_drag_callbacks[-1]
    for seed in ((30, 28), (30, 60)):  # the second seed near the far edge
        click(gt, seed, callback)
    data = np.asarray(gt.data)
    area = (merged > 0).sum()
    assert (data == 3).sum() >= 0.35 * area and (data == 4).sum() >= 0.35 * area
    assert iou(data == 3, truth == 1) >= 0.9
    assert editor.status[3] == "edited" and editor.status[4] == "edited"
    assert editor.split_mode and callback in gt.mouse_drag_callbacks  # on for the next cut
    press(viewer, gt, "Escape")
    assert not editor.split_mode and callback not in gt.mouse_drag_callbacks
    assert coerce_keybinding("Escape") not in gt.keymap
    gt.undo()
    np.testing.assert_array_equal(gt.data, before)


def drag(gt, points, callback) -> None:
    """A mouse drag through ``points`` (data row, col) via a drag callback."""
    event = SimpleNamespace(position=gt.data_to_world(points[0]), type="mouse_press")
    gen = callback(gt, event)
    next(gen)
    for point in points[1:]:
        event.type, event.position = "mouse_move", gt.data_to_world(point)
        next(gen)
    event.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(gen)


def test_split_mode_stays_on_for_several_cuts(make_napari_viewer):
    """A cluster of three merged nuclei: K, two cut lines, each its own undo step."""
    truth = discs((60, 110), ((30, 22), (30, 55), (30, 88)), 17)
    merged = np.where(truth > 0, 5, 0).astype(np.int32)
    viewer, gt, editor = setup(make_napari_viewer, merged, truth, with_maps=False)
    before = np.array(gt.data, copy=True)
    press(viewer, gt, "K")
    callback = gt.mouse_drag_callbacks[-1]
    drag(gt, [(5, 38), (30, 38), (55, 38)], callback)
    after_one = np.array(gt.data, copy=True)
    assert len(np.unique(after_one)) == 3 and editor.split_mode
    drag(gt, [(5, 72), (30, 72), (55, 72)], callback)
    data = np.asarray(gt.data)
    assert len(np.unique(data)) == 4 and editor.split_mode
    owners = set()
    for k in (1, 2, 3):  # each disc is (all but the cut line) a piece of its own now
        ids, n = np.unique(data[truth == k], return_counts=True)
        assert n.max() >= 0.9 * n.sum()
        owners.add(int(ids[n.argmax()]))
    assert len(owners) == 3
    press(viewer, gt, "O", at=(30, 22))  # a one-key action keeps the mode on
    assert editor.split_mode and callback in gt.mouse_drag_callbacks
    press(viewer, gt, "Q")  # another mode ends it
    assert not editor.split_mode and callback not in gt.mouse_drag_callbacks
    assert editor.polygon_mode
    press(viewer, gt, "N")  # and so does the brush
    assert not editor.polygon_mode and gt.mode == "paint"
    assert editor._polygon_mouse not in gt.mouse_drag_callbacks
    # napari's own tools end a mode too: a drag must never both paint and cut
    for key, tool in (("K", "erase"), ("J", "fill"), ("Q", "paint")):
        gt.mode = "pan_zoom"
        press(viewer, gt, key)
        assert editor.split_mode or editor.join_mode or editor.polygon_mode
        gt.mode = tool
        assert not (editor.split_mode or editor.join_mode or editor.polygon_mode)
        assert not {editor._split_mouse, editor._join_mouse, editor._polygon_mouse} & set(
            gt.mouse_drag_callbacks
        )
        assert gt.mouse_pan is False and f"napari's {tool} tool" in viewer.status
    # a mode chosen on a hidden layer shows it first: napari's tool, remembered while it
    # was hidden, does not come back at the first edit and end the mode
    gt.mode = "paint"
    gt.visible = False
    press(viewer, gt, "Q")
    assert gt.visible and editor.polygon_mode and gt.mode == "pan_zoom"
    before_dot = np.array(gt.data, copy=True)
    press(viewer, gt, ".", at=(30, 22))
    assert not np.array_equal(gt.data, before_dot)  # an edit (it shows the layer)
    assert editor.polygon_mode and gt.mode == "pan_zoom"
    press(viewer, gt, "Escape")
    while not np.array_equal(gt.data, after_one):  # O (if it changed anything), then a cut
        gt.undo()
    gt.undo()
    np.testing.assert_array_equal(gt.data, before)


def test_outline_mode_clicks_enter_and_escape(make_napari_viewer):
    truth = discs()
    viewer, gt, editor = setup(make_napari_viewer, truth, truth, with_maps=False)
    before = np.array(gt.data, copy=True)
    press(viewer, gt, "Q")
    assert editor.polygon_mode and gt.mouse_pan is False
    assert editor.busy is None  # the mode alone: a re-run may go ahead
    assert gt.cursor == "crosshair"  # the mode shows
    callback = gt.mouse_drag_callbacks[-1]
    for corner in ((95, 5), (95, 30), (115, 30), (115, 5)):
        click(gt, corner, callback)
    assert "outline is in progress" in editor.busy
    assert len(editor.polygon_points) == 4
    press(viewer, gt, "Enter")
    assert editor.polygon_mode and not editor.polygon_points  # on for the next outline
    assert "press Q or Escape to finish" in viewer.status
    new = np.asarray(gt.data) == 4
    assert new[95:116, 5:31].all() and new.sum() == 21 * 26
    assert editor.status[4] == "edited"
    press(viewer, gt, "D", at=(105, 20))  # one-key actions work in the mode
    assert not (np.asarray(gt.data) == 4).any() and editor.polygon_mode
    gt.undo()
    space = gt.keymap[coerce_keybinding("Space")](gt)  # held: the mouse pans
    next(space)
    assert gt.mouse_pan is True and callback not in gt.mouse_drag_callbacks
    with pytest.raises(StopIteration):  # released: it draws again
        next(space)
    assert gt.mouse_pan is False and callback in gt.mouse_drag_callbacks
    press(viewer, gt, "Q")  # Q again ends the mode
    assert not editor.polygon_mode and coerce_keybinding("Enter") not in gt.keymap
    assert coerce_keybinding("Space") not in gt.keymap and gt.cursor == "standard"
    assert callback not in gt.mouse_drag_callbacks and gt.mouse_pan is True
    gt.undo()
    np.testing.assert_array_equal(gt.data, before)
    # Escape cancels without a change; a lasso (drag) finishes at once
    press(viewer, gt, "Q")
    click(gt, (100, 100), gt.mouse_drag_callbacks[-1])
    press(viewer, gt, "Escape")
    assert not editor.polygon_mode and coerce_keybinding("Escape") not in gt.keymap
    np.testing.assert_array_equal(gt.data, before)
    press(viewer, gt, "Q")
    lasso = gt.mouse_drag_callbacks[-1]
    event = SimpleNamespace(position=gt.data_to_world((100, 90)), type="mouse_press")
    gen = lasso(gt, event)
    next(gen)
    for point in ((100, 110), (115, 110), (115, 90)):
        event.type, event.position = "mouse_move", gt.data_to_world(point)
        next(gen)
    event.type = "mouse_release"
    with pytest.raises(StopIteration):
        next(gen)
    assert editor.polygon_mode and (np.asarray(gt.data)[101:115, 91:110] == 4).all()
    press(viewer, gt, "Escape")
    assert not editor.polygon_mode and gt.mouse_pan is True


def test_refusals_change_nothing_and_say_why(make_napari_viewer, warnings):
    truth = discs()
    pred = truth.copy()
    pred[pred == 2] = 0
    pred[110, 110] = 9  # a one-pixel nucleus
    viewer, gt, editor = setup(make_napari_viewer, pred, truth)
    widget = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Evaluate")
    widget._gt.value = gt
    widget._attach_ground_truths()
    before = np.array(gt.data, copy=True)
    press(viewer, gt, "A", at=(5, 5))  # background
    assert "no nucleus under the click" in warnings[-1]
    assert warnings[-1] in viewer.status and widget._status.value == warnings[-1]
    press(viewer, gt, "O", at=(5, 5))
    assert "no nucleus under the cursor" in warnings[-1]
    press(viewer, gt, ",", at=(110, 110))
    assert "too small to shrink" in warnings[-1]
    press(viewer, gt, "K")  # a split of the one-pixel nucleus
    for seed in ((110, 110), (110, 110)):
        click(gt, seed, gt.mouse_drag_callbacks[-1])
    assert "too small to split" in warnings[-1]
    assert editor.split_mode  # the mode stays on for the next cut
    click(gt, (45, 60), gt.mouse_drag_callbacks[-1])  # one seed: a split in progress
    press(viewer, gt, "A", at=(45, 60))
    assert "finish the split first" in warnings[-1]
    press(viewer, gt, "Q")
    assert "finish the split first" in warnings[-1] and not editor.polygon_mode
    press(viewer, gt, "K")
    assert not editor.split_mode
    press(viewer, gt, "Q")
    click(gt, (45, 60), gt.mouse_drag_callbacks[-1])  # a corner: an outline in progress
    press(viewer, gt, "K")
    assert "finish the outline first" in warnings[-1] and not editor.split_mode
    press(viewer, gt, ".", at=(45, 60))
    assert "finish the outline first" in warnings[-1]
    press(viewer, gt, "Escape")
    press(viewer, gt, "Q")
    press(viewer, gt, "Enter")  # no corners yet: refused, still outlining
    assert "three points" in warnings[-1] and editor.polygon_mode
    press(viewer, gt, "Escape")
    np.testing.assert_array_equal(gt.data, before)
    assert set(editor.status.values()) == {"predicted"}


def test_tools_without_maps_or_image_refuse(make_napari_viewer, warnings):
    truth = discs()
    pred = truth.copy()
    pred[pred == 2] = 0
    viewer, gt, _ = setup(make_napari_viewer, pred, truth, with_maps=False)
    before = np.array(gt.data, copy=True)
    press(viewer, gt, "A", at=(40, 64))
    assert "no model maps and no image" in warnings[-1]
    press(viewer, gt, "O", at=(40, 40))
    assert "no model maps and no image" in warnings[-1]
    np.testing.assert_array_equal(gt.data, before)


def lasso(gt, points) -> None:
    """A drag through ``points`` (data row, col) with the outline mode's mouse callback."""
    drag(gt, points, gt.mouse_drag_callbacks[-1])


def ring(centre, radius, n=40) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return [(centre[0] + radius * np.sin(a), centre[1] + radius * np.cos(a)) for a in t]


def test_outline_key_redraws_the_nucleus_under_it_in_one_undo_step(make_napari_viewer):
    truth = discs()
    loose = truth.copy()
    loose[(ndi.distance_transform_edt(truth != 3) <= 4) & (truth == 0)] = 3  # too wide
    viewer, gt, editor = setup(make_napari_viewer, loose, truth, with_maps=False)
    before = np.array(gt.data, copy=True)
    press(viewer, gt, "Q")
    lasso(gt, ring((80, 60), 11))
    data = np.asarray(gt.data)
    assert iou(data == 3, truth == 3) >= 0.9 and 4 not in editor.status  # the same id
    np.testing.assert_array_equal(data == 1, before == 1)
    assert editor.status[3] == "edited" and editor.status[1] == "predicted"
    assert viewer.status.startswith("Nucleus 3 redrawn.")
    gt.undo()
    np.testing.assert_array_equal(gt.data, before)


def test_outline_key_takes_a_hidden_nucleus_from_unverified_neighbours_only(
    make_napari_viewer,
):
    truth = discs()
    over = truth.copy()
    over[over == 2] = 1  # nucleus 2 hidden under nucleus 1's over-large outline...
    over[(truth == 2) & (np.arange(120) > 66)] = 0  # ...which covers most of it
    viewer, gt, editor = setup(make_napari_viewer, over, truth, with_maps=False)
    before = np.array(gt.data, copy=True)
    press(viewer, gt, "W", at=(40, 40))  # nucleus 1 verified: Q takes none of its pixels
    press(viewer, gt, "Q")
    lasso(gt, ring((40, 64), 11))
    data = np.asarray(gt.data)
    np.testing.assert_array_equal(data == 1, before == 1)
    assert "new nucleus 4" in viewer.status.lower() and "nucleus 1 kept its pixels" in viewer.status
    gt.undo()
    press(viewer, gt, "W", at=(40, 40))  # unmarked: predicted again
    assert editor.status[1] == "predicted" and editor.polygon_mode  # Q is still on
    lasso(gt, ring((40, 64), 11))
    data = np.asarray(gt.data)
    assert iou(data == 4, truth == 2) >= 0.9 and iou(data == 1, truth == 1) >= 0.9
    taken = int(((before == 1) & (data == 4)).sum())
    assert viewer.status.startswith(f"New nucleus 4; took {taken} px from nucleus 1.")
    # the drawn nucleus is edited; the neighbour only lost pixels: still to be reviewed
    assert editor.status[4] == "edited" and editor.status[1] == "predicted"
    assert ndi.label(data == 1)[1] == 1
    gt.undo()
    np.testing.assert_array_equal(gt.data, before)


def test_join_mode_makes_split_pieces_one_nucleus(make_napari_viewer, warnings):
    """J + one drag across the pieces of a split nucleus; thin gaps close; one undo step."""
    truth = discs((60, 80), ((30, 40),), 16)
    pred = np.where(truth > 0, 3, 0).astype(np.int32)
    pred[:, 40:] = np.where(truth[:, 40:] > 0, 4, 0)  # the prediction split it in two ...
    pred[:, 40] = 0  # ... with a one-pixel line between the pieces
    viewer, gt, editor = setup(make_napari_viewer, pred, truth, with_maps=False)
    before = np.array(gt.data, copy=True)
    press(viewer, gt, "J")
    assert editor.join_mode
    callback = gt.mouse_drag_callbacks[-1]
    drag(gt, [(30, 30), (30, 50)], callback)
    data = np.asarray(gt.data)
    assert set(np.unique(data)) == {0, 3} and iou(data == 3, truth == 1) > 0.97
    assert editor.status[3] == "edited" and editor.join_mode  # on for the next stroke
    drag(gt, [(5, 5), (5, 20)], callback)  # over background only: a message, no change
    assert "touches 0" in warnings[-1]
    press(viewer, gt, "Escape")
    assert not editor.join_mode and callback not in gt.mouse_drag_callbacks
    gt.undo()
    np.testing.assert_array_equal(gt.data, before)
