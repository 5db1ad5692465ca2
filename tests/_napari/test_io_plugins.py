"""The npe2 reader/writer contributions, used as napari uses them (viewer.open, layers.save)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import disk_labels
from napari_medinst._napari import _io_plugins
from napari_medinst._napari import _segment_widget as sw

pytestmark = pytest.mark.gui
PLUGIN = "napari-medinst"
needs_geojson = pytest.mark.skipif(
    importlib.util.find_spec("napari_medinst.geojson") is None,
    reason="napari_medinst.geojson (GeoJSON core) not present yet",
)
needs_zarr = pytest.mark.skipif(
    importlib.util.find_spec("zarr") is None or importlib.util.find_spec("ome_zarr") is None,
    reason="zarr / ome-zarr not installed",
)


def _labels_layer(viewer, labels=None, **kwargs):
    lab = disk_labels() if labels is None else labels
    layer = viewer.add_labels(lab, name="nuclei", **kwargs)
    viewer.layers.selection.active = layer
    return layer


def test_manifest_validates():
    out = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", PLUGIN], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_save_tiff_reads_back_identical(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    layer = _labels_layer(viewer)
    written = viewer.layers.save(str(tmp_path / "x.tif"), selected=True, plugin=PLUGIN)
    assert written == [str(tmp_path / "x.tif")]
    back = tifffile.imread(tmp_path / "x.tif")
    assert back.dtype == np.uint32
    np.testing.assert_array_equal(back, layer.data)


@needs_zarr
def test_save_zarr_is_read_by_ome_zarr_with_features(make_napari_viewer, tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    from napari_medinst.omezarr import read_labels_zarr

    viewer = make_napari_viewer()
    feats = pd.DataFrame({"index": [1, 2, 3], "status": ["verified", "", "rejected"]})
    layer = _labels_layer(viewer, features=feats, scale=(0.5, 0.5))
    viewer.layers.save(str(tmp_path / "x.zarr"), selected=True, plugin=PLUGIN)
    np.testing.assert_array_equal(read_labels_zarr(tmp_path / "x.zarr"), layer.data)
    nodes = [n for n in Reader(parse_url(str(tmp_path / "x.zarr")))() if n.load(Label)]
    assert len(nodes) == 1
    meta = nodes[0].metadata
    assert meta["properties"][1]["status"] == "verified"
    assert meta["properties"][3]["status"] == "rejected"
    assert meta["coordinateTransformations"][0][0]["scale"] == [0.5, 0.5]  # pixel size
    # saving again (napari asked the user) replaces the store
    layer.data = np.zeros_like(layer.data)
    viewer.layers.save(str(tmp_path / "x.zarr"), selected=True, plugin=PLUGIN)
    assert not read_labels_zarr(tmp_path / "x.zarr").any()


@needs_zarr
def test_save_zarr_never_replaces_a_folder_that_is_not_zarr(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    _labels_layer(viewer)
    folder = tmp_path / "mine.zarr"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(
        _io_plugins.LayerWriteError, match=r"mine\.zarr: exists and is not a zarr store"
    ):
        viewer.layers.save(str(folder), selected=True, plugin=PLUGIN)
    assert (folder / "notes.txt").read_text() == "keep me"


def test_save_measurements_csv_in_micrometres(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    layer = _labels_layer(
        viewer, features=pd.DataFrame({"index": [1, 2, 3], "score": [0.1, 0.2, 0.3]})
    )
    layer.metadata["pixel_size_um"] = 0.25
    viewer.layers.save(str(tmp_path / "m.csv"), selected=True, plugin=PLUGIN)
    table = pd.read_csv(tmp_path / "m.csv")
    assert table["label"].tolist() == [1, 2, 3]
    assert table["score"].tolist() == [0.1, 0.2, 0.3]
    areas = np.bincount(layer.data.ravel())[1:] * 0.25**2
    np.testing.assert_allclose(table["area_um2"], areas)


def _write_feature_collection(path: Path) -> None:
    square = [[10, 20], [30, 20], [30, 40], [10, 40], [10, 20]]  # x, y
    data = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "id": "a1",
                "geometry": {"type": "Polygon", "coordinates": [square]},
                "properties": {"objectType": "detection", "classification": {"name": "Tumor"}},
            }
        ],
    }
    path.write_text(json.dumps(data))


def test_open_as_shapes_on_request(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    path = tmp_path / "cells.geojson"
    _write_feature_collection(path)
    from napari.layers import Layer

    layers = [viewer.add_layer(Layer.create(*t)) for t in _io_plugins.read_geojson_shapes(path)]
    assert layers[0]._type_string == "shapes"
    np.testing.assert_array_equal(layers[0].data[0], [[20, 10], [20, 30], [40, 30], [40, 10]])
    assert layers[0].features["type"].tolist() == ["Tumor"]


def test_json_is_offered_only_when_it_is_a_feature_collection(tmp_path):
    other = tmp_path / "params.json"
    other.write_text('{"type": "Params", "fg_threshold": 0.5}')
    fc = tmp_path / "cells.json"
    _write_feature_collection(fc)
    assert _io_plugins.get_geojson_reader(str(other)) is None
    assert _io_plugins.get_geojson_reader(str(fc)) is not None
    assert _io_plugins.get_geojson_reader(str(tmp_path / "x.tif")) is None


@needs_geojson
def test_geojson_save_then_open_round_trip(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    feats = pd.DataFrame(
        {
            "index": [1, 2, 3],
            "status": ["verified", "", "predicted"],
            "type": [1, 0, 2],
            "area_px": [10.0, 20.0, 30.0],
        }
    )
    layer = _labels_layer(viewer, features=feats)
    path = tmp_path / "x.geojson"
    viewer.layers.save(str(path), selected=True, plugin=PLUGIN)
    tifffile.imwrite(tmp_path / "x.tif", np.zeros((120, 110), np.uint8))  # the image grid
    opened = viewer.open(str(path), plugin=PLUGIN)[0]
    assert opened._type_string == "labels"
    back = np.asarray(opened.data)
    assert back.shape == (120, 110)  # the sibling image's grid, not the features' extent
    np.testing.assert_array_equal(back[:96, :96] > 0, layer.data > 0)
    # same nuclei, pixel for pixel (ids may be renumbered): a one-to-one overlap
    pairs = {
        (int(a), int(b)) for a, b in zip(layer.data.ravel(), back[:96, :96].ravel(), strict=True)
    }
    assert len(pairs) == 4 and (0, 0) in pairs
    new_id = dict(pairs)
    got = opened.features.set_index("index")
    assert got.loc[new_id[1], "status"] == "verified"
    assert got.loc[new_id[3], "status"] == "predicted"
    assert got.loc[new_id[3], "type"] == 2
    assert got.loc[new_id[2], "Area px^2"] == 20.0
    assert opened.metadata["source_path"] == str(path)
    # File > Open without choosing a plugin: always Labels (one reader for *.geojson)
    assert viewer.open(str(path), plugin=None)[0]._type_string == "labels"
    # saving the opened layer again keeps every nucleus's uuid
    viewer.layers.selection.active = opened
    again = tmp_path / "again.geojson"
    viewer.layers.save(str(again), selected=True, plugin=PLUGIN)
    uuids = {f["id"] for f in json.loads(again.read_text())["features"]}
    assert uuids == set(got["uuid"])


def test_bad_status_is_a_clear_error_and_writes_nothing(make_napari_viewer, tmp_path):
    pytest.importorskip("napari_medinst.geojson")
    viewer = make_napari_viewer()
    _labels_layer(viewer, features=pd.DataFrame({"index": [1, 2, 3], "status": ["x", "", ""]}))
    with pytest.raises(_io_plugins.LayerWriteError, match="status"):
        viewer.layers.save(str(tmp_path / "x.geojson"), selected=True, plugin=PLUGIN)
    assert not list(tmp_path.iterdir())


def _run_segment(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "he")
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment nuclei")
    widget._model.value = "classical"
    widget._run.native.click()
    idle = lambda: widget._job is None and not widget._tune_timer.isActive() and not widget._pending  # noqa: E731
    qtbot.waitUntil(idle, timeout=60_000)
    return viewer, widget, idle


def test_segment_run_measures_tuning_does_not(make_napari_viewer, qtbot, monkeypatch):
    calls = []
    real = sw.measure_nuclei
    monkeypatch.setattr(sw, "measure_nuclei", lambda *a, **k: calls.append(1) or real(*a, **k))
    viewer, widget, idle = _run_segment(make_napari_viewer, qtbot)
    layer = viewer.layers["he sample instances"]
    feats = layer.features
    n = int(layer.data.max())
    assert len(calls) == 1
    assert feats["index"].tolist() == list(range(1, n + 1))
    assert {"score", "area_um2", "perimeter_um", "eccentricity", "mean_intensity_0"} <= set(feats)
    areas = np.bincount(layer.data.ravel(), minlength=n + 1)[1:] * 0.25**2  # sample: 0.25 µm/px
    np.testing.assert_allclose(feats["area_um2"], areas)
    status = layer.get_status(np.argwhere(layer.data == 1)[0], world=False)
    assert "area_um2" in str(status)  # napari's status bar shows the features
    widget._fg_threshold.value = 0.8  # tuning: no measurement, no stale columns
    qtbot.wait(5)
    qtbot.waitUntil(idle, timeout=60_000)
    assert len(calls) == 1
    assert "area_um2" not in layer.features


# ------------------------------------------------------------------ review fixes


def _square_feature(x, y, size, kind, fid):
    ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
    return {"type": "Feature", "id": fid, "properties": {"objectType": kind},
            "geometry": {"type": "Polygon", "coordinates": [ring]}}  # fmt: skip


@needs_geojson
def test_reader_skips_bad_features_warns_and_keeps_them_in_metadata(
    make_napari_viewer, tmp_path, monkeypatch
):
    import napari.utils.notifications as notes

    said = []
    monkeypatch.setattr(notes, "show_warning", said.append)
    feats = [_square_feature(2, 2, 3, "detection", "n0"), _square_feature(8, 2, 3, "detection", "n1"),
             {"type": "Feature", "id": "pt", "properties": {"objectType": "detection"},
              "geometry": {"type": "Point", "coordinates": [1, 1]}}]  # fmt: skip
    path = tmp_path / "cells.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    layer = make_napari_viewer().open(str(path), plugin=PLUGIN)[0]
    assert sorted(layer.features["uuid"]) == ["n0", "n1"]
    problems = layer.metadata["import_problems"]
    assert len(problems) == 1 and "feature 2 (id pt)" in problems[0]
    assert len(said) == 1 and "1 feature problem(s)" in said[0]


@needs_geojson
def test_slide_coordinates_open_translated_and_save_back_in_place(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    path = tmp_path / "far.geojson"
    feats = [_square_feature(80000, 60000, 10, "annotation", "far")]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    layer = viewer.open(str(path), plugin=PLUGIN)[0]
    assert layer.data.shape == (10, 10)
    assert tuple(layer.translate) == (60000, 80000)
    viewer.layers.selection.active = layer
    out = tmp_path / "out.geojson"
    viewer.layers.save(str(out), selected=True, plugin=PLUGIN)
    back = json.loads(out.read_text())["features"][0]
    assert back["geometry"] == feats[0]["geometry"] and back["id"] == "far"
    assert back["properties"]["objectType"] == "annotation"  # not turned into a detection


@needs_zarr
def test_zarr_writer_keeps_translate_and_reader_gives_it_back(make_napari_viewer, tmp_path):
    from napari_medinst.omezarr import read_labels_zarr_table

    viewer = make_napari_viewer()
    _labels_layer(viewer, scale=(0.5, 0.5), translate=(50.0, 20.0))
    viewer.layers.save(str(tmp_path / "x.zarr"), selected=True, plugin=PLUGIN)
    z = read_labels_zarr_table(tmp_path / "x.zarr")
    assert z.offset == (100, 40) and z.pixel_size == 0.5
    viewer.layers.save(str(tmp_path / "x.geojson"), selected=True, plugin=PLUGIN)
    first = json.loads((tmp_path / "x.geojson").read_text())["features"][0]
    xs = [p[0] for p in first["geometry"]["coordinates"][0]]
    assert min(xs) >= 40  # level-0 pixels of the slide, offset by translate / scale


@needs_zarr
def test_save_zarr_never_replaces_an_image_store(make_napari_viewer, tmp_path):
    import zarr

    viewer = make_napari_viewer()
    _labels_layer(viewer, labels=np.ones((20, 30), np.uint32))
    root = tmp_path / "slide.zarr"
    g = zarr.open_group(str(root), mode="w", zarr_format=2)
    g.attrs["bioformats2raw.layout"] = 3
    img = g.create_group("0")
    img.create_array("0", shape=(20, 30), dtype="uint8", chunks=(20, 30))[...] = 7
    img.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "y", "type": "space"}, {"name": "x", "type": "space"}], "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1]}]}]}]  # fmt: skip
    viewer.layers.save(str(root), selected=True, plugin=PLUGIN)
    assert (zarr.open_group(str(root / "0"), mode="r")["0"][...] == 7).all()
    assert (root / "0" / "labels" / "nuclei" / ".zattrs").is_file()
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w", zarr_format=2).attrs["plate"] = {"rows": []}
    with pytest.raises(_io_plugins.LayerWriteError, match="plate"):
        viewer.layers.save(str(other), selected=True, plugin=PLUGIN)
    assert json.loads((other / ".zattrs").read_text()) == {"plate": {"rows": []}}


def test_bare_list_of_features_json_is_claimed(tmp_path):
    bare = tmp_path / "cells.json"
    bare.write_text(json.dumps([_square_feature(0, 0, 2, "detection", "a")], indent=2))
    other = tmp_path / "list.json"
    other.write_text("[1, 2, 3]")
    assert _io_plugins.get_geojson_reader(str(bare)) is not None
    assert _io_plugins.get_geojson_reader(str(other)) is None


def test_open_geojson_as_shapes_from_the_file_menu(make_napari_viewer, tmp_path):
    """The outlines open as editable polygons through the plugin's File ▸ IO Utilities
    command (the menu entry is in the manifest and calls the function with the viewer)."""
    import npe2

    from napari_medinst._napari._io_plugins import open_geojson_as_shapes
    from napari_medinst.geojson import write_geojson

    lab = np.zeros((40, 40), np.uint32)
    lab[5:12, 5:15] = 1
    lab[20:30, 22:33] = 2
    path = write_geojson(tmp_path / "n.geojson", lab)
    viewer = make_napari_viewer()
    [layer] = open_geojson_as_shapes(viewer, str(path))
    assert layer._type_string == "shapes" and len(layer.data) == 2
    ys, xs = np.concatenate(layer.data)[:, 0], np.concatenate(layer.data)[:, 1]
    assert ys.min() == 5 and xs.max() == 33
    manifest = npe2.PluginManager.instance().get_manifest("napari-medinst")
    items = manifest.contributions.menus["napari/file/io_utilities"]
    assert any(i.command == "napari-medinst.open_geojson_shapes" for i in items)
