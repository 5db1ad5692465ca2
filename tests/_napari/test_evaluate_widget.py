"""The Evaluate widget and the ground-truth editing glue, on a real viewer."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from napari.utils.key_bindings import coerce_keybinding
from scipy import ndimage as ndi

from conftest import disk_labels
from napari_medinst import metrics
from napari_medinst import recovery as recovery_module
from napari_medinst._io import write_tiff
from napari_medinst._napari import _editing as editing_glue
from napari_medinst._napari import _evaluate_widget as EW
from napari_medinst._napari._editing import KEY_BINDINGS, editor_for
from napari_medinst._napari._evaluate_widget import EvaluateWidget
from napari_medinst.editing import OUTCOME_CODES
from napari_medinst.postprocess import Postprocessor, PostprocessParams
from napari_medinst.targets import make_targets

pytestmark = pytest.mark.gui

GT_NAME = "he sample ground truth"


@pytest.fixture(autouse=True)
def recovery(tmp_path, monkeypatch):
    """Never touch the user's real recovery folder."""
    folder = tmp_path / "recovery"
    monkeypatch.setenv(EW.RECOVERY_ENV, str(folder))
    return folder


@pytest.fixture
def notes(monkeypatch):
    """Record the notifications the widget shows instead of showing them."""
    got = {"error": [], "warning": [], "info": []}
    for level in got:
        monkeypatch.setattr(EW, f"show_{level}", lambda msg, level=level: got[level].append(msg))
    return got


