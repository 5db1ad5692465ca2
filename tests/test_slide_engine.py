"""Whole slides on dask.distributed: plan, two phases into a zarr store, resume, bad input."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from conftest import load_script
from napari_medinst import slide as sl
from napari_medinst import slide_engine as se
from napari_medinst.blockwise import segment_blockwise
from napari_medinst.cli import main
from napari_medinst.segment import segment

zarr = pytest.importorskip("zarr")
pytest.importorskip("imagecodecs")
distributed = pytest.importorskip("distributed")
mts = load_script("make_test_slide")

SIZE = 3000  # level 0 at 0.25 µm/px; level 1 (1500 px, 0.5 µm/px) is the working level
BLOCK = 512


@pytest.fixture(scope="module")
def tiles():
    return [mts.read_image(mts.BUNDLED_TILE)[..., :3]]


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory, tiles):
    path, _ = mts.make_slide(tmp_path_factory.mktemp("slide") / "s.ome.tif", SIZE, "ome-tiff",
                             tiles=tiles)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, slide_path, client):
    """Every block segmented (no tissue mask), for the comparisons."""
    plan = se.plan_slide(slide_path, "classical", block=BLOCK, min_tissue=0)
    out = tmp_path_factory.mktemp("full") / "out.zarr"
    run = se.run_slide(plan, out, client)
    return plan, out, run


def _labels(out: Path, level: int = 0) -> np.ndarray:
    return zarr.open_array(str(se.labels_path(out) / str(level)), mode="r")[:]


def _table(out: Path) -> dict[str, np.ndarray]:
    data = np.genfromtxt(out / "nuclei.csv", delimiter=",", names=True)
    return {name: np.atleast_1d(data[name]) for name in data.dtype.names}


def _one_piece_each(lab: np.ndarray) -> bool:
    for i, sl_ in enumerate(ndi.find_objects(lab), start=1):
        if sl_ is not None and ndi.label(lab[sl_] == i)[1] != 1:
            return False
    return True


def test_plan_reads_the_working_level_and_finds_background(slide_path):
    plan = se.plan_slide(slide_path, "classical", block=BLOCK)
    assert plan.level == 1 and plan.shape == (1500, 1500)  # never level 0
    assert plan.setup.pixel_size == pytest.approx(0.5) and not plan.setup.pixel_size_estimated
    assert len(plan.specs) == 9 and plan.dtype == "uint32"
    assert 0 < len(plan.background) < len(plan.specs)
    # ids cannot collide: a window holds fewer pixels than the stride
    assert all((s.window[1] - s.window[0]) * (s.window[3] - s.window[2]) < plan.stride
               for s in plan.specs)  # fmt: skip


def test_distributed_equals_the_in_memory_block_path(full_run, slide_path):
    plan, out, run = full_run
    assert run.complete and not run.failed and run.segmented == 9
    lab = _labels(out)
    assert lab.shape == plan.shape and lab.dtype == np.uint32
    ids = np.unique(lab[lab > 0])
    assert _one_piece_each(lab)  # each id one connected nucleus: nothing cut or doubled
    table = _table(out)
    assert np.array_equal(np.sort(table["id"].astype(np.int64)), ids.astype(np.int64))
    # the table's centroids and areas are those of the labels, in slide µm
    cy = ndi.mean(np.indices(lab.shape)[0] + 0.5, lab, ids) * 0.5
    order = np.argsort(table["id"])
    np.testing.assert_allclose(table["centroid_y_um"][order], cy, atol=1e-3)
    area = ndi.sum(np.ones_like(lab), lab, ids) * 0.25
    np.testing.assert_allclose(table["area_um2"][order], area, atol=1e-3)
    # the same working-level image segmented in memory, block by block
    image = sl.read_region(slide_path, 1, 0, 1500, 0, 1500)
    ref = segment_blockwise(image, "classical", pixel_size=0.5, block=BLOCK).labels
    pairs, counts = np.unique(np.stack([ref[ref > 0], lab[ref > 0]]), axis=1, return_counts=True)
    ref_area = np.bincount(ref.ravel())
    ours_area = dict(zip(*np.unique(lab, return_counts=True), strict=True))
    same = sum(1 for (a, b), n in zip(pairs.T, counts, strict=True)
               if b and n == ref_area[a] == ours_area[b])  # fmt: skip
    n_ref = int(np.count_nonzero(ref_area[1:]))
    assert n_ref > 500 and same / n_ref >= 0.99
    assert abs(len(ids) - n_ref) <= 0.01 * n_ref


def test_background_blocks_are_skipped_and_recorded(tmp_path, slide_path, client):
    plan = se.plan_slide(slide_path, "classical", block=BLOCK)
    run = se.run_slide(plan, tmp_path / "t.zarr", client)
    assert run.complete and run.n_background == len(plan.background) > 0
    assert run.segmented == len(plan.specs) - len(plan.background)
    for k in plan.background:
        meta = json.loads((tmp_path / "t.zarr" / "records" / f"{k:06d}.json").read_text())
        assert meta["background"] and meta["n"] == 0
        assert not (tmp_path / "t.zarr" / "records" / f"{k:06d}.npz").exists()
    attrs = json.loads((tmp_path / "t.zarr" / ".zattrs").read_text())[se.STORE_KEY]
    assert attrs["status"] == "complete" and attrs["scale_um"] == [0.5, 0.5]
    assert attrs["level"] == 1 and attrs["downsample"] == 2.0


def test_resume_redoes_only_what_is_missing(tmp_path, full_run, client):
    plan, done, _ = full_run
    out = tmp_path / "r.zarr"
    shutil.copytree(done, out)
    before = _labels(out)
    coarse = _labels(out, 2)
    levels = [zarr.open_array(str(se.labels_path(out) / str(i)), mode="r+") for i in (0, 2)]
    for k in (0, 4):  # two chunks lose their marker and their labels
        (out / "chunks" / f"{k:06d}.npy").unlink()
        r0, r1, c0, c1 = se.chunk_box(plan, k)
        levels[0][r0:r1, c0:c1] = 0
        levels[1][r0 // 4 : -(-r1 // 4), c0 // 4 : -(-c1 // 4)] = 0
    (out / "nuclei.csv").unlink()
    run = se.run_slide(plan, out, client, resume=True)
    assert run.complete and run.segmented == 0 and run.painted == 2
    np.testing.assert_array_equal(_labels(out), before)
    np.testing.assert_array_equal(_labels(out, 2), coarse)
    assert (out / "nuclei.csv").read_bytes() == (done / "nuclei.csv").read_bytes()
    # a block's record lost: that block again, and the chunks it feeds
    (out / "records" / "000000.json").unlink()
    run = se.run_slide(plan, out, client, resume=True)
    assert run.segmented == 1 and 1 <= run.painted < 9
    np.testing.assert_array_equal(_labels(out), before)


def test_should_stop_cancels_and_resume_finishes(tmp_path, full_run, client):
    from napari_medinst.model.inference import CancelledError

    plan, done, _ = full_run
    out = tmp_path / "c.zarr"
    seen, stop_at = [], []

    def progress(what, k, n, elapsed):
        seen.append(what)
        stop_at.append(time.perf_counter())

    with pytest.raises(CancelledError):
        se.run_slide(plan, out, client, progress=progress, should_stop=lambda: bool(seen))
    assert time.perf_counter() - stop_at[0] < 3.0  # stopped at once, not after every block
    assert set(seen) == {"blocks"}
    attrs = json.loads((out / ".zattrs").read_text())[se.STORE_KEY]
    assert attrs["status"] == "incomplete"
    assert not list((out / "chunks").glob("*.npy")) and not (out / "nuclei.csv").exists()
    assert len(list((out / "records").glob("*.json"))) < len(plan.specs)
    run = se.run_slide(plan, out, client, resume=True)
    assert run.complete and 0 < run.segmented < len(plan.specs)
    np.testing.assert_array_equal(_labels(out), _labels(done))
    assert (out / "nuclei.csv").read_bytes() == (done / "nuclei.csv").read_bytes()


def _cli(*args: str) -> int:
    return main(["segment-slide", *args, "--model", "classical", "--block-size", str(BLOCK)])


def test_existing_store_is_refused_and_only_ours_replaced(tmp_path, slide_path, client, capsys):
    addr = client.scheduler.address
    out = tmp_path / "o.zarr"
    assert _cli(str(slide_path), "-o", str(out), "--scheduler", addr) == 0
    stamp = (out / "nuclei.csv").stat().st_mtime_ns
    capsys.readouterr()
    assert _cli(str(slide_path), "-o", str(out), "--scheduler", addr) == 2
    err = capsys.readouterr().err
    assert "o.zarr: already exists" in err and "--resume" in err and len(err.splitlines()) == 1
    assert (out / "nuclei.csv").stat().st_mtime_ns == stamp
    assert _cli(str(slide_path), "-o", str(out), "--scheduler", addr, "--overwrite") == 0
    other = tmp_path / "other.zarr"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert _cli(str(slide_path), "-o", str(other), "--scheduler", addr, "--overwrite") == 2
    assert "not a store napari-medinst segment-slide wrote" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine"
    assert _cli(str(slide_path), "-o", str(tmp_path / "new.zarr"), "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_unreachable_scheduler_fails_fast(tmp_path, slide_path, capsys):
    t0 = time.monotonic()
    rc = _cli(str(slide_path), "-o", str(tmp_path / "u.zarr"), "--scheduler", "tcp://127.0.0.1:1")
    assert rc == 2 and time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert "--scheduler tcp://127.0.0.1:1: cannot reach the scheduler" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "u.zarr").exists()


def test_no_free_disk_is_refused_before_work(tmp_path, slide_path, monkeypatch, capsys):
    from collections import namedtuple

    from napari_medinst import _io

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(_io.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    assert _cli(str(slide_path), "-o", str(tmp_path / "d.zarr")) == 2
    assert "free on its disk" in capsys.readouterr().err
    assert not (tmp_path / "d.zarr").exists()


def test_failed_block_is_reported_and_left_without_marker(tmp_path, tiles, client, monkeypatch,
                                                         capsys):  # fmt: skip
    path, _ = mts.make_slide(tmp_path / "bad.ome.tif", SIZE, "ome-tiff", tiles=tiles)
    import tifffile

    with tifffile.TiffFile(path) as tif:  # the first tile of level 1 (block 0's window)
        page = tif.series[0].levels[1].keyframe
        offset, count = page.dataoffsets[0], page.databytecounts[0]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * count)
    monkeypatch.setattr(se, "ESTIMATE_CROP", 512)  # the plan's central crop is intact
    out = tmp_path / "bad.zarr"
    args = [str(path), "-o", str(out), "--scheduler", client.scheduler.address, "--min-tissue", "0"]
    assert _cli(*args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "block 0: InputError" in err and "level 1 region" in err and "--resume" in err
    assert not (out / "records" / "000000.json").exists()
    assert not (out / "chunks" / "000000.npy").exists() and not (out / "nuclei.csv").exists()
    attrs = json.loads((out / ".zattrs").read_text())[se.STORE_KEY]
    assert attrs["status"] == "incomplete"


def test_slide_without_pixel_size_is_estimated_and_said(tmp_path, tiles, client, capsys):
    path, _ = mts.make_slide(tmp_path / "nopx.svs", 1200, "svs", tiles=tiles, mpp=None)
    out = tmp_path / "n.zarr"
    assert _cli(str(path), "-o", str(out), "--scheduler", client.scheduler.address) == 0
    assert "states no pixel size; estimated" in capsys.readouterr().err
    attrs = json.loads((out / ".zattrs").read_text())[se.STORE_KEY]
    assert attrs["pixel_size_estimated"] is True and attrs["status"] == "complete"


def test_default_model_on_a_small_slide(tmp_path, tiles, client):
    path, _ = mts.make_slide(tmp_path / "small.svs", 800, "svs", tiles=tiles, mpp=0.5)
    plan = se.plan_slide(path, "default", block=512, tta=False, min_tissue=0)
    run = se.run_slide(plan, tmp_path / "m.zarr", client)
    assert run.complete and plan.level == 0 and len(plan.specs) == 4
    lab = _labels(tmp_path / "m.zarr")
    assert run.n_nuclei > 50 and len(np.unique(lab)) - 1 == run.n_nuclei
    assert _one_piece_each(lab)


def test_default_model_runs_each_region_once_and_equals_the_whole_image(tmp_path, tiles, client):
    # 40x slide whose working level is level 0 (the network runs at half its resolution)
    path, _ = mts.make_slide(tmp_path / "s.svs", 4000, "svs", tiles=tiles, mpp=0.25)
    plan = se.plan_slide(path, "default", block=1024, tta=False, min_tissue=0)
    assert plan.level == 0 and len(plan.specs) == 16 and len(plan.regions) == 8
    assert {g for u in plan.uses for g in u} == {r.index for r in plan.regions}
    out = tmp_path / "m.zarr"
    run = se.run_slide(plan, out, client)
    assert run.complete and not (out / "maps").exists()  # regions removed at the end
    lab = _labels(out)
    image = sl.read_region(path, 0, 0, 4000, 0, 4000)
    whole = segment(image, "default", pixel_size=0.25, tta=False).labels
    assert int(whole.max()) > 300 and _one_piece_each(lab)
    # each nucleus of the whole-image path is one nucleus of the store, pixel for pixel
    pairs, counts = np.unique(np.stack([whole.ravel(), lab.ravel()]), axis=1, return_counts=True)
    area_w, area_l = np.bincount(whole.ravel()), dict(zip(*np.unique(lab, return_counts=True),
                                                           strict=True))  # fmt: skip
    same = sum(1 for (a, b), n in zip(pairs.T, counts, strict=True)
               if a and b and n == area_w[a] == area_l[b])  # fmt: skip
    assert same / int(whole.max()) >= 0.995


def test_resume_reuses_the_regions_left_on_disk(tmp_path, tiles, client):
    path, _ = mts.make_slide(tmp_path / "s.svs", 1600, "svs", tiles=tiles, mpp=0.5)
    plan = se.plan_slide(path, "default", block=512, tta=False, min_tissue=0)
    assert len(plan.regions) == 6
    out = tmp_path / "r.zarr"
    ref = se.run_slide(plan, tmp_path / "ref.zarr", client)
    # an interrupted run: the regions are there, no block is
    se._create_store(se.check_store(out, resume=False, overwrite=False), plan, False)
    for region in plan.regions:
        se.maps_task(plan, region.index, str(out), "cpu", None)
    assert len(list((out / "maps").iterdir())) == 6
    # the first region's file says "no nuclei here": a resumed run that reads it (rather
    # than computing the region again) leaves that part of the slide empty
    first = plan.regions[0]
    path0 = se._map_path(out, first)
    np.save(path0, np.zeros_like(np.load(path0)))
    run = se.run_slide(plan, out, client, resume=True)
    assert run.complete and ref.complete and not (out / "maps").exists()
    lab, want = _labels(out), _labels(tmp_path / "ref.zarr")
    _, r1, _, c1 = first.box  # the working scale is the slide's here
    inner = (slice(0, r1 - 40), slice(0, c1 - 40))
    assert not lab[inner].any() and np.count_nonzero(np.unique(want[inner])) > 20
    far = (slice(r1 + 80, None), slice(None))  # (ids differ: a block's local ids shift)
    pairs = np.unique(np.stack([lab[far].ravel(), want[far].ravel()]), axis=1)
    assert np.array_equal(lab[far] > 0, want[far] > 0) and (pairs[0] > 0).sum() > 100
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def _disk(shape, centre, radius):
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius**2


def _bar(shape, rows, cols):
    mask = np.zeros(shape, bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def _seam_blocks(shape):
    """Four blocks whose owned nuclei clash on the seams: a duplicate, a small overlap,
    and a bar cut in two by a neighbour's nucleus."""
    from napari_medinst.blockwise import plan_blocks

    specs = plan_blocks(shape, 100, 30)
    owned = {0: [_disk(shape, (50, 99), 8), _disk(shape, (20, 95), 6), _bar(shape, (70, 90), (98, 101)),
                 _disk(shape, (98, 60), 7)],
             1: [_disk(shape, (50, 101), 8), _disk(shape, (20, 105), 6), _bar(shape, (80, 83), (94, 111))],
             2: [_disk(shape, (101, 60), 7), _disk(shape, (150, 99), 9)],
             3: [_disk(shape, (150, 110), 5)]}  # fmt: skip
    return specs, owned


