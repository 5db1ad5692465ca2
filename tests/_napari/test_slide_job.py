"""The Segment panel on a slide: visible region at the working level, whole slide on dask."""

from __future__ import annotations

import contextlib
import json
import time

import numpy as np
import pytest

from conftest import bundled_tile_slide, load_script
from napari_medinst import slide as sl
from napari_medinst._napari import _segment_widget as sw
from napari_medinst._napari import _slide_job as sj
from napari_medinst._napari._common import _camera, _canvas_size
from napari_medinst._napari._segment_widget import SegmentWidget
from napari_medinst.segment import segment

pytestmark = pytest.mark.gui
pytest.importorskip("imagecodecs")
zarr = pytest.importorskip("zarr")
distributed = pytest.importorskip("distributed")
psutil = pytest.importorskip("psutil")
mts = load_script("make_test_slide")

PLUGIN = "napari-medinst"
SIZE = 3000  # level 0 at 0.25 µm/px; level 1 (1500 px, 0.5 µm/px) is the working level
BLOCK = 512
RUN_TIMEOUT = 180_000


class Notes:
    """The notifications of the panel and of its Whole slide section."""

    def __init__(self, monkeypatch):
        self.errors: list[str] = []
        self.infos: list[str] = []
        for mod in (sw, sj):
            monkeypatch.setattr(mod, "show_error", self.errors.append)
            monkeypatch.setattr(mod, "show_info", self.infos.append)


@pytest.fixture
def notes(monkeypatch) -> Notes:
    return Notes(monkeypatch)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    return bundled_tile_slide(tmp_path_factory.mktemp("slide"), SIZE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, slide_path):
    """The same slide through plan_slide + run_slide (what segment-slide runs)."""
    from napari_medinst import slide_engine as se

    plan = se.plan_slide(slide_path, "classical", block=BLOCK, tta=sw.DEFAULT_TTA)
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                       dashboard_address=None)  # fmt: skip
    with distributed.Client(cluster) as client:
        assert se.run_slide(plan, out, client).complete
    cluster.close()
    return out


def open_slide_in_panel(make_napari_viewer, path, show=False):
    viewer = make_napari_viewer(show=show)
    [layer] = viewer.open(path, plugin=PLUGIN)
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment nuclei")
    assert isinstance(widget, SegmentWidget)
    widget._image_layer.value = layer
    widget._model.value = "classical"
    return viewer, widget, layer


def wait_idle(qtbot, widget, timeout=RUN_TIMEOUT):
    qtbot.wait(5)
    qtbot.waitUntil(lambda: widget.idle, timeout=timeout)


