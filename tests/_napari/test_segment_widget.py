"""The "Segment nuclei" widget, driven like a user: run, tune, edit markers, cancel, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_medinst._napari import _segment_widget as sw
from napari_medinst._napari._segment_widget import SegmentWidget
from napari_medinst.model.inference import DEFAULT_TTA
from napari_medinst.postprocess import PostprocessParams
from napari_medinst.targets import hv_gradient_magnitude

pytestmark = pytest.mark.gui

IMAGE = "he sample"
RUN_TIMEOUT = 60_000


class Notes:
    """Captures the widget's notifications instead of showing them."""

    def __init__(self, monkeypatch):
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.infos: list[str] = []
        monkeypatch.setattr(sw, "show_error", self.errors.append)
        monkeypatch.setattr(sw, "show_warning", self.warnings.append)
        monkeypatch.setattr(sw, "show_info", self.infos.append)


@pytest.fixture
def notes(monkeypatch) -> Notes:
    return Notes(monkeypatch)


@pytest.fixture
def maps_calls(monkeypatch) -> list[tuple]:
    """Counts calls of the maps computation (the network / classical segmenter)."""
    calls: list[tuple] = []
    real = sw.compute_maps

    def counting(image, model, **kw):
        calls.append((image.shape, model, kw.get("pixel_size"), kw.get("tta")))
        return real(image, model, **kw)

    monkeypatch.setattr(sw, "compute_maps", counting)
    return calls


@pytest.fixture
def tiny_model(tmp_path):
    from napari_medinst.model.folder import save_model_folder
    from napari_medinst.model.network import NetConfig, NucleusNet

    return save_model_folder(tmp_path / "tiny", NucleusNet(NetConfig(widths=(8, 16, 16))))


def make_widget(make_napari_viewer, *, sample: str | None = "he", show: bool = False):
    """A viewer with the widget docked from the plugin menu (as a user opens it)."""
    viewer = make_napari_viewer(show=show)
    if sample:
        viewer.open_sample("napari-medinst", sample)
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-medinst", "Segment nuclei")
    assert isinstance(widget, SegmentWidget)
    return viewer, widget


def shown(w) -> bool:
    """Not hidden (``.visible`` is False for every widget while the viewer is not shown)."""
    return not w.native.isHidden()


def idle(widget) -> bool:
    return widget._job is None and not widget._tune_timer.isActive() and not widget._pending


def run(qtbot, widget, model: str = "classical", timeout: int = RUN_TIMEOUT) -> None:
    widget._model.value = model
    widget._run.native.click()
    qtbot.waitUntil(lambda: idle(widget), timeout=timeout)


def instances(viewer, name: str = f"{IMAGE} instances"):
    return viewer.layers[name]


