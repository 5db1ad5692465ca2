"""The Evaluate panel takes a region of a whole-slide result into its editor and writes it back."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import classical_store
from napari_medinst import slide_edit as ed
from napari_medinst import slide_engine as se
from napari_medinst._napari import _evaluate_widget as EW
from napari_medinst._napari import _slide_region as SR
from napari_medinst._napari._common import _camera, _canvas_size
from napari_medinst._napari._editing import existing_editor
from napari_medinst._napari._evaluate_widget import EvaluateWidget

pytestmark = pytest.mark.gui
zarr = pytest.importorskip("zarr")
pytest.importorskip("imagecodecs")
distributed = pytest.importorskip("distributed")

PLUGIN = "napari-medinst"
SIZE = 2048  # labels (the working level): 1024 px at 0.5 µm/px
BLOCK = 256
VIEW = (300, 560, 300, 560)  # the labels' rows and columns brought into view


@pytest.fixture(autouse=True)
def recovery(tmp_path, monkeypatch):
    """Never touch the user's real recovery folder."""
    monkeypatch.setenv(EW.RECOVERY_ENV, str(tmp_path / "recovery"))


@pytest.fixture
def notes(monkeypatch):
    got = {"error": [], "info": []}
    for level in got:
        monkeypatch.setattr(SR, f"show_{level}", got[level].append)
    return got


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return classical_store(tmp_path_factory.mktemp("slide"), SIZE, BLOCK)


@pytest.fixture
def store(made, tmp_path):
    import shutil

    out = tmp_path / "result.zarr"
    shutil.copytree(made, out)
    return out


def stored(out, box) -> np.ndarray:
    top = zarr.open_array(str(se.labels_path(out) / "0"), mode="r")
    return top[box[0] : box[1], box[2] : box[3]]


def look_at(viewer, layer, box) -> None:
    """Centre the canvas on ``box`` of the layer's level 0 and zoom so it just fills it."""
    scale = np.asarray(layer.scale[-2:], float)
    centre = np.array([(box[0] + box[1]) / 2, (box[2] + box[3]) / 2]) * scale
    cam = _camera(viewer)
    cam.center = tuple(centre)
    size = np.array([box[1] - box[0], box[3] - box[2]]) * scale
    cam.zoom = float(np.min(np.asarray(_canvas_size(viewer), float) / size))


def open_panel(make_napari_viewer, store):
    viewer = make_napari_viewer()
    panel = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(panel, name="Evaluate")
    assert panel.slide_region.isHidden()  # no slide result yet
    [result] = viewer.open(str(store), plugin=PLUGIN)
    assert result.metadata["slide_result"] == str(store)
    assert not panel.slide_region.isHidden()
    return viewer, panel, result