def same_nuclei(a: np.ndarray, b: np.ndarray) -> bool:
    """The same nuclei, pixel for pixel, whatever their ids."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return pairs.shape[1] == len(np.unique(a[a > 0])) == len(np.unique(b[b > 0]))


def store_labels(out) -> np.ndarray:
    return zarr.open_array(str(out / "labels" / "nuclei" / "0"), mode="r")[:]


def store_status(out) -> str:
    return json.loads((out / ".zattrs").read_text())["napari_medinst_slide"]["status"]


# ------------------------------------------------------------------ visible region


def test_visible_region_lies_on_the_slide_and_equals_direct(make_napari_viewer, qtbot, notes,
                                                            slide_path, level_reads):  # fmt: skip
    viewer, widget, layer = open_slide_in_panel(make_napari_viewer, slide_path)
    assert not widget._sections["Whole slide"].isHidden()
    assert widget._slide._store.value.name == "s_nuclei.zarr"
    cam = _camera(viewer)
    h, _w = _canvas_size(viewer)
    cam.center = (300.0, 420.0)  # µm
    cam.zoom = h / 200.0  # 200 µm of the slide in the canvas' height: 400 px at level 1
    layer.visible = False  # napari draws nothing: every read below is the panel's
    level_reads.clear()
    widget._slide._region.native.click()
    wait_idle(qtbot, widget)
    assert not notes.errors, notes.errors
    s = widget._session
    region = s.place
    assert region.level == 1 and region.downsample == 2.0  # the 0.5 µm/px level
    r0, r1, c0, c1 = region.box
    # the box is what the canvas shows: its centre and height in level-1 px (0.5 µm/px)
    assert (r0 + r1) / 2 == pytest.approx(600, abs=1) and (r1 - r0) == pytest.approx(400, abs=2)
    assert (c0 + c1) / 2 == pytest.approx(840, abs=1)
    assert 0 not in level_reads and 1 in level_reads  # never level 0
    labels = viewer.layers[f"{region.label(layer.name)} instances"]
    np.testing.assert_allclose(labels.scale, [0.5, 0.5])
    np.testing.assert_allclose(labels.translate, [r0 * 0.5, c0 * 0.5])
    # a labels pixel and the slide's level-0 pixel under it are at the same world point
    for i, j in ((0, 0), (17, 250)):
        world = labels.data_to_world((i, j))
        np.testing.assert_allclose(layer.world_to_data(world), [(r0 + i) * 2, (c0 + j) * 2])
    direct = segment(sl.read_region(slide_path, 1, r0, r1, c0, c1), "classical",
                     pixel_size=0.5, tta=sw.DEFAULT_TTA)  # fmt: skip
    assert labels.data.shape == direct.labels.shape
    assert same_nuclei(np.asarray(labels.data), direct.labels)
    assert direct.labels.max() > 20
    # the live tuning works on the region, and its layers stay where they are
    before = np.asarray(labels.data).copy()
    widget._fg_threshold.value = min(0.95, widget._fg_threshold.value + 0.3)
    wait_idle(qtbot, widget)
    assert not np.array_equal(np.asarray(labels.data), before)
    np.testing.assert_allclose(labels.translate, [r0 * 0.5, c0 * 0.5])


def test_visible_region_too_large_says_zoom_in(make_napari_viewer, qtbot, notes, slide_path,
                                               monkeypatch, level_reads):  # fmt: skip
    viewer, widget, _layer = open_slide_in_panel(make_napari_viewer, slide_path)
    viewer.reset_view()
    monkeypatch.setattr(sj, "MAX_REGION_PIXELS", 100_000)
    level_reads.clear()
    widget._slide._region.native.click()
    assert len(notes.errors) == 1 and "zoom in" in notes.errors[0]
    assert not level_reads and widget.idle and widget._session is None


def _counting_pyramid(side: int, levels: int, reads: dict):
    """A lazy noise pyramid whose chunk reads are counted per level."""
    import dask.array as da

    out = []
    for k in range(levels):
        n = side >> k
        base = da.zeros((n, n, 3), dtype=np.uint8, chunks=(1024, 1024, 3))

        def fill(block, k=k, block_info=None):
            reads[k] = reads.get(k, 0) + 1
            rng = np.random.default_rng(block_info[0]["chunk-location"][:2])
            return rng.integers(0, 255, block.shape, dtype=np.uint8)

        out.append(base.map_blocks(fill, dtype=np.uint8))
    return out


def test_run_on_a_big_pyramid_never_reads_level_0(make_napari_viewer, qtbot, notes):
    reads: dict[int, int] = {}
    viewer = make_napari_viewer()
    layer = viewer.add_image(_counting_pyramid(40_000, 3, reads), rgb=True, multiscale=True,
                             scale=(0.25, 0.25), name="big")  # fmt: skip
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment nuclei")
    widget._image_layer.value = layer
    widget._model.value = "classical"
    assert widget._image_data(layer) is layer.data[-1]  # shapes only, never level 0
    reads.clear()
    widget._run.native.click()  # the working level (20,000² px) is far above the limit
    assert len(notes.errors) == 1 and "too large" in notes.errors[0], notes.errors
    assert not reads and widget.idle
    # a small visible region is read at level 1 (0.5 µm/px), never at level 0
    layer.visible = False  # napari draws nothing: every read below is the panel's
    cam = _camera(viewer)
    cam.center, cam.zoom = (2000.0, 2000.0), _canvas_size(viewer)[0] / 100.0
    widget._slide._region.native.click()
    wait_idle(qtbot, widget)
    assert reads.get(0, 0) == 0 and reads.get(1, 0) > 0
    assert widget._session is not None and widget._session.place.level == 1


# ------------------------------------------------------------------ whole slide


def _children() -> set[int]:
    """Child processes, but multiprocessing's resource tracker (one per process, for good)."""
    found = set()
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "resource_tracker" not in " ".join(p.cmdline()):
                found.add(p.pid)
    return found