def same_nuclei(a: np.ndarray, b: np.ndarray) -> bool:
    """The same nuclei, pixel for pixel, whatever their ids (one id of ``a`` per id of ``b``)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return pairs.shape[1] == len(np.unique(a[a > 0])) == len(np.unique(b[b > 0]))


def settle(qtbot, widget) -> None:
    qtbot.wait(5)
    qtbot.waitUntil(lambda: idle(widget), timeout=RUN_TIMEOUT)


# ----------------------------------------------------------------------------- running


def test_run_classical_writes_every_layer(make_napari_viewer, qtbot, notes):
    viewer, widget = make_widget(make_napari_viewer)
    image = viewer.layers[IMAGE]
    assert widget._image_layer.value is image
    assert widget._pixel_size.value == pytest.approx(0.25)  # from the sample's metadata
    assert widget._modality.value == "he"
    widget._show_maps.value = True
    run(qtbot, widget)
    assert not notes.errors
    labels = instances(viewer)
    assert labels.data.dtype == np.uint32
    assert labels.data.shape == image.data.shape[:2]
    n = int(labels.data.max())
    assert n > 20
    assert set(np.unique(labels.data)) == set(range(n + 1))
    names = {layer.name for layer in viewer.layers}
    for suffix in (
        "contours",
        "nuclear probability",
        "HV maps (horizontal)",
        "HV maps (vertical)",
        "HV gradient",
        "HV energy",
        "markers",
    ):
        assert f"{IMAGE} {suffix}" in names
    gradient = viewer.layers[f"{IMAGE} HV gradient"]
    assert not gradient.visible
    # the magnitude of the HV layers' gradients at the Sobel size in use (40x: 5 -> 9)
    hv = np.stack(
        [viewer.layers[f"{IMAGE} HV maps ({d})"].data for d in ("horizontal", "vertical")]
    )
    size = PostprocessParams(sobel_size=widget._sobel_size.value).scaled_to(0.25).sobel_size
    np.testing.assert_allclose(gradient.data, hv_gradient_magnitude(hv, size), atol=1e-6)
    assert f"{IMAGE} types" not in names  # the classical model has no types
    assert not viewer.layers[f"{IMAGE} HV energy"].visible
    assert not viewer.layers[f"{IMAGE} nuclear probability"].visible
    # contours carry the instance ids on the boundaries only
    contours = viewer.layers[f"{IMAGE} contours"].data
    assert 0 < np.count_nonzero(contours) < np.count_nonzero(labels.data)
    assert np.all(contours[contours > 0] == labels.data[contours > 0])
    # parameters and scores travel with the layer
    params = PostprocessParams.from_json(labels.metadata["postprocess_params"])
    assert params == widget._read_params()
    assert len(labels.metadata["scores"]) == n
    assert list(labels.features["label"]) == list(range(1, n + 1))
    assert labels.features["score"].between(0, 1).all()
    # one marker per seeded nucleus (a nucleus without a seed seeds itself)
    assert n // 2 < len(viewer.layers[f"{IMAGE} markers"].data) <= n + 5
    # energy is the watershed's flood surface
    energy = viewer.layers[f"{IMAGE} HV energy"].data
    assert energy.shape == labels.data.shape and 0 <= energy.min() <= energy.max() <= 1
    assert "nuclei" in widget._status.value


def test_result_is_drawn_on_the_canvas(make_napari_viewer, qtbot, notes):
    viewer, widget = make_widget(make_napari_viewer, show=True)
    run(qtbot, widget)
    labels = instances(viewer)
    for layer in viewer.layers:
        layer.visible = layer is labels
    labels.opacity = 1.0
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    coloured = np.any(np.abs(shot - shot[0, 0]) > 30, axis=-1).mean()
    # the nuclei cover part of the tile, and the tile part of the canvas
    nuclear = np.count_nonzero(labels.data) / labels.data.size
    assert 0.2 * nuclear < coloured < nuclear


def test_layers_follow_the_image_scale_and_translate(make_napari_viewer, qtbot, notes):
    viewer, widget = make_widget(make_napari_viewer)
    image = viewer.layers[IMAGE]
    image.scale = (0.5, 0.5)
    image.translate = (10, 20)
    widget._pixel_size.value = 0.25
    widget._show_maps.value = True
    run(qtbot, widget)
    for suffix in ("instances", "contours", "HV energy", "markers"):
        layer = viewer.layers[f"{IMAGE} {suffix}"]
        np.testing.assert_allclose(layer.scale, (0.5, 0.5))
        np.testing.assert_allclose(layer.translate, (10, 20))


def test_tuning_reruns_postprocessing_only(make_napari_viewer, qtbot, notes, maps_calls):
    viewer, widget = make_widget(make_napari_viewer)
    run(qtbot, widget)
    assert len(maps_calls) == 1
    before = instances(viewer).data.copy()
    pp = widget._session.post[()]
    widget._fg_threshold.value = 0.8
    settle(qtbot, widget)
    after = instances(viewer).data
    assert not np.array_equal(before, after)
    assert np.count_nonzero(after) < np.count_nonzero(before)  # stricter foreground
    assert PostprocessParams.from_json(
        instances(viewer).metadata["postprocess_params"]
    ).fg_threshold == pytest.approx(0.8)
    # a late-stage parameter only re-runs the filter stage
    runs = dict(pp.stage_runs)
    widget._min_nucleus_size.value = 200
    settle(qtbot, widget)
    assert pp.stage_runs["filter"] == runs["filter"] + 1
    assert pp.stage_runs["energy"] == runs["energy"]
    assert pp.stage_runs["foreground"] == runs["foreground"]
    assert len(np.unique(instances(viewer).data)) < len(np.unique(after))  # fewer nuclei
    # every parameter widget drives the result
    for name, value in [
        ("marker_threshold", 0.5),
        ("sobel_size", 7),
        ("contour_weight", 1.0),
        ("smoothing", 1.0),
        ("marker_opening", 2),
        ("min_marker_size", 8),
    ]:
        getattr(widget, f"_{name}").value = value
        settle(qtbot, widget)
        meta = json.loads(instances(viewer).metadata["postprocess_params"])
        assert meta[name] == pytest.approx(value), name
    assert len(maps_calls) == 1, "tuning must never recompute the maps"
    assert not notes.errors


def test_hv_gradient_layer_follows_the_sobel_size_only(make_napari_viewer, qtbot, notes):
    viewer, widget = make_widget(make_napari_viewer)
    widget._show_maps.value = True
    run(qtbot, widget)
    layer = viewer.layers[f"{IMAGE} HV gradient"]
    first = layer.data
    widget._contour_weight.value = 1.0  # changes the energy, not the HV gradient
    settle(qtbot, widget)
    assert layer.data is first
    widget._sobel_size.value = 7
    settle(qtbot, widget)
    hv = np.stack(
        [viewer.layers[f"{IMAGE} HV maps ({d})"].data for d in ("horizontal", "vertical")]
    )
    size = PostprocessParams(sobel_size=7).scaled_to(0.25).sobel_size
    np.testing.assert_allclose(layer.data, hv_gradient_magnitude(hv, size), atol=1e-6)
    assert not notes.errors


def test_rerun_reuses_maps_and_layers(make_napari_viewer, qtbot, notes, maps_calls):
    viewer, widget = make_widget(make_napari_viewer)
    run(qtbot, widget)
    n_layers = len(viewer.layers)
    first = instances(viewer)
    run(qtbot, widget)
    assert len(maps_calls) == 1, "same image + settings: the maps are reused"
    assert len(viewer.layers) == n_layers
    assert instances(viewer) is first
    widget._pixel_size.value = 0.3  # another pixel size: new maps, same layers
    run(qtbot, widget)
    assert len(maps_calls) == 2
    assert len(viewer.layers) == n_layers
    assert instances(viewer) is first


def test_mirror_averaging_is_a_setting_of_its_own(
    make_napari_viewer, qtbot, notes, maps_calls, tiny_model
):
    _viewer, widget = make_widget(make_napari_viewer)
    widget._model.value = sw.CHOOSE_FOLDER
    widget._model_folder.value = str(tiny_model)
    assert widget._tta.value, "mirror averaging is on by default"
    run(qtbot, widget, sw.CHOOSE_FOLDER)
    widget._tta.value = False
    run(qtbot, widget, sw.CHOOSE_FOLDER)
    run(qtbot, widget, sw.CHOOSE_FOLDER)
    assert [c[3] for c in maps_calls] == [DEFAULT_TTA, 1], "TTA maps are computed once, apart"
    assert not notes.errors


def test_even_sobel_size_is_made_odd(make_napari_viewer, qtbot, notes):
    viewer, widget = make_widget(make_napari_viewer)
    run(qtbot, widget)
    widget._sobel_size.value = 6
    settle(qtbot, widget)
    assert widget._sobel_size.value == 7
    assert json.loads(instances(viewer).metadata["postprocess_params"])["sobel_size"] == 7
    assert not notes.errors


# ----------------------------------------------------------------------------- markers


def test_adding_a_marker_splits_a_nucleus(make_napari_viewer, qtbot, notes, maps_calls):
    viewer, widget = make_widget(make_napari_viewer)
    run(qtbot, widget)
    labels = instances(viewer).data.copy()
    markers = viewer.layers[f"{IMAGE} markers"]
    n_before = int(labels.max())
    # the largest nucleus: a seed at its far end, away from its own marker, splits it
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    big = int(sizes.argmax())
    rr, cc = np.nonzero(labels == big)
    centre = np.array([rr.mean(), cc.mean()])
    d = (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2
    far = np.array([rr[d.argmax()], cc[d.argmax()]], float)
    far = centre + 0.8 * (far - centre)
    markers.add(far)
    settle(qtbot, widget)
    after = instances(viewer).data
    assert len(np.unique(after)) - 1 == n_before + 1  # one nucleus more
    assert len(np.unique(after[labels == big])) == 2  # split in two
    # deleting that marker again restores the nucleus
    markers.selected_data = {len(markers.data) - 1}
    markers.remove_selected()
    settle(qtbot, widget)
    assert len(np.unique(instances(viewer).data)) - 1 == n_before
    # the user's markers persist through tuning, until reset
    widget._min_nucleus_size.value = 11
    settle(qtbot, widget)
    assert len(markers.data) == len(widget._session.seeds[()])
    widget._reset_markers.native.click()
    settle(qtbot, widget)
    assert not widget._session.seeds
    assert len(maps_calls) == 1
    assert not notes.errors


def test_moving_a_marker_onto_background_drops_it(make_napari_viewer, qtbot, notes):
    viewer, widget = make_widget(make_napari_viewer)
    run(qtbot, widget)
    markers = viewer.layers[f"{IMAGE} markers"]
    widget._min_nucleus_size.value = 0
    settle(qtbot, widget)
    before = instances(viewer).data.copy()
    # move every marker by a tiny amount: the result is unchanged, now from user seeds
    markers.data = markers.data + 0.01
    markers.events.data(value=markers.data, action="changed", data_indices=(), vertex_indices=((),))
    settle(qtbot, widget)
    assert widget._session.seeds
    assert abs(int(instances(viewer).data.max()) - int(before.max())) <= 2


# ----------------------------------------------------------------------------- edits


def _nucleus_pixel(labels: np.ndarray, i: int) -> tuple[int, int]:
    rc = np.argwhere(labels == i)
    return tuple(int(v) for v in rc[len(rc) // 2])


def _free_disk(labels: np.ndarray, radius: int = 5) -> np.ndarray:
    """A disk of background far from every nucleus (where a user paints a missed one)."""
    from scipy import ndimage

    far = ndimage.distance_transform_edt(labels == 0) > radius + 6
    r, c = np.argwhere(far)[len(np.argwhere(far)) // 2]
    rr, cc = np.mgrid[: labels.shape[0], : labels.shape[1]]
    return (rr - r) ** 2 + (cc - c) ** 2 <= radius**2


def _two_nuclei(labels: np.ndarray) -> tuple[int, int]:
    """Two mid-sized nuclei that do not touch each other."""
    from scipy import ndimage

    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    order = [int(i) for i in np.argsort(sizes)[::-1] if sizes[i]]
    first = order[len(order) // 3]
    near = ndimage.binary_dilation(labels == first, iterations=3)
    second = next(i for i in order[len(order) // 3 + 1 :] if not (near & (labels == i)).any())
    return first, second


def test_rerun_keeps_corrected_nuclei_in_the_same_layer_as_one_undo_step(
    make_napari_viewer, qtbot, notes
):
    """Issue 15.3: delete one nucleus, paint a new one, verify one; a slider move
    re-segments only the rest, in the same layer, and one Ctrl+Z restores the labels."""
    from napari_medinst._napari._editing import editor_for

    viewer, widget = make_widget(make_napari_viewer)
    run(qtbot, widget)
    layer = instances(viewer)
    editor = editor_for(viewer, layer)
    gone, verified = _two_nuclei(np.asarray(layer.data))
    gone_px = np.asarray(layer.data) == gone
    assert editor.delete_at(_nucleus_pixel(layer.data, gone))
    new_id = int(layer.data.max()) + 1
    disk = _free_disk(np.asarray(layer.data))
    layer.data_setitem(np.nonzero(disk), new_id)  # a brush stroke on a missed nucleus
    assert editor.toggle_verified(_nucleus_pixel(layer.data, verified)) == "verified"
    verified_px = np.asarray(layer.data) == verified
    before = layer.data.copy()
    n_layers = len(viewer.layers)

    widget._fg_threshold.value = 0.65
    settle(qtbot, widget)
    after = np.asarray(layer.data)
    assert instances(viewer) is layer and len(viewer.layers) == n_layers
    np.testing.assert_array_equal(after == new_id, disk)  # pixel for pixel, same ids
    np.testing.assert_array_equal(after == verified, verified_px)
    assert not after[gone_px].any(), "the deleted nucleus stays deleted"
    kept = disk | verified_px
    assert (after[~kept] != before[~kept]).any(), "the rest is re-segmented"
    # the result, its surviving nuclei numbered as before (they keep their colours)
    assert same_nuclei(after, widget._session.results[()].labels)
    assert editor.status[verified] == "verified" and editor.status[new_id] == "edited"
    assert "kept 2 corrected nuclei" in widget._status.value
    assert PostprocessParams.from_json(layer.metadata["postprocess_params"]).fg_threshold == 0.65

    layer.undo()  # one step back: the labels as they were before the re-run
    np.testing.assert_array_equal(layer.data, before)
    widget._fg_threshold.value = 0.6  # and the corrections are still kept after the undo
    settle(qtbot, widget)
    np.testing.assert_array_equal(layer.data == new_id, disk)
    np.testing.assert_array_equal(layer.data == verified, verified_px)
    assert not layer.data[gone_px].any()
    assert not notes.errors and not notes.warnings


def test_hand_edits_are_kept_by_run_tune_and_another_model(
    make_napari_viewer, qtbot, notes, maps_calls
):
    """Edits made with napari's own tools (no editor), even without an event, are kept
    exactly by a slider move and by Run with new maps; no '(2)' layer is made."""
    viewer, widget = make_widget(make_napari_viewer)
    run(qtbot, widget)
    layer = instances(viewer)
    layer.paint((5, 5), 999, refresh=True)  # a user's brush stroke
    layer.data[100:110, 100:110] = 7  # e.g. from the console, no event
    painted = layer.data == 999
    console = layer.data == 7  # nucleus 7, with the square added to it
    assert console[100:110, 100:110].all() and console.sum() > 100
    n_layers = len(viewer.layers)
    for change in ("slider", "run"):
        if change == "slider":
            widget._fg_threshold.value = 0.7
            settle(qtbot, widget)
        else:
            widget._pixel_size.value = 0.3  # new maps: the model runs again
            run(qtbot, widget)
        np.testing.assert_array_equal(layer.data == 999, painted, err_msg=change)
        np.testing.assert_array_equal(layer.data == 7, console, err_msg=change)
        assert len(viewer.layers) == n_layers
        assert f"{IMAGE} instances (2)" not in viewer.layers
    assert len(maps_calls) == 2
    ids = layer.features["label"].to_numpy()
    np.testing.assert_array_equal(np.sort(ids), np.unique(layer.data[layer.data > 0]))
    assert {7, 999} <= set(layer.metadata["scores"])
    assert not notes.errors


def test_rerun_while_a_split_is_in_progress_is_refused(make_napari_viewer, qtbot, notes):
    from napari_medinst._napari._editing import editor_for

    viewer, widget = make_widget(make_napari_viewer)
    run(qtbot, widget)
    layer = instances(viewer)
    layer.paint((5, 5), 999, refresh=True)
    before = layer.data.copy()
    editor = editor_for(viewer, layer)
    assert editor.toggle_split_mode()
    editor.add_split_seed((5, 5))  # one seed clicked: a split in progress
    widget._fg_threshold.value = 0.7
    settle(qtbot, widget)
    widget._run.native.click()
    settle(qtbot, widget)
    np.testing.assert_array_equal(layer.data, before)
    assert len(notes.warnings) == 2 and all("split is in progress" in w for w in notes.warnings)
    assert "Not re-run" in widget._status.value
    editor.toggle_split_mode()  # cancelled: the next change re-runs
    widget._fg_threshold.value = 0.72
    settle(qtbot, widget)
    assert not np.array_equal(layer.data, before) and (layer.data[before == 999] == 999).all()


# ----------------------------------------------------------------------------- parameters


def test_params_json_round_trip_and_malformed_file(make_napari_viewer, qtbot, notes, tmp_path):
    viewer, widget = make_widget(make_napari_viewer)
    run(qtbot, widget)
    widget._marker_threshold.value = 0.42
    settle(qtbot, widget)
    out = tmp_path / "params.json"
    widget._save_params.value = out
    saved = PostprocessParams.from_json(out.read_text())
    assert saved.marker_threshold == pytest.approx(0.42)
    assert saved == widget._read_params()
    # the field is emptied after saving, not left showing the current folder
    assert widget._save_params.line_edit.value == ""
    # malformed JSON: an error notification, parameters unchanged, no traceback
    before = widget._read_params()
    for text in (
        "{not json",
        '{"fg_threshold": 2.0}',
        '{"bogus": 1}',
        "[1, 2]",
        '{"sobel_size": 4}',
        '{"fg_threshold": "high"}',
    ):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        widget._load_params.value = bad
        assert widget._read_params() == before
    assert len(notes.errors) == 6
    assert all("bad.json" in e for e in notes.errors)
    widget._load_params.value = tmp_path / "missing.json"
    assert len(notes.errors) == 7
    # a valid file is applied and re-runs the post-processing
    good = tmp_path / "good.json"
    good.write_text(PostprocessParams(fg_threshold=0.65, min_nucleus_size=30).to_json())
    widget._load_params.value = good
    assert widget._fg_threshold.value == pytest.approx(0.65)
    assert widget._min_nucleus_size.value == 30
    settle(qtbot, widget)
    meta = PostprocessParams.from_json(instances(viewer).metadata["postprocess_params"])
    assert meta.fg_threshold == pytest.approx(0.65)
    # reset to the model's defaults
    widget._reset_params.native.click()
    settle(qtbot, widget)
    assert widget._read_params() == PostprocessParams()


# ----------------------------------------------------------------------------- bad input


def test_only_image_layers_are_offered(make_napari_viewer, qtbot, notes):
    viewer, widget = make_widget(make_napari_viewer, sample=None)
    assert widget._image_layer.value is None
    assert shown(widget._no_image)
    widget._run.native.click()
    assert notes.warnings and "No image layer" in notes.warnings[0]
    viewer.add_labels(np.zeros((64, 64), np.uint32), name="some labels")
    viewer.add_points(np.zeros((2, 2)), name="some points")
    assert widget._image_layer.choices == ()
    image = viewer.add_image(np.zeros((64, 64), np.uint8), name="img")
    assert widget._image_layer.choices == (image,)
    assert not shown(widget._no_image)
    image.name = "renamed"
    assert widget._image_layer.native.currentText() == "renamed"


def test_output_image_layers_are_not_offered(make_napari_viewer, qtbot, notes):
    viewer, widget = make_widget(make_napari_viewer)
    run(qtbot, widget)
    assert widget._image_layer.choices == (viewer.layers[IMAGE],)


@pytest.mark.parametrize(
    "image, ok",
    [
        (np.dstack([np.full((96, 96, 3), 200, np.uint8), np.full((96, 96), 255, np.uint8)]), True),
        (np.random.default_rng(0).integers(0, 4000, (96, 96)).astype(np.uint16), True),
        (np.random.default_rng(0).random((96, 96)).astype(np.float32), True),
        (np.zeros((4, 4), np.uint8), False),
        (np.full((64, 64), np.nan, np.float32), False),
    ],
    ids=["rgba", "uint16", "float", "tiny", "nan"],
)
def test_unusual_images_notify(make_napari_viewer, qtbot, notes, image, ok):
    viewer, widget = make_widget(make_napari_viewer, sample=None)
    viewer.add_image(image, name="odd", rgb=image.ndim == 3)
    run(qtbot, widget)
    if ok:
        assert not notes.errors
        assert "odd instances" in viewer.layers
        assert notes.infos  # alpha ignored / intensities normalised
    else:
        assert len(notes.errors) == 1 and "odd" in notes.errors[0]
        assert [layer.name for layer in viewer.layers] == ["odd"]


def test_stack_current_plane_and_all_planes(make_napari_viewer, qtbot, notes, maps_calls):
    from napari_medinst.samples import load_sample

    img, _, _ = load_sample("fluorescence")
    stack = np.stack([img, np.roll(img, 40, axis=0), img[::-1]])
    viewer, widget = make_widget(make_napari_viewer, sample=None)
    viewer.add_image(stack, name="stack")
    assert shown(widget._planes)
    viewer.dims.set_current_step(0, 1)
    run(qtbot, widget)
    labels = viewer.layers["stack instances"].data
    assert labels.shape == stack.shape and labels.dtype == np.uint32
    assert labels[1].max() > 0 and labels[0].max() == 0 and labels[2].max() == 0
    assert len(maps_calls) == 1
    widget._planes.value = sw.ALL_PLANES
    run(qtbot, widget)
    labels = viewer.layers["stack instances"].data
    assert all(labels[k].max() > 0 for k in range(3))
    assert len(maps_calls) == 3  # plane 1 reused
    ids = [set(np.unique(labels[k])) - {0} for k in range(3)]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])  # unique across planes
    feats = viewer.layers["stack instances"].features
    assert len(feats) == labels.max() and set(feats["plane"]) == {"(0,)", "(1,)", "(2,)"}
    widget._fg_threshold.value = 0.7
    settle(qtbot, widget)
    assert len(maps_calls) == 3
    assert viewer.layers["stack markers"].data.shape[1] == 3
    assert not notes.errors


def test_stack_rerun_keeps_corrections_in_every_plane(make_napari_viewer, qtbot, notes):
    from napari_medinst.samples import load_sample

    img, _, _ = load_sample("fluorescence")
    viewer, widget = make_widget(make_napari_viewer, sample=None)
    viewer.add_image(np.stack([img, np.roll(img, 40, axis=0), img[::-1]]), name="stack")
    viewer.dims.set_current_step(0, 1)
    run(qtbot, widget)
    layer = viewer.layers["stack instances"]
    painted = {}
    for plane, new_id in ((0, 4242), (1, 4243)):  # plane 0 has no result yet
        disk = _free_disk(np.asarray(layer.data[plane]))
        layer.data_setitem((np.full(disk.sum(), plane), *np.nonzero(disk)), new_id)
        painted[new_id] = np.zeros(layer.data.shape, bool)
        painted[new_id][plane] = disk

    def check(when: str) -> None:
        for i, mask in painted.items():
            np.testing.assert_array_equal(layer.data == i, mask, err_msg=f"{when}: {i}")
        ids = [set(np.unique(layer.data[k]).tolist()) - {0} for k in range(3)]
        assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2]), when

    widget._fg_threshold.value = 0.7  # tunes plane 1; plane 0 keeps what was painted
    settle(qtbot, widget)
    check("slider")
    widget._planes.value = sw.ALL_PLANES
    run(qtbot, widget)
    check("all planes")
    assert all(layer.data[k].max() > 0 for k in range(3))
    widget._planes.value = sw.CURRENT_PLANE
    viewer.dims.set_current_step(0, 2)
    widget._fg_threshold.value = 0.6
    settle(qtbot, widget)
    check("current plane 2")
    assert widget._status.value.endswith("kept 2 corrected nuclei")
    assert not notes.errors and not notes.warnings


def test_model_that_fails_to_load(make_napari_viewer, qtbot, notes, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    viewer, widget = make_widget(make_napari_viewer)
    widget._model.value = sw.CHOOSE_FOLDER
    assert shown(widget._model_folder)
    widget._run.native.click()  # no folder chosen yet
    assert notes.warnings and "model folder" in notes.warnings[-1]
    widget._model_folder.value = broken
    widget._run.native.click()
    qtbot.waitUntil(lambda: idle(widget), timeout=RUN_TIMEOUT)
    assert len(notes.errors) == 1 and "Could not load the model" in notes.errors[0]
    assert [layer.name for layer in viewer.layers] == [IMAGE, f"{IMAGE} ground truth"]
    assert widget._run.enabled


def test_missing_default_model_is_a_clear_error(make_napari_viewer, qtbot, notes, monkeypatch):
    from napari_medinst.model import folder

    monkeypatch.setattr(folder, "BUNDLED_MODELS", folder.BUNDLED_MODELS / "nowhere")
    _viewer, widget = make_widget(make_napari_viewer)
    widget._model.choices = ["default", "classical"]
    widget._model.value = "default"
    widget._run.native.click()
    qtbot.waitUntil(lambda: idle(widget), timeout=RUN_TIMEOUT)
    assert len(notes.errors) == 1 and "'default'" in notes.errors[0]
    assert "classical" in notes.errors[0]


def test_model_with_types_writes_types(make_napari_viewer, qtbot, notes, tmp_path):
    import torch

    from napari_medinst.model.folder import save_model_folder
    from napari_medinst.model.network import NetConfig, NucleusNet

    torch.manual_seed(0)
    folder = save_model_folder(
        tmp_path / "typed",
        NucleusNet(NetConfig(widths=(8, 16, 16), n_types=3)),
        extra_config={
            "types": [
                {"id": 1, "name": "tumour", "color": "#ff0000"},
                {"id": 2, "name": "immune", "color": "#0000ff"},
            ]
        },
    )
    viewer, widget = make_widget(make_napari_viewer)
    widget._device.value = "cpu"
    widget._model.value = sw.CHOOSE_FOLDER
    widget._model_folder.value = folder
    # random weights give a flat ~0.45 probability: a low threshold makes nuclei come out
    # (set after choosing the model, which otherwise brings its own defaults)
    widget._fg_threshold.value = 0.05
    widget._run.native.click()
    qtbot.waitUntil(lambda: idle(widget), timeout=RUN_TIMEOUT)
    assert not notes.errors
    labels = instances(viewer)
    types = viewer.layers[f"{IMAGE} types"]
    assert not types.visible
    feats = labels.features
    assert len(feats) == labels.data.max() > 0
    assert set(feats["type"]) <= {1, 2}  # class 0 is background, never assigned
    # the types layer paints every instance with its class
    for row in feats.head(5).itertuples():
        assert set(np.unique(types.data[labels.data == row.label])) == {row.type}
    assert labels.metadata["model"] == "typed"
    # each class in the colour the model's config gives it
    np.testing.assert_allclose(types.colormap.map(np.array([1, 2]))[:, :3], [[1, 0, 0], [0, 0, 1]])


# ----------------------------------------------------------------------------- threads


def test_cancel_stops_a_model_run(make_napari_viewer, qtbot, notes, tiny_model):
    viewer, widget = make_widget(make_napari_viewer, sample=None)
    big = np.random.default_rng(1).integers(0, 255, (2048, 2048, 3)).astype(np.uint8)
    viewer.add_image(big, name="big", rgb=True)
    widget._pixel_size.value = 0.25
    widget._device.value = "cpu"
    widget._model.value = sw.CHOOSE_FOLDER
    widget._model_folder.value = tiny_model
    widget._run.native.click()
    assert widget._cancel_button.enabled and not widget._run.enabled
    qtbot.waitUntil(lambda: widget._progress.value > 0, timeout=RUN_TIMEOUT)
    widget._cancel_button.native.click()
    qtbot.waitUntil(lambda: idle(widget), timeout=RUN_TIMEOUT)
    assert any("cancelled" in m for m in notes.infos)
    assert [layer.name for layer in viewer.layers] == ["big"]
    assert widget._run.enabled and not widget._cancel_button.enabled
    assert not notes.errors


def test_removing_the_image_during_a_run(make_napari_viewer, qtbot, notes, tiny_model):
    viewer, widget = make_widget(make_napari_viewer, sample=None)
    img = np.random.default_rng(1).integers(0, 255, (1024, 1024, 3)).astype(np.uint8)
    viewer.add_image(img, name="img", rgb=True)
    widget._pixel_size.value = 0.25
    widget._model.value = sw.CHOOSE_FOLDER
    widget._model_folder.value = tiny_model
    widget._run.native.click()
    viewer.layers.remove("img")
    qtbot.waitUntil(lambda: idle(widget), timeout=RUN_TIMEOUT)
    assert len(viewer.layers) == 0
    assert notes.warnings and "removed" in notes.warnings[-1]


def test_closing_the_viewer_during_a_run(make_napari_viewer, qtbot, notes, tiny_model):
    viewer, widget = make_widget(make_napari_viewer, sample=None)
    img = np.random.default_rng(1).integers(0, 255, (1024, 1024, 3)).astype(np.uint8)
    viewer.add_image(img, name="img", rgb=True)
    widget._pixel_size.value = 0.25
    widget._model.value = sw.CHOOSE_FOLDER
    widget._model_folder.value = tiny_model
    widget._run.native.click()
    worker = widget._worker
    finished = []
    worker.finished.connect(lambda: finished.append(True))
    viewer.close()
    qtbot.waitUntil(lambda: bool(finished), timeout=RUN_TIMEOUT)
    qtbot.wait(50)
    assert widget._closed
    assert not notes.errors


# ----------------------------------------------------------------------------- visible region


def test_tune_on_visible_region_then_apply(make_napari_viewer, qtbot, notes, maps_calls):
    viewer, widget = make_widget(make_napari_viewer, show=True)
    run(qtbot, widget)
    full = instances(viewer).data.copy()
    camera = sw._camera(viewer)
    camera.center = (128, 128)
    camera.zoom = 4 * camera.zoom
    widget._tune_visible.value = True
    settle(qtbot, widget)
    preview = viewer.layers[f"{IMAGE} instances (preview)"]
    r0, r1, c0, c1 = widget._session.crop[1]
    assert preview.data.shape == (r1 - r0, c1 - c0)
    assert preview.data.size < full.size
    np.testing.assert_allclose(preview.translate, (r0, c0))
    widget._min_nucleus_size.value = 300
    settle(qtbot, widget)
    np.testing.assert_array_equal(instances(viewer).data, full)  # whole image untouched
    assert preview.data.max() < int(full[r0:r1, c0:c1].max())
    widget._apply_whole.native.click()
    settle(qtbot, widget)
    assert f"{IMAGE} instances (preview)" not in viewer.layers
    assert not widget._tune_visible.value
    assert instances(viewer).data.max() < full.max()
    assert len(maps_calls) == 1
    assert not notes.errors


def test_channels_last_layer_offers_the_nuclear_channel(
    make_napari_viewer, qtbot, notes, monkeypatch
):
    from napari_medinst.samples import load_sample

    img, _, _ = load_sample("fluorescence")
    rng = np.random.default_rng(0)
    data = rng.integers(0, 40, (*img.shape, 5)).astype(np.uint16)
    data[..., 2] = img
    seen: list[np.ndarray] = []
    real = sw.compute_maps
    monkeypatch.setattr(
        sw, "compute_maps", lambda image, *a, **kw: seen.append(image) or real(image, *a, **kw)
    )
    viewer, widget = make_widget(make_napari_viewer, sample=None)
    viewer.add_image(img, name="grey")
    assert not shown(widget._channel)
    viewer.add_image(data, name="five", rgb=False)
    widget._image_layer.value = viewer.layers["five"]
    assert shown(widget._channel) and not shown(widget._planes)
    assert widget._channel.choices == (0, 1, 2, 3, 4)
    widget._channel.value = 2
    run(qtbot, widget)
    assert not notes.errors
    np.testing.assert_array_equal(seen[-1], img)  # the chosen channel, not rows of pixels
    labels = viewer.layers["five instances"].data
    assert labels.shape == img.shape and labels.max() > 0
    widget._image_layer.value = viewer.layers["grey"]
    assert not shown(widget._channel)


@pytest.mark.parametrize(("scale", "shown"), [(0.5, 0.5), (10.0, 0.0), (0.001, 0.0)])
def test_pixel_size_field_shows_only_plausible_layer_scales(make_napari_viewer, scale, shown):
    """A layer scale outside the core's 0.05-5 µm/px range is not shown as a pixel size
    (it used to be, up to 50, and a value the model then refused; above the field's
    maximum the spin box raised)."""
    viewer, widget = make_widget(make_napari_viewer, sample=None)
    viewer.add_image(np.zeros((64, 64), np.uint8), name="img", scale=(scale, scale))
    widget._image_layer.value = viewer.layers["img"]
    assert widget._pixel_size.value == pytest.approx(shown)
    assert widget._pixel_size.max == pytest.approx(5.0)


def test_closing_after_qt_deleted_the_timer_does_not_raise(make_napari_viewer):
    """At viewer shutdown Qt can delete the tuning timer before the dock's `destroyed` slot
    runs; `_on_destroyed` used to raise RuntimeError there, which makes PyQt abort the
    whole process. It must still stop listening to the viewer."""
    from qtpy import sip

    viewer, widget = make_widget(make_napari_viewer, sample=None)
    sip.delete(widget._tune_timer)
    widget._on_destroyed()
    assert widget._closed
    viewer.add_image(np.zeros((16, 16), np.uint8), name="after")  # no callback into it


def test_sliders_show_the_chosen_models_defaults_before_the_first_run(make_napari_viewer):
    """Before the first Run the sliders showed generic defaults (0.50 / 0.30 ...), and a
    slider touched first meant the model's own defaults were never used (issue 17, bug 3)."""
    from napari_medinst.model.folder import load_model

    _viewer, widget = make_widget(make_napari_viewer)  # the H&E sample, model 'default'
    want = load_model("default").params_for("he")
    assert widget._read_params().fg_threshold == pytest.approx(want.fg_threshold)
    assert widget._read_params().min_nucleus_size == want.min_nucleus_size
    widget._modality.value = "fluorescence"
    fluo = load_model("default").params_for("fluorescence")
    assert widget._read_params().fg_threshold == pytest.approx(fluo.fg_threshold)
    widget._model.value = "classical"
    assert widget._read_params().fg_threshold == pytest.approx(PostprocessParams().fg_threshold)