def _block_result(spec, masks):
    from napari_medinst.blockwise import BlockResult

    r0, r1, c0, c1 = spec.window
    labels = np.zeros((r1 - r0, c1 - c0), np.uint32)
    for i, m in enumerate(masks, start=1):
        labels[m[r0:r1, c0:c1] & (labels == 0)] = i
    scores = np.linspace(0.5, 0.9, len(masks)).astype(np.float32)
    return BlockResult(spec, labels, scores, None, 0)


def _paint_store(tmp_path, name, chunk, results):
    from napari_medinst.blockwise import prepare_setup

    setup = prepare_setup(np.zeros((64, 64, 3), np.uint8), "classical", pixel_size=0.5)
    plan = se.SlidePlan(path="synthetic", stamp=(0, 0), level=0, downsample=1.0,
                        shape=(200, 200), setup=setup, model="classical",
                        specs=tuple(r.spec for r in results), background=frozenset(),
                        chunk=chunk, stride=2**16, dtype="uint32")  # fmt: skip
    out = tmp_path / name
    se._create_store(out, plan, False)
    metas = {r.spec.index: se.save_record(out, r) for r in results}
    reach = 2 * max(m["max_side"] for m in metas.values()) + 2
    n = plan.n_chunks[0] * plan.n_chunks[1]
    rows = sum(se.paint_task(plan, k, str(out), se.feeders(plan, k, reach), reach)
               for k in range(n))  # fmt: skip
    return _labels(out), rows