def _no_new_children(before: set[int], wait_s: float = 5.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < wait_s:
        if not _children() - before:
            return True
        time.sleep(0.2)
    print([psutil.Process(p).cmdline() for p in _children() - before])
    return False


def start_run(widget, out, workers=1):
    section = widget._slide
    section.block = BLOCK
    section._store.value = out
    section._workers.value = workers
    section._start.native.click()
    return section


@pytest.mark.slow
def test_whole_slide_from_the_panel_equals_run_slide(make_napari_viewer, qtbot, notes,
                                                     slide_path, reference, tmp_path):  # fmt: skip
    viewer, widget, _layer = open_slide_in_panel(make_napari_viewer, slide_path)
    added, seen = [], []
    viewer.layers.events.inserted.connect(lambda e: added.append(e.value.name))
    widget._slide._relay.progress.connect(lambda *a: seen.append(a[:3]))
    before = _children()
    out = tmp_path / "s_nuclei.zarr"
    section = start_run(widget, out)
    assert section.running
    qtbot.waitUntil(lambda: not section.running, timeout=RUN_TIMEOUT)
    qtbot.wait(50)
    assert not notes.errors, notes.errors
    assert ("blocks", seen[-1][2], seen[-1][2]) in [(w, d, t) for w, d, t in seen if w == "blocks"]
    assert seen[-1][0] == "chunks" and seen[-1][1] == seen[-1][2]  # the bar reached the end
    assert section._bar.value == section._bar.max
    assert "s_nuclei.zarr nuclei (running)" in added  # shown while painting
    result = viewer.layers["s_nuclei.zarr nuclei"]  # re-opened complete
    assert "s_nuclei.zarr nuclei (running)" not in [lay.name for lay in viewer.layers]
    assert result.multiscale and result.metadata["status"] == "complete"
    np.testing.assert_allclose(result.scale, [0.5, 0.5])
    assert store_status(out) == "complete"
    np.testing.assert_array_equal(store_labels(out), store_labels(reference))
    np.testing.assert_array_equal(np.asarray(result.data[0]), store_labels(reference))
    assert _no_new_children(before)  # the local cluster was closed
    # a second start refuses the complete store unless "overwrite" is ticked
    section._start.native.click()
    assert len(notes.errors) == 1 and "overwrite" in notes.errors[0] and not section.running


@pytest.mark.slow
def test_cancel_stops_and_a_second_run_resumes(make_napari_viewer, qtbot, notes, slide_path,
                                               reference, tmp_path):  # fmt: skip
    viewer, widget, _layer = open_slide_in_panel(make_napari_viewer, slide_path)
    seen = []
    widget._slide._relay.progress.connect(lambda *a: seen.append(a[:3]))
    before = _children()
    out = tmp_path / "c.zarr"
    section = start_run(widget, out)
    qtbot.waitUntil(lambda: bool(seen), timeout=RUN_TIMEOUT)  # the first block is done
    t0 = time.monotonic()
    section._stop.native.click()
    qtbot.waitUntil(lambda: not section.running, timeout=30_000)
    assert time.monotonic() - t0 < 10  # stopped, and its cluster closed, within seconds
    assert _no_new_children(before)
    assert not notes.errors and "cancelled" in notes.infos[-1]
    assert store_status(out) == "incomplete"
    assert {w for w, _, _ in seen} == {"blocks"}
    assert viewer.layers["c.zarr nuclei (incomplete)"]
    # the same store again: resumed, not refused, and the result is the uninterrupted one
    seen.clear()
    section._start.native.click()
    qtbot.waitUntil(lambda: not section.running, timeout=RUN_TIMEOUT)
    assert not notes.errors, notes.errors
    blocks = [t for w, _, t in seen if w == "blocks"]
    assert blocks and blocks[0] < 9  # only the blocks the first run did not finish
    assert store_status(out) == "complete"
    np.testing.assert_array_equal(store_labels(out), store_labels(reference))
    assert viewer.layers["c.zarr nuclei"].metadata["status"] == "complete"


def _running(make_napari_viewer, qtbot, slide_path, out):
    """A panel whose whole-slide run into ``out`` has finished its first block."""
    viewer, widget, _layer = open_slide_in_panel(make_napari_viewer, slide_path)
    seen = []
    widget._slide._relay.progress.connect(lambda *a: seen.append(a))
    before = _children()
    section = start_run(widget, out)
    qtbot.waitUntil(lambda: bool(seen), timeout=RUN_TIMEOUT)  # the first block is done
    return viewer, widget, section, before


@pytest.mark.slow
def test_closing_the_viewer_stops_the_run_and_its_cluster(make_napari_viewer, qtbot, notes,
                                                          slide_path, tmp_path):  # fmt: skip
    out = tmp_path / "x.zarr"
    viewer, widget, section, before = _running(make_napari_viewer, qtbot, slide_path, out)
    t0 = time.monotonic()
    viewer.close()
    qtbot.waitUntil(lambda: not section.running, timeout=30_000)
    assert widget._closed and time.monotonic() - t0 < 15
    assert _no_new_children(before)  # no orphan worker process
    assert store_status(out) == "incomplete"
    assert not notes.errors


@pytest.mark.slow
def test_removing_the_panel_stops_the_run(make_napari_viewer, qtbot, notes, slide_path,
                                          tmp_path):  # fmt: skip
    """Taking the Segment dock away (the panel object lives on) must not leave a run unseen."""
    out = tmp_path / "r.zarr"
    viewer, widget, section, before = _running(make_napari_viewer, qtbot, slide_path, out)
    viewer.window.remove_dock_widget(widget.native)
    qtbot.waitUntil(lambda: not section.running, timeout=30_000)
    assert _no_new_children(before)
    assert store_status(out) == "incomplete"
    assert not notes.errors and "cancelled" in notes.infos[-1]


def test_bad_output_store_is_one_line_and_starts_nothing(make_napari_viewer, notes, slide_path,
                                                         tmp_path):  # fmt: skip
    _viewer, widget, _layer = open_slide_in_panel(make_napari_viewer, slide_path)
    section = widget._slide
    before = _children()
    (tmp_path / "theirs.zarr").mkdir()  # a folder segment-slide did not write
    for bad, why in ((tmp_path / "out.txt", ".zarr folder"), (tmp_path / "theirs.zarr", "not")):
        notes.errors.clear()
        section._store.value = bad
        section._start.native.click()
        assert len(notes.errors) == 1 and str(bad) in notes.errors[0] and why in notes.errors[0]
        assert "\n" not in notes.errors[0] and not section.running
    assert not (tmp_path / "out.txt").exists() and not any((tmp_path / "theirs.zarr").iterdir())
    assert not _children() - before  # no cluster was started


def test_an_error_while_undocking_is_logged_not_raised(qtbot, caplog):
    """A Qt event filter that raised would abort the whole process (unsaved work too)."""
    from magicgui.widgets import Container
    from qtpy.QtWidgets import QWidget

    from napari_medinst._napari._common import on_undocked

    panel, dock = Container(), QWidget()
    qtbot.addWidget(dock)
    calls = []

    def boom():
        calls.append(1)
        raise RuntimeError("wrapped C/C++ object has been deleted")

    watcher = on_undocked(panel, boom)
    panel.native.setParent(dock)
    assert not calls  # docking is not undocking
    with caplog.at_level("ERROR"):
        panel.native.setParent(None)
    assert calls == [1] and watcher is not None
    assert "stopping the panel's work failed" in caplog.text