# ------------------------------------------------------------- issue 17: panels, markers, status


def test_autotune_apply_is_followed_by_the_sliders(make_napari_viewer, qtbot, notes, monkeypatch):
    """One parameter state per prediction: after auto-tune's Apply the sliders show the
    tuned values, and the next slider move tunes from them in the same layer (before: the
    sliders kept the old values, the layer counted as hand-edited and a slider move made
    '<name> (2)' with the old values)."""
    from napari_medinst._napari import _evaluate_widget as EW

    viewer, widget = make_widget(make_napari_viewer)
    run(qtbot, widget)
    widget._min_nucleus_size.value = 400  # far too large: removes every nucleus
    settle(qtbot, widget)
    pred = instances(viewer)
    monkeypatch.setattr(EW, "TUNE_GRID", {"min_nucleus_size": (10, 400)})
    monkeypatch.setattr(EW, "show_info", lambda *_: None)
    evaluate = EW.EvaluateWidget(viewer)
    viewer.window.add_dock_widget(evaluate, name="Evaluate")
    evaluate._pred.value = pred
    evaluate._gt.value = viewer.layers[f"{IMAGE} ground truth"]
    evaluate.start_autotune()
    qtbot.waitUntil(lambda: evaluate._tune_worker is None, timeout=RUN_TIMEOUT)
    tuned = evaluate._tuned[0]
    assert tuned.min_nucleus_size == 10
    assert evaluate.apply_tuned()
    assert widget._min_nucleus_size.value == 10  # the sliders follow Apply at once
    settle(qtbot, widget)
    widget._fg_threshold.value = round(widget._fg_threshold.value + 0.05, 2)
    settle(qtbot, widget)
    assert f"{IMAGE} instances (2)" not in viewer.layers
    assert not any("edited by hand" in m for m in notes.infos)
    got = PostprocessParams.from_json(pred.metadata["postprocess_params"])
    assert got.min_nucleus_size == 10 and got.fg_threshold == widget._fg_threshold.value
    assert pred.data.max() > 20
    # auto-tune starts from the live parameters the sliders show
    assert evaluate._tune_inputs()[2] == widget._read_params()