def test_seam_clashes_resolved_like_the_in_memory_path_whatever_the_chunks(tmp_path):
    from napari_medinst.blockwise import paste_block

    specs, owned = _seam_blocks((200, 200))
    results = [_block_result(s, owned[s.index]) for s in specs]
    ref, last = np.zeros((200, 200), np.uint32), 0
    for r in results:
        _, last = paste_block(ref, r, last)
    lab64, rows = _paint_store(tmp_path, "c64.zarr", 64, results)  # chunks cut every nucleus
    lab200, _ = _paint_store(tmp_path, "c200.zarr", 200, results)  # one chunk
    np.testing.assert_array_equal(lab64, lab200)
    # the same pixel sets as paste_block: 10 claims, the two duplicates dropped, overlaps
    # go to the first block, the cut bar keeps its larger piece
    assert last == 8 and len(np.unique(lab64)) - 1 == 8 == rows
    pairs = np.unique(np.stack([ref.ravel(), lab64.ravel()]), axis=1)
    assert pairs.shape[1] == 9 and np.array_equal((ref > 0), (lab64 > 0))
    assert _one_piece_each(lab64)
    bar = lab64[81, 101]
    assert bar == 1 * 2**16 + 3 and not (lab64[80:83, 94:98] == bar).any()


def test_command_line_defaults_are_the_engines():
    from napari_medinst import slide_cli
    from napari_medinst._napari import _slide_job

    assert slide_cli.DEFAULT_BLOCK == se.DEFAULT_BLOCK == _slide_job.DEFAULT_BLOCK
    assert slide_cli.MIN_TISSUE == se.MIN_TISSUE