def test_a_region_goes_to_the_editor_and_back_into_the_store(make_napari_viewer, store, notes):
    viewer, panel, result = open_panel(make_napari_viewer, store)
    top = int(np.asarray(result.data[0]).max())
    look_at(viewer, result, VIEW)
    layer = panel.slide_region.edit_region()
    assert layer is not None, notes["error"]
    assert panel._gt.value is layer and layer.metadata[EW.GT_KEY]
    assert panel._pred.value is None  # the whole slide cannot be scored against a region
    b = layer.metadata[SR.REGION_KEY]["box"]
    assert b[0] <= VIEW[0] + 2 and b[1] >= VIEW[1] - 2  # the view (grown: nuclei whole)
    np.testing.assert_array_equal(np.asarray(layer.data), stored(store, b))
    np.testing.assert_allclose(layer.scale, result.scale)  # placed on the slide
    np.testing.assert_allclose(layer.translate, np.array([b[0], b[2]]) * result.scale)
    editor = existing_editor(layer)
    assert set(editor.status.values()) == {"predicted"} and not editor.dirty

    ids, counts = np.unique(np.asarray(layer.data), return_counts=True)
    region = SR._REGIONS[layer]
    big = [int(i) for i, c in sorted(zip(ids, counts, strict=True), key=lambda t: -t[1])
           if i and int(i) not in region.locked]  # fmt: skip
    gone, checked = big[0], big[1]
    rr, cc = np.nonzero(np.asarray(layer.data) == gone)
    assert editor.delete_at((rr[len(rr) // 2], cc[len(cc) // 2]))
    editor.set_status([checked], "verified")
    free = np.argwhere(np.asarray(layer.data) == 0)
    r, c = free[len(free) // 2]
    new = editor.paint_new()
    yy, xx = np.mgrid[r - 2 : r + 3, c - 2 : c + 3]
    keep = (yy >= 0) & (xx >= 0) & (yy < layer.data.shape[0]) & (xx < layer.data.shape[1])
    editor.write((yy[keep], xx[keep]), np.full(int(keep.sum()), new))
    assert editor.dirty and panel.unsaved_ground_truths() == [layer.name]

    panel.slide_region.write_button.click()
    assert not notes["error"], notes["error"]
    assert "1 new, 0 changed, 1 deleted" in notes["info"][-1]
    now = stored(store, b)
    np.testing.assert_array_equal(np.asarray(layer.data), now)  # the layer shows the store
    assert not (now == gone).any() and (now == checked).any()
    [renumbered] = set(np.unique(now).tolist()) - set(ids.tolist())
    assert renumbered > top  # the new nucleus: an id unique over the slide
    np.testing.assert_array_equal(np.asarray(result.data[0][b[0] : b[1], b[2] : b[3]]), now)
    assert not editor.dirty and panel.unsaved_ground_truths() == []
    assert editor.status[checked] == "verified" and editor.status[renumbered] == "edited"
    again = ed.read_region(store, b)
    assert again.status[checked] == "verified" and again.status[renumbered] == "edited"

    # someone else writes there meanwhile: refused, the edits stay in the layer
    other = again.labels.copy()
    other[other == checked] = 0
    ed.write_region(store, again.box, again.labels, other)
    editor.delete_at(np.argwhere(np.asarray(layer.data) == renumbered)[0])
    mine = np.asarray(layer.data).copy()
    panel.slide_region.write_region()
    assert "Not written (your edits are still in" in notes["error"][-1]
    assert "changed since it was read" in notes["error"][-1]
    assert "\n" not in notes["error"][-1]
    np.testing.assert_array_equal(np.asarray(layer.data), mine)


def test_a_view_too_large_is_refused_with_a_message(make_napari_viewer, store, notes,
                                                    monkeypatch):  # fmt: skip
    viewer, panel, result = open_panel(make_napari_viewer, store)
    monkeypatch.setattr(SR, "MAX_VIEW_PIXELS", 100 * 100)
    look_at(viewer, result, VIEW)
    assert panel.slide_region.edit_region() is None
    assert "zoom in" in notes["error"][-1] and "\n" not in notes["error"][-1]
    assert len(viewer.layers) == 1


def test_a_corrected_region_exports_with_the_slide_pixels_under_it(make_napari_viewer, store, made,
                                                                   notes, tmp_path, level_reads,
                                                                   monkeypatch):  # fmt: skip
    """Fine-tune export of a slide region: only that part of the slide, on the labels' grid."""
    import tifffile

    from napari_medinst._napari import _finetune_widget as fw

    viewer, panel, result = open_panel(make_napari_viewer, store)
    slide_path = made.parent / "s.ome.tif"  # the slide the store was made from
    [image] = viewer.open(str(slide_path), plugin=PLUGIN)
    assert image.multiscale
    look_at(viewer, result, VIEW)
    layer = panel.slide_region.edit_region()
    assert layer is not None, notes["error"]
    ft = fw.FinetuneWidget(viewer)
    got: list[str] = []
    for level in ("error", "info"):
        monkeypatch.setattr(fw, f"show_{level}", got.append)
    ft._image.value, ft._gt.value = image, layer
    ft._set_folder.value = tmp_path / "set"
    level_reads.clear()
    res = ft.export()
    assert res is not None, got
    [saved] = (tmp_path / "set" / "images").iterdir()
    exported = tifffile.imread(saved)
    lab = np.asarray(layer.data)
    assert exported.shape[:2] == lab.shape
    b = layer.metadata[SR.REGION_KEY]["box"]  # labels px at 0.5 µm; slide level 0 at 0.25 µm
    sizes = [float(image.scale[-1] * f[-1]) for f in image.downsample_factors]
    level = sizes.index(pytest.approx(float(result.scale[-1])))  # the pyramid has that level
    assert level > 0 and set(level_reads) == {level}  # only that level was read ...
    want = np.asarray(image.data[level][b[0] : b[1], b[2] : b[3]])
    np.testing.assert_array_equal(exported, want)  # ... exactly under the region

    # a region between levels: the finer level, resampled to the labels' grid
    layer.scale = tuple(np.asarray(layer.scale) * 0.75)
    level_reads.clear()
    img, _ = ft._image_and_gt(ft._image, ft._gt, "export")[2:]
    assert img.shape == exported.shape and set(level_reads) == {level - 1}
    layer.translate = (-100.0, 0.0)  # partly off the slide: refused, nothing read
    with pytest.raises(fw.InputError, match="does not lie inside"):
        ft._image_and_gt(ft._image, ft._gt, "export")


def test_a_whole_slide_is_refused_for_export_without_reading_it(make_napari_viewer, store, made,
                                                                tmp_path, level_reads):  # fmt: skip
    from napari_medinst._napari import _finetune_widget as fw

    viewer, _panel, _result = open_panel(make_napari_viewer, store)
    slide_path = made.parent / "s.ome.tif"
    [image] = viewer.open(str(slide_path), plugin=PLUGIN)
    level_reads.clear()
    with pytest.raises(fw.InputError, match="slide"):
        fw._plane(image)
    assert not level_reads


def test_saving_a_slide_result_never_loads_it_whole(make_napari_viewer, store, notes, tmp_path,
                                                    monkeypatch):  # fmt: skip
    """File > Save on a slide result: GeoJSON from the store chunk by chunk; other formats
    refused above the writers' limit (a real slide would not fit in memory)."""
    import json

    from napari_medinst._napari import _io_plugins as io

    viewer, _panel, result = open_panel(make_napari_viewer, store)
    viewer.layers.selection = {result}
    dest = tmp_path / "all.geojson"
    assert viewer.layers.save(str(dest), selected=True, plugin=PLUGIN) == [str(dest)]
    n = len(np.unique(stored(store, (0, SIZE // 2, 0, SIZE // 2)))) - 1
    assert len(json.loads(dest.read_text())["features"]) == n
    monkeypatch.setattr(io, "MAX_WRITE_PIXELS", 1000)  # as a 50,000 px slide would be
    with pytest.raises(io.LayerWriteError, match=r"too large to load.*as \.geojson"):
        viewer.layers.save(str(tmp_path / "all.tif"), selected=True, plugin=PLUGIN)
    assert not (tmp_path / "all.tif").exists()
