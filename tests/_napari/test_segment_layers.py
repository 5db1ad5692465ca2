"""Issue 17: the Segment panel keeps each surviving nucleus' colour through a re-run, and
adds the diagnostic maps only on demand."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medinst._napari._segment_widget import _OUTPUTS, DIAGNOSTIC

from .test_segment_widget import IMAGE, Notes, instances, make_widget, run, settle

pytestmark = pytest.mark.gui

MAP_LAYERS = {f"{IMAGE} {_OUTPUTS[role][0]}" for role in DIAGNOSTIC}


@pytest.fixture
def notes(monkeypatch) -> Notes:
    return Notes(monkeypatch)


def _matches(old: np.ndarray, new: np.ndarray) -> dict[int, int]:
    """old id -> new id of every pair of nuclei with IoU > 0.5."""
    out = {}
    for o in np.unique(old[old > 0]):
        a = old == o
        for n in np.unique(new[a & (new > 0)]):
            b = new == n
            if np.count_nonzero(a & b) / np.count_nonzero(a | b) > 0.5:
                out[int(o)] = int(n)
    return out


def _check_ids(layer) -> None:
    """The features, scores and (with maps shown) contours use the layer's ids."""
    ids = np.unique(layer.data[layer.data > 0])
    assert sorted(layer.features["label"]) == ids.tolist()
    scores = layer.metadata["scores"]
    keys = sorted(scores) if isinstance(scores, dict) else list(range(1, len(scores) + 1))
    assert keys == ids.tolist()


def test_a_slider_change_keeps_the_colour_of_every_surviving_nucleus(
    make_napari_viewer, qtbot, notes
):
    viewer, widget = make_widget(make_napari_viewer)
    widget._show_maps.value = True
    run(qtbot, widget)
    layer = instances(viewer)
    before = np.array(layer.data)
    widget._fg_threshold.value = round(widget._fg_threshold.value + 0.05, 2)
    settle(qtbot, widget)
    after = np.array(layer.data)
    assert not np.array_equal(before, after)
    matched = _matches(before, after)
    assert len(matched) > 0.8 * len(np.unique(before[before > 0]))
    assert all(o == n for o, n in matched.items()), "a surviving nucleus changed its id"
    fresh = set(np.unique(after[after > 0]).tolist()) - set(matched.values())
    assert not fresh & set(np.unique(before).tolist()), "a new nucleus took an old one's id"
    _check_ids(layer)
    contours = viewer.layers[f"{IMAGE} contours"].data
    assert np.all(contours[contours > 0] == after[contours > 0])
    assert not notes.errors


def test_a_marker_edit_keeps_the_other_nuclei_colours(make_napari_viewer, qtbot, notes):
    viewer, widget = make_widget(make_napari_viewer)
    run(qtbot, widget)
    layer = instances(viewer)
    before = np.array(layer.data)
    sizes = np.bincount(before.ravel())
    sizes[0] = 0
    big = int(sizes.argmax())
    rr, cc = np.nonzero(before == big)
    centre = np.array([rr.mean(), cc.mean()])
    d = (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2
    far = centre + 0.8 * (np.array([rr[d.argmax()], cc[d.argmax()]], float) - centre)
    viewer.layers[f"{IMAGE} markers"].add(far)
    settle(qtbot, widget)
    after = np.array(layer.data)
    assert len(np.unique(after[before == big])) == 2  # the marker split the nucleus
    matched = _matches(before, after)
    others = [o for o in np.unique(before[before > 0]).tolist() if o != big]
    assert sum(o in matched for o in others) > 0.9 * len(others)
    assert all(o == n for o, n in matched.items())
    _check_ids(layer)
    assert not notes.errors


def test_diagnostic_maps_only_on_demand(make_napari_viewer, qtbot, notes):
    viewer, widget = make_widget(make_napari_viewer)
    assert not widget._show_maps.value
    run(qtbot, widget)
    names = {x.name for x in viewer.layers}
    assert names == {IMAGE, f"{IMAGE} ground truth", f"{IMAGE} instances", f"{IMAGE} markers"}
    widget._show_maps.value = True  # added at once, from the result on show
    names = {x.name for x in viewer.layers}
    assert names >= MAP_LAYERS
    energy = viewer.layers[f"{IMAGE} HV energy"]
    np.testing.assert_array_equal(energy.data, widget._session.results[()].energy)
    widget._contour_weight.value = widget._contour_weight.value + 0.5
    settle(qtbot, widget)
    np.testing.assert_array_equal(
        viewer.layers[f"{IMAGE} HV energy"].data, widget._session.results[()].energy
    )
    viewer.layers.remove(f"{IMAGE} HV gradient")  # removed by hand: tuning still works
    widget._fg_threshold.value = round(widget._fg_threshold.value + 0.05, 2)
    settle(qtbot, widget)
    widget._show_maps.value = False  # unticked: removed, and tuning does not bring them back
    assert not MAP_LAYERS & {x.name for x in viewer.layers}
    widget._fg_threshold.value = round(widget._fg_threshold.value - 0.1, 2)
    settle(qtbot, widget)
    assert not MAP_LAYERS & {x.name for x in viewer.layers}
    assert f"{IMAGE} instances" in viewer.layers
    assert not any("[" in x.name or "(2)" in x.name for x in viewer.layers)
    assert not notes.errors