# ------------------------------------------------------------- OME-NGFF label image


def test_labels_are_an_ome_ngff_label_image_with_a_pyramid(full_run):
    from napari_medinst.omezarr import read_labels_zarr_table

    plan, out, _ = full_run
    assert json.loads((out / "labels" / ".zattrs").read_text()) == {"labels": ["nuclei"]}
    attrs = json.loads((se.labels_path(out) / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4" and attrs["image-label"]["version"] == "0.4"
    assert ms["axes"] == [{"name": a, "type": "space", "unit": "micrometer"} for a in "yx"]
    n = se.label_levels(plan.shape, plan.chunk)
    assert n == 4  # 1500 px: 750, 375, 188 (< 256 stops); 512 px chunks halve to 64
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2", "3"]
    for i, d in enumerate(ms["datasets"]):
        assert d["coordinateTransformations"] == [{"type": "scale", "scale": [0.5 * 2**i] * 2}]
    level0 = _labels(out)
    for i in range(n):  # nearest neighbour: ids are never blended
        meta = json.loads((se.labels_path(out) / str(i) / ".zarray").read_text())
        assert meta["chunks"] == [BLOCK >> i] * 2 and meta["dimension_separator"] == "/"
        np.testing.assert_array_equal(_labels(out, i), level0[:: 2**i, :: 2**i])
    # the package's own OME-Zarr labels reader finds it through the store's root
    back = read_labels_zarr_table(out)
    assert back.pixel_size == 0.5 and back.offset == (0, 0)
    np.testing.assert_array_equal(back.labels, level0)


def test_ome_zarr_reads_the_label_image(full_run):
    ome_reader = pytest.importorskip("ome_zarr.reader")
    from ome_zarr.io import parse_url

    plan, out, _ = full_run
    nodes = list(ome_reader.Reader(parse_url(str(out / "labels")))())
    label = next(n for n in nodes if n.load(ome_reader.Label) is not None)
    assert len(label.data) == se.label_levels(plan.shape, plan.chunk)
    assert tuple(label.data[0].shape) == plan.shape
    assert [a["name"] for a in label.metadata["axes"]] == ["y", "x"]
    np.testing.assert_array_equal(np.asarray(label.data[1]), _labels(out, 1))


@pytest.mark.parametrize(("shape", "chunk", "levels"), [
    ((1500, 1500), 512, 4), ((20000, 20000), 2048, 6), ((5000, 5000), 2048, 6),
    ((300, 300), 512, 2), ((1500, 1500), 100, 1), ((1500, 1500), 200, 2),
    ((200, 200), 2048, 1)])  # fmt: skip
def test_label_levels_halve_whole_chunks(shape, chunk, levels):
    assert se.label_levels(shape, chunk) == levels


def test_resume_refuses_a_store_of_the_older_layout(tmp_path, full_run, client):
    plan, done, _ = full_run
    out = tmp_path / "old.zarr"
    shutil.copytree(done, out)
    attrs = json.loads((out / ".zattrs").read_text())
    attrs[se.STORE_KEY]["format"] = 1
    (out / ".zattrs").write_text(json.dumps(attrs))
    with pytest.raises(se.InputError, match=r"old\.zarr: written by another version"):
        se.run_slide(plan, out, client, resume=True)


def _table_store(tmp_path, n_rows: int):
    """A store whose single chunk holds ``n_rows`` table rows (ids shuffled)."""
    from napari_medinst.blockwise import plan_blocks, prepare_setup

    setup = prepare_setup(np.zeros((64, 64, 3), np.uint8), "classical", pixel_size=0.5)
    plan = se.SlidePlan(path="synthetic", stamp=(0, 0), level=0, downsample=1.0,
                        shape=(200, 200), setup=setup, model="classical",
                        specs=tuple(plan_blocks((200, 200), 200, 16)), background=frozenset(),
                        chunk=200, stride=2**16, dtype="uint32")  # fmt: skip
    out = tmp_path / "t.zarr"
    (out / "chunks").mkdir(parents=True)
    rng = np.random.default_rng(0)
    table = np.zeros(n_rows, dtype=se._TABLE)
    table["id"] = rng.permutation(n_rows) + 1
    for name in ("centroid_y_um", "centroid_x_um", "area_um2"):
        table[name] = rng.uniform(0, 5000, n_rows)
    table["type"] = -1
    np.save(out / "chunks" / "000000.npy", table)
    return out, plan, table


def test_nuclei_table_is_written_in_batches(tmp_path, monkeypatch):
    import tracemalloc

    out, plan, table = _table_store(tmp_path, 100_000)
    monkeypatch.setattr(se, "_CSV_BATCH", 4096)  # a small share of the rows, as on a slide
    tracemalloc.start()
    try:
        assert se.write_table(out, plan) == table.size
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    text = (out / "nuclei.csv").read_bytes()
    # the rows' text (~7 MB here) is never held whole: the loaded and sorted table, and
    # one batch
    assert peak < 2 * table.nbytes + len(text) // 2
    lines = text.decode().splitlines()
    assert lines[0].startswith("id,centroid_y_um") and "type" not in lines[0]
    assert len(lines) == table.size + 1 and lines[1].startswith("1,")
    monkeypatch.setattr(se, "_CSV_BATCH", 7)  # batch borders change nothing
    se.write_table(out, plan)
    assert (out / "nuclei.csv").read_bytes() == text


class _Recording:
    """A client that records what each submitted task receives."""

    def __init__(self, client):
        self._client, self.args = client, []

    def submit(self, fn, *args, **kw):
        self.args.append((fn.__name__, args))
        return self._client.submit(fn, *args, **kw)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_the_plan_goes_to_the_workers_once(tmp_path, slide_path, client):
    plan = se.plan_slide(slide_path, "classical", block=BLOCK, min_tissue=0)
    rec = _Recording(client)
    run = se.run_slide(plan, tmp_path / "p.zarr", rec)
    assert run.complete
    carriers = [name for name, args in rec.args if any(a is plan for a in args)]
    assert carriers == ["_plan_task"]  # every other task gets it as a dependency
    assert len(rec.args) == 1 + 9 + 9  # the plan, 9 blocks, 9 chunks