def test_status_and_pixel_size_field_after_an_estimating_run(
    make_napari_viewer, qtbot, notes, maps_calls
):
    """The status line keeps model, modality and pixel size after a slider move, and the
    pixel-size field shows the estimate instead of 0.0000 (issue 17, bug 10); running
    again with the estimate shown reuses the maps."""
    viewer, widget = make_widget(make_napari_viewer)
    widget._pixel_size.value = 0.0  # estimate
    run(qtbot, widget)
    first = widget._session.maps[()]
    assert first.pixel_size_estimated
    assert first.pixel_size > 0
    assert widget._pixel_size.value == pytest.approx(first.pixel_size, abs=1e-4)
    status = widget._status.value
    assert "model classical" in status and "µm/px (estimated)" in status and "he" in status
    widget._fg_threshold.value = round(widget._fg_threshold.value + 0.05, 2)
    settle(qtbot, widget)
    n = len(np.unique(instances(viewer).data)) - 1
    assert widget._status.value.startswith(f"{n} nuclei")
    assert status.split("·", 1)[1] == widget._status.value.split("·", 1)[1]
    run(qtbot, widget)
    assert len(maps_calls) == 1  # the shown estimate is not a new pixel size
    widget._pixel_size.value = 0.3  # a value the user typed is used
    run(qtbot, widget)
    assert len(maps_calls) == 2 and maps_calls[-1][2] == pytest.approx(0.3)