def open_he(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medinst", "he")
    return viewer, viewer.layers[GT_NAME]


def perturbed(gt: np.ndarray) -> np.ndarray:
    """A plausible prediction: shifted by a pixel, a few nuclei dropped, two merged."""
    pred = np.roll(gt, 1, axis=1).astype(np.int32)
    ids = np.unique(gt)[1:]
    pred[np.isin(pred, ids[::17])] = 0
    a, b = touching_pair(gt)
    pred[np.roll(gt, 1, axis=1) == b] = a
    return pred


def touching_pair(lab: np.ndarray) -> tuple[int, int]:
    left, right = lab[:, :-1], lab[:, 1:]
    touch = (left != right) & (left > 0) & (right > 0)
    r, c = np.argwhere(touch)[0]
    return int(left[r, c]), int(right[r, c])


def add_prediction(viewer, data, scores=None, name="prediction"):
    layer = viewer.add_labels(data, name=name)
    if scores is not None:
        layer.metadata["scores"] = scores
    return layer


def make_widget(viewer, pred_layer=None, gt_layer=None) -> EvaluateWidget:
    widget = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Evaluate")
    if pred_layer is not None:
        widget._pred.value = pred_layer
    if gt_layer is not None:
        widget._gt.value = gt_layer
    return widget


def wait_evaluated(qtbot, widget, before: int) -> None:
    qtbot.waitUntil(lambda: widget.evaluations > before, timeout=5000)


# ------------------------------------------------------------------------ editing


def nucleus_seeds(lab: np.ndarray, i: int) -> list[tuple[int, int]]:
    """Two pixels of nucleus ``i`` a third of the way in from each end of its long axis."""
    rr, cc = np.nonzero(lab == i)
    coords = np.stack([rr, cc], 1).astype(float)
    centred = coords - coords.mean(0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    proj = centred @ axis
    order = np.argsort(proj)
    return [
        tuple(coords[order[len(order) // 5]].astype(int)),
        tuple(coords[order[-len(order) // 5]].astype(int)),
    ]


def test_paint_merge_split_and_undo_on_the_he_sample(make_napari_viewer):
    viewer, gt = open_he(make_napari_viewer)
    original = np.array(gt.data, copy=True)
    gt.visible = True  # napari refreshes (and reports undo) only for visible layers
    editor = editor_for(viewer, gt)
    assert gt.metadata["ground_truth"] is True
    assert set(editor.status.values()) == {"predicted"}
    assert gt.features["status"].eq("predicted").all() and len(gt.features) == 110

    # paint a new nucleus on the background
    dist = ndi.distance_transform_edt(original == 0)
    r, c = np.unravel_index(np.argmax(dist), dist.shape)
    new_id = editor.paint_new()
    assert new_id == int(original.max()) + 1 and gt.selected_label == new_id
    gt.paint((r, c), new_id)
    assert (gt.data == new_id).sum() > 20
    assert editor.status[new_id] == "edited"

    # merge two touching nuclei: one undoable step
    a, b = touching_pair(original)
    editor.selection = {a, b}
    assert editor.merge_at_cursor()
    assert not (gt.data == max(a, b)).any()
    assert (gt.data == min(a, b)).sum() == (original == a).sum() + (original == b).sum()
    assert editor.status[min(a, b)] == "edited" and max(a, b) not in editor.status

    # split the largest nucleus with two seeds, through the split mode's clicks
    sizes = np.bincount(original.ravel())
    sizes[0] = 0
    big = int(np.argmax(sizes))
    seeds = nucleus_seeds(original, big)
    before_split = np.array(gt.data, copy=True)
    assert editor.toggle_split_mode()
    callback = gt.mouse_drag_callbacks[-1]
    for seed in seeds:
        event = SimpleNamespace(position=gt.data_to_world(seed), type="mouse_press")
        gen = callback(gt, event)
        next(gen)
        event.type = "mouse_release"
        with pytest.raises(StopIteration):
            next(gen)
    assert editor.split_mode  # on for the next cut until K
    assert editor.toggle_split_mode() is False
    assert not editor.split_mode and callback not in gt.mouse_drag_callbacks
    split_ids = np.unique(gt.data[before_split == big])
    assert len(split_ids) == 2 and big in split_ids
    other = int(split_ids[split_ids != big][0])
    assert gt.data[seeds[0]] == big and gt.data[seeds[1]] == other
    assert editor.status[big] == "edited" and editor.status[other] == "edited"

    # undo: split, merge, paint -- one step each
    gt.undo()
    np.testing.assert_array_equal(gt.data, before_split)
    assert other not in editor.status
    gt.undo()
    assert (gt.data == max(a, b)).sum() == (original == max(a, b)).sum()
    assert max(a, b) in editor.status
    gt.undo()
    np.testing.assert_array_equal(gt.data, original)
    assert new_id not in editor.status
    gt.redo()
    assert (gt.data == new_id).any()


def test_key_bindings_act_on_the_nucleus_under_the_cursor(make_napari_viewer):
    viewer, gt = open_he(make_napari_viewer)
    gt.visible = True
    editor = editor_for(viewer, gt)
    keys = {coerce_keybinding(k) for k, _, _ in KEY_BINDINGS}
    assert keys <= set(gt.keymap)
    target = int(np.unique(gt.data)[5])
    r, c = np.argwhere(gt.data == target)[0]
    viewer.cursor.position = tuple(gt.data_to_world((r, c)))

    gt.keymap[coerce_keybinding("W")](gt)
    assert editor.status[target] == "verified"
    assert gt.features.set_index("label").loc[target, "status"] == "verified"
    gt.keymap[coerce_keybinding("C")](gt)
    assert editor.showing_status
    gt.keymap[coerce_keybinding("C")](gt)
    assert not editor.showing_status

    gt.keymap[coerce_keybinding("D")](gt)
    assert not (gt.data == target).any() and target not in editor.status
    gt.undo()
    assert (gt.data == target).any()
    assert editor.status[target] == "verified"  # its status comes back with it

    gt.data_setitem((np.array([0]), np.array([0])), 9999)  # a stray one-pixel fragment
    assert editor.status[9999] == "edited"
    gt.keymap[coerce_keybinding("R")](gt)
    assert gt.data[0, 0] == 0 and 9999 not in editor.status
    sizes = np.bincount(gt.data.ravel())
    assert sizes[sizes > 0][1:].min() >= editor.min_size
    n = len(np.unique(gt.data))
    gt.keymap[coerce_keybinding("Shift-R")](gt)
    assert int(gt.data.max()) == n - 1
    assert editor.status[int(gt.data[r, c])] == "verified"  # carried through the relabel


def test_start_from_prediction_is_a_copy(make_napari_viewer):
    viewer, gt = open_he(make_napari_viewer)
    pred = add_prediction(viewer, perturbed(np.asarray(gt.data)))
    before = np.array(pred.data, copy=True)
    widget = make_widget(viewer, pred_layer=pred)
    layer = widget.start_from_prediction()
    assert layer is not None and layer.metadata["ground_truth"] is True
    assert widget._gt.value is layer
    assert not np.shares_memory(layer.data, pred.data)
    editor = editor_for(viewer, layer)
    target = int(np.unique(layer.data)[3])
    editor.delete_at(tuple(np.argwhere(layer.data == target)[0]))
    assert not (layer.data == target).any()
    np.testing.assert_array_equal(pred.data, before)
    assert "ground_truth" not in pred.metadata


def test_mode_buttons_turn_the_editor_modes_on_and_off(make_napari_viewer):
    from qtpy.QtWidgets import QPushButton

    viewer, gt = open_he(make_napari_viewer)
    pred = add_prediction(viewer, perturbed(np.asarray(gt.data)))
    widget = make_widget(viewer, pred_layer=pred)
    layer = widget.start_from_prediction()
    editor = editor_for(viewer, layer)
    buttons = {b.text(): b for b in widget.native.findChildren(QPushButton)}
    buttons["Outline mode (Q)"].click()
    assert editor.polygon_mode
    buttons["Split mode (K)"].click()  # another mode ends it
    assert editor.split_mode and not editor.polygon_mode
    buttons["Split mode (K)"].click()
    assert not editor.split_mode and layer.mouse_pan is True


def test_ground_truth_started_from_an_annotation_is_not_named_twice(make_napari_viewer):
    """Starting from the sample's annotation ("he sample ground truth") used to give
    "he sample ground truth ground truth"."""
    viewer, gt = open_he(make_napari_viewer)
    widget = make_widget(viewer, pred_layer=gt)
    layer = widget.start_from_prediction()
    assert layer.name == f"{gt.name} (2)"
    assert "ground truth ground truth" not in layer.name


# ------------------------------------------------------------------------ numbers


@pytest.mark.parametrize("score_form", ["array", "dict", "features", None])
def test_widget_numbers_equal_metrics_evaluate(make_napari_viewer, score_form):
    viewer, gt = open_he(make_napari_viewer)
    pred_data = perturbed(np.asarray(gt.data))
    ids = np.unique(pred_data)[1:]
    rng = np.random.default_rng(0)
    by_id = {int(i): float(s) for i, s in zip(ids, rng.uniform(size=ids.size), strict=True)}
    pred = add_prediction(viewer, pred_data)
    if score_form == "array":  # entry k is the score of id k + 1
        arr = np.zeros(int(ids.max()))
        arr[ids - 1] = [by_id[int(i)] for i in ids]
        pred.metadata["scores"] = arr
    elif score_form == "dict":
        pred.metadata["scores"] = by_id
    elif score_form == "features":
        pred.features = {"label": ids, "score": [by_id[int(i)] for i in ids]}
    widget = make_widget(viewer, pred, gt)
    result = widget.evaluate_now()
    assert result is not None
    want = metrics.evaluate(gt.data, pred_data, scores=by_id if score_form else None)
    assert result.scores.has_scores == (score_form is not None)
    shown = widget.displayed_metrics()
    for attr in ("accuracy", "ap", "precision", "recall", "f1"):
        for t in metrics.THRESHOLDS:
            assert shown[(attr, t)] == f"{getattr(want, attr)[t]:.4f}", (attr, t)
    for attr in ("tp", "fp", "fn"):
        for t in metrics.THRESHOLDS:
            assert shown[(attr, t)] == str(getattr(want, attr)[t])
    for attr in ("map", "pq", "dq", "sq", "aji", "aji_plus", "dice"):
        assert shown[attr] == f"{getattr(want, attr):.4f}", attr
    assert shown["n_gt"] == str(want.n_gt) and shown["n_pred"] == str(want.n_pred)
    counts = metrics.instance_outcomes(metrics.overlap_table(gt.data, pred_data), 0.5).counts
    for key, value in counts.items():
        assert shown[key] == str(value)
    assert counts["fn"] > 0 and counts["tp"] > 0
    assert result.scores.to_dict() == want.to_dict()
    note = widget.ap_note.text()
    assert note.startswith("AP: ") and "AP: AP" not in note  # it once read "AP: AP: ..."
    if score_form is None:
        assert "no confidence scores" in note
    else:
        assert "precision-recall curve" in note


def test_mask_layer_is_an_ignore_mask(make_napari_viewer):
    viewer, gt = open_he(make_napari_viewer)
    pred_data = perturbed(np.asarray(gt.data))
    pred = add_prediction(viewer, pred_data)
    mask = np.zeros(gt.data.shape, np.uint8)
    mask[:200] = 1
    mask_layer = viewer.add_labels(mask, name="mask")
    widget = make_widget(viewer, pred, gt)
    widget._mask.value = mask_layer
    result = widget.evaluate_now()
    want = metrics.evaluate(gt.data, pred_data, ignore_mask=mask.astype(bool))
    assert result.scores.to_dict() == want.to_dict()
    widget._mask_mode.value = "evaluate inside only"
    result = widget.evaluate_now()
    want = metrics.evaluate(gt.data, pred_data, ignore_mask=mask == 0)
    assert result.scores.to_dict() == want.to_dict()


def test_error_overlay_and_review_list_follow_live_edits(make_napari_viewer, qtbot):
    viewer, gt = open_he(make_napari_viewer)
    pred = add_prediction(viewer, np.array(gt.data, dtype=np.int32))
    widget = make_widget(viewer, pred, gt)
    widget.evaluate_now()
    assert widget.result.scores.aji == 1.0 and widget.review_list.count() == 0
    overlay = viewer.layers[f"{GT_NAME} errors"]
    assert set(np.unique(overlay.data)) == {0, OUTCOME_CODES["tp"]}
    assert viewer.layers.selection.active is not overlay

    ids = np.unique(gt.data)[1:]
    gone_gt, gone_pred = int(ids[10]), int(ids[40])
    fp_pixels = np.asarray(gt.data) == gone_gt
    fn_pixels = np.asarray(pred.data) == gone_pred
    editor = editor_for(viewer, gt)
    n = widget.evaluations
    editor.delete_at(tuple(np.argwhere(fp_pixels)[0]))  # gt nucleus deleted -> its prediction is FP
    wait_evaluated(qtbot, widget, n)
    n = widget.evaluations
    pred.data_setitem(np.nonzero(fn_pixels), 0)  # prediction deleted -> its gt nucleus is FN
    wait_evaluated(qtbot, widget, n)

    assert (overlay.data[fp_pixels] == OUTCOME_CODES["fp"]).all()
    assert (overlay.data[fn_pixels] == OUTCOME_CODES["fn"]).all()
    labels = [widget.review_list.item(k).text() for k in range(widget.review_list.count())]
    assert len(labels) == 2
    assert any(t.startswith(f"FP pred {gone_gt}") for t in labels)
    assert any(t.startswith(f"FN gt {gone_pred}") for t in labels)
    # clicking an entry centres the view on it
    k = next(k for k, t in enumerate(labels) if t.startswith("FN"))
    widget._on_review_clicked(widget.review_list.item(k))
    centre = np.argwhere(fn_pixels).mean(0)
    camera = EW._camera(viewer)
    assert np.allclose(camera.center[-2:], centre, atol=3)
    assert camera.zoom > 1


def test_bad_inputs_give_notifications(make_napari_viewer, notes, tmp_path, monkeypatch):
    viewer, gt = open_he(make_napari_viewer)
    widget = make_widget(viewer)
    small = add_prediction(viewer, np.zeros((64, 64), np.int32), name="small")
    widget._pred.value, widget._gt.value = small, gt
    assert widget.evaluate_now() is None
    assert "same shape" in notes["error"][-1] and "64×64" in notes["error"][-1]

    widget._pred.value = widget._gt.value = gt
    assert widget.evaluate_now() is None
    assert "both the prediction and the ground truth" in notes["error"][-1]

    pred = add_prediction(viewer, np.array(gt.data, dtype=np.int32))
    negative = viewer.add_labels(np.full(gt.data.shape, -2, np.int32), name="negative")
    widget._pred.value, widget._gt.value = pred, negative
    assert widget.evaluate_now() is None
    assert "negative" in notes["error"][-1]

    empty = viewer.add_labels(np.zeros(gt.data.shape, np.int32), name="empty")
    widget._gt.value = empty
    assert widget.evaluate_now() is not None
    assert "no nuclei" in notes["warning"][-1]

    widget._gt.value = gt
    monkeypatch.setattr(EW, "MAX_PIXELS", 1000)
    assert widget.evaluate_now() is None
    assert "million pixels" in notes["error"][-1]
    monkeypatch.setattr(EW, "MAX_PIXELS", 10**9)
    monkeypatch.setattr(EW, "LIVE_MAX_PIXELS", 1000)
    n = len(notes["warning"])
    widget._evaluate(live=True)
    assert "live evaluation is off" in notes["warning"][-1] and len(notes["warning"]) == n + 1
    widget._evaluate(live=True)  # the same message is not repeated on every edit
    assert len(notes["warning"]) == n + 1

    import tifffile

    bad = tmp_path / "float.tif"
    tifffile.imwrite(bad, np.full((512, 512), 0.5, np.float32))
    assert widget.load_ground_truth(bad) is None
    assert "integers" in notes["error"][-1]
    n_errors = len(notes["error"])
    assert widget.load_ground_truth(tmp_path / "missing.tif") is None
    assert len(notes["error"]) == n_errors + 1


# ------------------------------------------------------------------------ saving


def test_save_never_overwrites_without_confirmation(make_napari_viewer, tmp_path, notes):
    import tifffile

    viewer, gt = open_he(make_napari_viewer)
    pred = add_prediction(viewer, perturbed(np.asarray(gt.data)))
    widget = make_widget(viewer, pred, gt)
    editor = editor_for(viewer, gt)
    editor.set_status([int(np.unique(gt.data)[1])], "verified")
    assert widget.unsaved_ground_truths() == [GT_NAME]
    asked = []
    widget._confirm_overwrite = lambda paths: asked.append(paths) or False

    path = tmp_path / "gt.tif"
    assert widget.save_ground_truth(path)
    assert not asked and widget.unsaved_ground_truths() == []
    saved = tifffile.imread(path)
    np.testing.assert_array_equal(saved, gt.data)
    status_csv = (tmp_path / "gt_status.csv").read_text()
    assert status_csv.startswith("label,status,labels_sha256\n") and "verified" in status_csv

    target = int(np.unique(gt.data)[2])
    editor.delete_at(tuple(np.argwhere(gt.data == target)[0]))
    assert not widget.save_ground_truth(path)  # declined: file kept
    assert asked and path in asked[-1]
    np.testing.assert_array_equal(tifffile.imread(path), saved)
    assert widget.unsaved_ground_truths() == [GT_NAME]

    widget._confirm_overwrite = lambda paths: True
    assert widget.save_ground_truth(path)
    assert not (tifffile.imread(path) == target).any()

    # reload it: data and status come back
    layer = widget.load_ground_truth(path)
    np.testing.assert_array_equal(layer.data, gt.data)
    assert editor_for(viewer, layer).status == editor.status

    # metrics, status and PR curve exports
    widget._pred.value, widget._gt.value = pred, gt
    widget.evaluate_now()
    assert widget.export_metrics(tmp_path / "scores.csv")
    data = json.loads((tmp_path / "scores.json").read_text())
    assert data["metrics"] == widget.result.scores.to_dict()
    assert "aji," in (tmp_path / "scores.csv").read_text()
    widget._confirm_overwrite = lambda paths: False
    before = (tmp_path / "scores.json").read_bytes()
    assert not widget.export_metrics(tmp_path / "scores.csv")
    assert (tmp_path / "scores.json").read_bytes() == before
    assert widget.export_pr_curve(tmp_path / "pr.png")
    assert (tmp_path / "pr.png").read_bytes()[:4] == b"\x89PNG"
    assert widget.export_status(tmp_path / "status.csv")


def delete_one(viewer, layer, k: int = 1) -> int:
    """Delete the ``k``-th nucleus of a ground-truth layer with its editor; returns its id."""
    target = int(np.unique(layer.data)[k])
    editor_for(viewer, layer).delete_at(tuple(np.argwhere(layer.data == target)[0]))
    return target


def test_autosave_and_restore(make_napari_viewer, recovery):
    viewer, gt = open_he(make_napari_viewer)
    original = np.array(gt.data, copy=True)
    widget = make_widget(viewer)
    assert widget._gt.value is gt
    delete_one(viewer, gt, 4)
    edited = np.array(gt.data, copy=True)
    written = widget.autosave_now()
    assert written and written[0].parent == recovery and written[0].exists()
    record = recovery_module.read_record(written[0])
    assert record.changed == 1 and record.source.image_sha256 is not None
    widget._check_recovery()
    assert widget._recovery_offers == []  # this session's own autosave is never offered

    # napari is killed; the same sample opened again in a new session
    viewer.close()
    viewer, gt = open_he(make_napari_viewer)
    np.testing.assert_array_equal(gt.data, original)
    fresh = make_widget(viewer)
    assert fresh.recovery_frame.isVisibleTo(fresh.native)
    assert fresh.recovery_restore.isVisibleTo(fresh.native)
    text = fresh.recovery_label.text()
    assert GT_NAME in text and record.source.origin in text
    assert record.saved in text and "1 changed nucleus" in text
    assert fresh.restore_recovery() == [GT_NAME]
    np.testing.assert_array_equal(gt.data, edited)
    gt.undo()  # the restore is one undoable step
    np.testing.assert_array_equal(gt.data, original)
    gt.redo()
    assert fresh.save_ground_truth(recovery.parent / "saved.tif")
    assert not any(recovery.glob("*.tif"))  # saving removes the recovery copy
    fresh._check_recovery()
    assert fresh._recovery_offers == [] and not fresh.recovery_frame.isVisibleTo(fresh.native)


def test_discarded_autosave_is_never_offered_again(make_napari_viewer, recovery):
    viewer, gt = open_he(make_napari_viewer)
    widget = make_widget(viewer)
    delete_one(viewer, gt)
    [path] = widget.autosave_now()
    viewer.close()
    viewer, gt = open_he(make_napari_viewer)
    widget = make_widget(viewer)
    assert [p for _, p, _ in widget._recovery_offers] == [path]
    widget.discard_recovery()
    assert not path.exists() and not widget.recovery_frame.isVisibleTo(widget.native)
    viewer.close()
    viewer, gt = open_he(make_napari_viewer)
    widget = make_widget(viewer)
    assert widget._recovery_offers == [] and not widget.recovery_frame.isVisibleTo(widget.native)


def two_images(shape=(96, 96)):
    rng = np.random.default_rng(7)
    return rng.integers(0, 255, shape, dtype=np.uint8), rng.integers(0, 255, shape, np.uint8)


def test_autosave_of_image_a_is_never_restored_onto_image_b(
    make_napari_viewer, tmp_path, recovery, notes
):
    """The issue: A's "labels" autosaved, napari killed, B with a "labels" as big opened."""
    img_a, img_b = two_images()
    file_a, file_b = tmp_path / "a" / "labels.tif", tmp_path / "b" / "labels.tif"
    lab_a, lab_b = disk_labels(), disk_labels(centres=((20, 20), (60, 60), (80, 25)))
    write_tiff(file_a, lab_a)
    write_tiff(file_b, lab_b)

    viewer = make_napari_viewer()
    viewer.add_image(img_a, name="image")
    widget = make_widget(viewer)
    a = widget.load_ground_truth(file_a)
    assert a.name == "labels"
    delete_one(viewer, a)
    edited = np.array(a.data)
    [path] = widget.autosave_now()
    record = recovery_module.read_record(path)
    viewer.close()  # killed: nothing saved

    viewer = make_napari_viewer()
    viewer.add_image(img_b, name="image")
    widget = make_widget(viewer)
    b = widget.load_ground_truth(file_b)
    assert b.name == "labels" and b.data.shape == a.data.shape
    assert widget._recovery_offers == []
    assert not widget.recovery_restore.isVisibleTo(widget.native)
    text = widget.recovery_label.text()
    assert "another 'labels'" in text and "a/labels.tif" in text and "not offered" in text
    assert widget.restore_recovery() == []
    # even if an offer were made by mistake, Restore checks the source and refuses
    widget._recovery_offers = [(b, path, record)]
    assert widget.restore_recovery() == []
    assert "not this layer's file or image" in notes["error"][-1]
    np.testing.assert_array_equal(b.data, lab_b)
    assert widget.unsaved_ground_truths() == []
    assert path.exists()  # A's edits are kept for A

    # A itself (same file) gets them back, with what they belong to shown first
    a2 = widget.load_ground_truth(file_a)
    assert [(x, p) for x, p, _ in widget._recovery_offers] == [(a2, path)]
    text = widget.recovery_label.text()
    assert "a/labels.tif" in text and record.saved in text and "1 changed nucleus" in text
    assert widget.restore_recovery() == [a2.name]
    np.testing.assert_array_equal(a2.data, edited)
    np.testing.assert_array_equal(b.data, lab_b)


def test_a_new_ground_truth_is_recovered_only_over_its_own_image(make_napari_viewer, recovery):
    img_a, img_b = two_images()
    pred = disk_labels()

    viewer = make_napari_viewer()
    viewer.add_image(img_a, name="image")
    widget = make_widget(viewer, add_prediction(viewer, pred))
    gt = widget.start_from_prediction()
    delete_one(viewer, gt)
    edited = np.array(gt.data)
    [path] = widget.autosave_now()
    assert "new from prediction 'prediction'" in recovery_module.read_record(path).describe()
    viewer.close()

    # same prediction, same layer name and size, but drawn over another image
    viewer = make_napari_viewer()
    viewer.add_image(img_b, name="image")
    widget = make_widget(viewer, add_prediction(viewer, pred))
    gt = widget.start_from_prediction()
    assert widget._recovery_offers == [] and "not offered" in widget.recovery_label.text()
    # the image it was drawn over comes back: now the autosave is offered
    viewer.layers.remove("image")
    viewer.add_image(img_a, name="image")
    assert [(x, p) for x, p, _ in widget._recovery_offers] == [(gt, path)]
    assert widget.restore_recovery() == [gt.name]
    np.testing.assert_array_equal(gt.data, edited)


def test_crash_between_tiff_and_csv_keeps_the_pair_consistent(
    make_napari_viewer, tmp_path, recovery, notes, monkeypatch
):
    warnings = []
    monkeypatch.setattr(editing_glue, "show_warning", warnings.append)
    viewer, gt = open_he(make_napari_viewer)
    widget = make_widget(viewer)
    editor = editor_for(viewer, gt)
    ids = [int(i) for i in np.unique(gt.data)[1:4]]
    editor.set_status(ids, "verified")
    path = tmp_path / "gt.tif"
    assert widget.save_ground_truth(path)
    old_csv = (tmp_path / "gt_status.csv").read_bytes()

    delete_one(viewer, gt, 1)  # ids[0] is gone
    editor.set_status([ids[1]], "edited")
    new_status = editor.status
    [autosave] = widget.autosave_now()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    widget._confirm_overwrite = lambda paths: True
    monkeypatch.setattr(recovery_module, "write_bytes", crash)
    with pytest.raises(OSError):
        widget.save_ground_truth(path)  # the TIFF is written, the CSV is not
    assert (tmp_path / "gt_status.csv").read_bytes() == old_csv
    assert widget.unsaved_ground_truths() == [GT_NAME] and autosave.exists()

    layer = widget.load_ground_truth(path)
    np.testing.assert_array_equal(layer.data, gt.data)
    assert editor_for(viewer, layer).status == new_status
    assert editor_for(viewer, layer).status[ids[1]] == "edited"  # not the old "verified"
    assert warnings and "gt_status.csv" in warnings[-1] and "ignored" in warnings[-1]


def test_saving_never_deletes_an_earlier_sessions_autosave_still_offered(
    make_napari_viewer, tmp_path, recovery
):
    """The banner hidden ("the autosaves are kept"), the layer edited and saved."""
    viewer, gt = open_he(make_napari_viewer)
    widget = make_widget(viewer)
    delete_one(viewer, gt, 4)
    [earlier] = widget.autosave_now()
    viewer.close()  # killed

    viewer, gt = open_he(make_napari_viewer)
    widget = make_widget(viewer)
    assert [p for _, p, _ in widget._recovery_offers] == [earlier]
    widget.recovery_frame.setVisible(False)  # "Hide"
    delete_one(viewer, gt, 2)
    assert widget.save_ground_truth(tmp_path / "saved.tif")
    assert earlier.exists()  # only Restore or Discard removes it
    assert [p for _, p, _ in widget._recovery_offers] == [earlier]
    delete_one(viewer, gt, 1)
    widget._confirm_overwrite = lambda paths: True
    assert widget.save_ground_truth(tmp_path / "other.tif")  # save as, elsewhere
    assert earlier.exists()
    widget.discard_recovery()
    assert not earlier.exists()


def test_two_layers_of_one_file_keep_their_own_autosaves(make_napari_viewer, tmp_path, recovery):
    file = tmp_path / "labels.tif"
    write_tiff(file, disk_labels(centres=((20, 20), (60, 60), (80, 25), (25, 75))))
    viewer = make_napari_viewer()
    widget = make_widget(viewer)
    a, b = widget.load_ground_truth(file), widget.load_ground_truth(file)
    delete_one(viewer, a, 1)
    delete_one(viewer, b, 2)
    edited_b = np.array(b.data)
    paths = widget.autosave_now()
    assert len(set(paths)) == 2  # neither overwrites the other
    [path_a] = [p for p in paths if recovery_module.read_record(p).layer == a.name]
    [path_b] = [p for p in paths if p != path_a]
    widget._gt.value = a
    widget._confirm_overwrite = lambda paths: True
    assert widget.save_ground_truth(file)
    assert not path_a.exists() and path_b.exists()  # saving a never deletes b's edits
    delete_one(viewer, a, 1)
    assert path_b in widget.autosave_now()  # b is still unsaved: rewritten in place
    [path_a] = set(recovery.glob("*.tif")) - {path_b}
    edited_a = np.array(a.data)
    viewer.close()  # killed

    # a later session is offered both: one per layer of that file, the other waits
    viewer = make_napari_viewer()
    widget = make_widget(viewer)
    first = widget.load_ground_truth(file)
    [(layer, offered, _)] = widget._recovery_offers
    assert layer is first and offered in (path_a, path_b)
    assert "Another autosave of the same source" in widget.recovery_label.text()
    second = widget.load_ground_truth(file)
    offers = {p: x for x, p, _ in widget._recovery_offers}
    assert set(offers) == {path_a, path_b} and offers[offered] is first
    assert offers[({path_a, path_b} - {offered}).pop()] is second
    assert "Another autosave" not in widget.recovery_label.text()
    assert sorted(widget.restore_recovery()) == sorted([first.name, second.name])
    got = {offered: np.array(first.data), ({path_a, path_b} - {offered}).pop(): second.data}
    np.testing.assert_array_equal(got[path_a], edited_a)
    np.testing.assert_array_equal(got[path_b], edited_b)


# ------------------------------------------------------------------------ auto-tune


def test_autotune_improves_and_applies(make_napari_viewer, qtbot, monkeypatch):
    rr, cc = np.mgrid[:160, :160]
    gt_data = np.zeros((160, 160), np.int32)
    k = 0
    for r in range(20, 160, 34):
        for c in range(20, 160, 30):
            k += 1
            gt_data[((rr - r) ** 2 + (cc - c) ** 2 <= 100) & (gt_data == 0)] = k
    t = make_targets(gt_data)
    prob = ndi.gaussian_filter(t.foreground.astype(np.float32), 1.0)
    hv = ndi.gaussian_filter(t.hv, (0, 1, 1)).astype(np.float32)
    pp = Postprocessor(prob, hv, ndi.gaussian_filter(t.contour.astype(np.float32), 1.0))
    bad = PostprocessParams(min_nucleus_size=400)  # removes every nucleus
    res = pp.run(bad)
    viewer = make_napari_viewer()
    gt = viewer.add_labels(gt_data, name="gt", metadata={"ground_truth": True})
    pred = viewer.add_labels(res.labels, name="instances")
    pred.metadata.update(
        {EW.POSTPROCESSOR_KEY: pp, EW.PARAMS_KEY: bad.to_json(), "scores": res.scores}
    )
    monkeypatch.setattr(
        EW, "TUNE_GRID", {"fg_threshold": (0.4, 0.5), "min_nucleus_size": (10, 400)}
    )
    widget = make_widget(viewer, pred, gt)
    widget.tune_objective.setCurrentText("AJI")
    widget.start_autotune()
    # (waiting for the worker's ``finished`` signal could miss one emitted before the
    # wait began; the panel's own state cannot be missed)
    qtbot.waitUntil(lambda: widget._tune_worker is None, timeout=30000)
    params, result, base, best = widget._tuned
    assert base == 0.0 and best > 0.9 and params.min_nucleus_size == 10
    assert widget.tune_apply.isEnabled()
    gt_before = np.array(gt.data, copy=True)
    assert widget.apply_tuned()
    np.testing.assert_array_equal(pred.data, result.labels)
    assert PostprocessParams.from_json(pred.metadata[EW.PARAMS_KEY]) == params
    np.testing.assert_array_equal(gt.data, gt_before)
    assert widget.evaluate_now().scores.aji == pytest.approx(best)


def test_autotune_without_postprocessor_is_explained(make_napari_viewer, notes):
    viewer, gt = open_he(make_napari_viewer)
    pred = add_prediction(viewer, perturbed(np.asarray(gt.data)))
    widget = make_widget(viewer, pred, gt)
    widget._guard(widget.start_autotune)
    assert "Segment widget" in notes["error"][-1]


def test_autotune_can_be_cancelled(make_napari_viewer, qtbot, monkeypatch):
    viewer, gt = open_he(make_napari_viewer)
    t = make_targets(np.asarray(gt.data))
    pp = Postprocessor(t.foreground.astype(np.float32), t.hv)
    res = pp.run()
    pred = viewer.add_labels(res.labels, name="instances")
    pred.metadata[EW.POSTPROCESSOR_KEY] = pp
    monkeypatch.setattr(EW, "TUNE_GRID", {"min_nucleus_size": tuple(range(1, 400))})
    widget = make_widget(viewer, pred, gt)
    widget.start_autotune()
    assert not widget.tune_button.isEnabled() and widget.tune_cancel.isEnabled()
    widget.cancel_autotune()
    qtbot.waitUntil(lambda: widget._tune_worker is None, timeout=30000)
    assert widget._tuned is None and "cancelled" in widget.tune_result.text()
    assert widget.tune_button.isEnabled() and not widget.tune_apply.isEnabled()
    np.testing.assert_array_equal(pred.data, res.labels)


def test_closing_with_unsaved_edits_asks_first(make_napari_viewer):
    from qtpy.QtCore import QEvent

    viewer, gt = open_he(make_napari_viewer)
    widget = make_widget(viewer)
    asked = []
    widget._confirm_discard = lambda names: asked.append(names) or False

    class Close:
        ignored = False

        def type(self):
            return QEvent.Type.Close

        def spontaneous(self):
            return True

        def ignore(self):
            self.ignored = True

    guard = widget._close_guard
    win = viewer.window._qt_window
    assert guard.attached_window() is win  # found once docked
    event = Close()
    assert guard.eventFilter(win, event) is False and not asked  # nothing unsaved
    editor_for(viewer, gt).set_status([int(np.unique(gt.data)[1])], "verified")
    [autosave] = widget.autosave_now()
    event = Close()
    assert guard.eventFilter(win, event) is True and event.ignored
    assert asked == [[GT_NAME]] and autosave.exists()  # not closed: the autosave stays
    widget._confirm_discard = lambda names: True
    assert guard.eventFilter(win, Close()) is False
    # "Close anyway" discards the edits: their autosave goes too and is not rewritten
    assert not autosave.exists() and widget.autosave_now() == []
    editor_for(viewer, gt).set_status([int(np.unique(gt.data)[2])], "verified")
    assert widget.autosave_now() == [autosave]  # edited again (the close did not happen)


def test_choosing_a_segment_output_as_ground_truth_warns(make_napari_viewer, notes):
    viewer, gt = open_he(make_napari_viewer)
    out = viewer.add_labels(np.array(gt.data), name="he instances")
    out.metadata["napari_medinst_role"] = "instances"
    widget = make_widget(viewer)
    widget._gt.value = out
    assert "Start ground truth from prediction" in notes["warning"][-1]


def test_apply_tuned_refuses_when_the_prediction_changed(make_napari_viewer, qtbot, monkeypatch):
    rr, cc = np.mgrid[:120, :120]
    gt_data = np.zeros((120, 120), np.int32)
    for k, (r, c) in enumerate([(30, 30), (30, 80), (80, 50)], start=1):
        gt_data[(rr - r) ** 2 + (cc - c) ** 2 <= 120] = k
    t = make_targets(gt_data)
    pp = Postprocessor(t.foreground.astype(np.float32), t.hv, t.contour.astype(np.float32))
    bad = PostprocessParams(min_nucleus_size=400)
    res = pp.run(bad)
    viewer = make_napari_viewer()
    gt = viewer.add_labels(gt_data, name="gt", metadata={"ground_truth": True})
    pred = viewer.add_labels(res.labels, name="instances")
    pred.metadata.update({EW.POSTPROCESSOR_KEY: pp, EW.PARAMS_KEY: bad.to_json()})
    monkeypatch.setattr(EW, "TUNE_GRID", {"min_nucleus_size": (10, 400)})
    widget = make_widget(viewer, pred, gt)
    widget.start_autotune()
    # (waiting for the worker's ``finished`` signal could miss one emitted before the
    # wait began; the panel's own state cannot be missed)
    qtbot.waitUntil(lambda: widget._tune_worker is None, timeout=30000)
    edited = np.array(pred.data, copy=True)
    edited[:5, :5] = 99  # the user paints while tuning ran
    pred.data = edited
    with pytest.raises(EW._Problem, match="changed since auto-tune started"):
        widget.apply_tuned()
    np.testing.assert_array_equal(pred.data, edited)


def test_live_refresh_without_edits_keeps_the_result(make_napari_viewer, qtbot, notes):
    viewer, gt = open_he(make_napari_viewer)
    pred = add_prediction(viewer, perturbed(np.asarray(gt.data)))
    widget = make_widget(viewer, pred, gt)
    first = widget.evaluate_now().scores.aji
    pred.refresh()  # a redraw, not an edit: the pixels are compared, nothing recomputed
    before = widget.evaluations
    qtbot.wait(400)
    assert widget.result is not None and widget.result.scores.aji == first
    assert widget.evaluations >= before
    assert not notes["error"]


def test_switching_the_ground_truth_removes_the_old_error_overlay(make_napari_viewer):
    """Issue 17, bug 6: the old '<gt> errors' layer stayed on top of the new one."""
    viewer, gt = open_he(make_napari_viewer)
    pred = add_prediction(viewer, perturbed(np.asarray(gt.data)))
    other = viewer.add_labels(
        np.roll(np.asarray(gt.data), 2, axis=0), name="other gt", metadata={"ground_truth": True}
    )
    widget = make_widget(viewer, pred, gt)
    widget.evaluate_now()
    assert f"{GT_NAME} errors" in viewer.layers
    widget._gt.value = other
    widget.evaluate_now()
    overlays = [x.name for x in viewer.layers if x.metadata.get("napari_medinst_role") == "errors"]
    assert overlays == ["other gt errors"]
    widget._gt.value = None
    assert not [x for x in viewer.layers if x.metadata.get("napari_medinst_role") == "errors"]


def test_prediction_is_outlined_while_the_error_overlay_is_shown(make_napari_viewer):
    """Issue 17: filled prediction colours collided with the outcome colours."""
    viewer, gt = open_he(make_napari_viewer)
    pred = add_prediction(viewer, perturbed(np.asarray(gt.data)))
    pred.contour = 1
    widget = make_widget(viewer, pred, gt)
    widget.evaluate_now()
    assert pred.contour == EW.PREDICTION_OUTLINE
    assert gt.contour == 0  # the ground truth is left as it is
    widget._show_overlay.setChecked(False)
    assert pred.contour == 1
    widget._show_overlay.setChecked(True)
    widget.evaluate_now()
    assert pred.contour == EW.PREDICTION_OUTLINE
    viewer.layers.remove(viewer.layers[f"{GT_NAME} errors"])
    assert pred.contour == 1


def test_outlines_move_with_the_chosen_prediction(make_napari_viewer):
    viewer, gt = open_he(make_napari_viewer)
    first = add_prediction(viewer, perturbed(np.asarray(gt.data)), name="first")
    second = add_prediction(viewer, np.asarray(gt.data, dtype=np.int32), name="second")
    widget = make_widget(viewer, first, gt)
    widget.evaluate_now()
    assert first.contour == EW.PREDICTION_OUTLINE
    widget._pred.value = second
    widget.evaluate_now()
    assert (first.contour, second.contour) == (0, EW.PREDICTION_OUTLINE)
    widget.close()
    widget._on_destroyed()
    assert second.contour == 0


def test_verified_true_positives_stay_untinted_in_the_overlay(make_napari_viewer):
    """Issue 17: the green TP tint hid the green 'verified' review colour."""
    viewer, gt = open_he(make_napari_viewer)
    data = np.asarray(gt.data)
    ids = np.unique(data)[1:]
    verified_tp, verified_fn = int(ids[3]), int(ids[5])
    pred_data = data.astype(np.int32)
    pred_data[data == verified_fn] = 0
    pred = add_prediction(viewer, pred_data)
    editor_for(viewer, gt).set_status([verified_tp, verified_fn], "verified")
    widget = make_widget(viewer, pred, gt)
    widget.evaluate_now()
    overlay = np.asarray(viewer.layers[f"{GT_NAME} errors"].data)
    assert (overlay[data == verified_tp] == 0).all()
    assert (overlay[data == verified_fn] == OUTCOME_CODES["fn"]).all()  # errors still shown
    assert (overlay[data == int(ids[4])] == OUTCOME_CODES["tp"]).all()