def test_markers_on_their_nuclei_and_an_edge_seed_never_punches_a_hole(
    make_napari_viewer, qtbot, notes
):
    """Issue 17, bug 5 and the usability note: no marker is drawn on background; a seed
    at the very edge of a nucleus splits it or leaves it whole with a message (before: a
    background hole); a seed on background is explained too."""
    viewer, widget = make_widget(make_napari_viewer)
    run(qtbot, widget)
    labels = instances(viewer).data.copy()
    markers = viewer.layers[f"{IMAGE} markers"]
    rc = np.round(markers.data).astype(int)
    assert len(rc) and (labels[rc[:, 0], rc[:, 1]] > 0).all()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    big = int(sizes.argmax())
    rr, cc = np.nonzero(labels == big)
    centre = np.array([rr.mean(), cc.mean()])
    far = int(((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2).argmax())
    markers.add(np.array([rr[far], cc[far]], float))  # the nucleus' outermost pixel
    settle(qtbot, widget)
    after = instances(viewer).data
    assert (after[labels == big] > 0).all()  # no background hole
    if len(np.unique(after[labels == big])) == 1:  # not split: the user is told why
        assert "min nucleus area" in notes.infos[-1]
    n_notes = len(notes.infos)
    bg = np.argwhere(widget._session.results[()].foreground == 0)[0]
    markers.add(bg.astype(float))
    settle(qtbot, widget)
    assert len(notes.infos) == n_notes + 1 and "on background" in notes.infos[-1]
    assert not notes.errors


# --------------------------------------------------------------------- review queue


def _box_centre_world(layer, box) -> np.ndarray:
    r0, r1, c0, c1 = (float(v) for v in box)
    return np.asarray(layer.data_to_world(((r0 + r1 - 1) / 2, (c0 + c1 - 1) / 2)))[-2:]


def _reviewed_percent(panel) -> int:
    return int(panel._reviewed.value.split("reviewed: ")[1].split(" %")[0])


def test_review_queue_click_zooms_next_key_advances_coverage_grows(
    make_napari_viewer, qtbot, notes
):
    from qtpy.QtCore import Qt

    viewer, widget = make_widget(make_napari_viewer, show=True)
    panel = widget._review
    panel._build.native.click()  # before any run: a message, nothing else
    assert "Run the segmentation first" in panel._status.value and panel.queue is None
    run(qtbot, widget)
    labels = instances(viewer)
    panel._build.native.click()
    q = panel.queue
    assert q is not None and panel.list.count() == len(q) > 5
    assert panel.list.item(0).text().startswith(f"id {int(q.ids[0])} · ")
    assert f"{labels.name} reviewed" in viewer.layers and _reviewed_percent(panel) == 0
    # click the third row: the camera centres on that nucleus, which is selected
    rect = panel.list.visualItemRect(panel.list.item(2))
    qtbot.mouseClick(panel.list.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    cam = sw._camera(viewer)
    np.testing.assert_allclose(cam.center[-2:], _box_centre_world(labels, q.boxes[2]), atol=1e-6)
    assert labels.selected_label == int(q.ids[2])
    first = _reviewed_percent(panel)
    assert first > 0 and int(q.ids[2]) in panel.coverage.seen_ids()
    # Page Down on the canvas: the next nucleus
    canvas = viewer.window._qt_viewer.canvas.native
    canvas.setFocus()
    qtbot.keyClick(canvas, Qt.Key.Key_PageDown)
    assert panel.list.currentRow() == 3
    np.testing.assert_allclose(cam.center[-2:], _box_centre_world(labels, q.boxes[3]), atol=1e-6)
    assert labels.selected_label == int(q.ids[3])
    qtbot.keyClick(canvas, Qt.Key.Key_PageUp)
    assert panel.list.currentRow() == 2
    # moving on through the queue covers more and more of the tile
    for _ in range(10):
        qtbot.keyClick(canvas, Qt.Key.Key_PageDown)
    assert panel.list.currentRow() == 12
    assert _reviewed_percent(panel) > first
    assert _reviewed_percent(panel) == int(100 * panel.coverage.nucleus_fraction)
    overlay = viewer.layers[f"{labels.name} reviewed"].data
    np.testing.assert_array_equal(overlay > 0, panel.coverage.viewed)
    assert not notes.errors


def test_review_queue_on_an_empty_prediction_is_a_message(make_napari_viewer, qtbot, notes):
    viewer, widget = make_widget(make_napari_viewer)
    run(qtbot, widget)
    labels = instances(viewer)
    labels.data = np.zeros_like(labels.data)  # every nucleus deleted
    names = [layer.name for layer in viewer.layers]
    widget._review._build.native.click()
    assert widget._review._status.value == "No predicted nuclei: nothing to review."
    assert widget._review.queue is None and widget._review.list.count() == 0
    assert [layer.name for layer in viewer.layers] == names  # no layer added or changed
    assert not labels.data.any() and not notes.errors
