"""Correcting a region of a whole-slide result and writing it back (slide_edit)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from conftest import bundled_tile_slide
from napari_medinst import slide_edit as ed
from napari_medinst import slide_engine as se
from napari_medinst._io import InputError

zarr = pytest.importorskip("zarr")
pytest.importorskip("imagecodecs")
distributed = pytest.importorskip("distributed")

SIZE = 2048  # level 0 at 0.25 µm/px; the working level (1024 px) is the labels' level 0
BLOCK = 256  # 16 chunks; pyramid levels 0, 1, 2
BOX = (300, 560, 300, 560)  # a region inside the tissue, crossing chunk borders


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> se.SlidePlan:
    folder = tmp_path_factory.mktemp("slide")
    return se.plan_slide(bundled_tile_slide(folder, SIZE), "classical", block=BLOCK, tta=False,
                         min_tissue=0)  # fmt: skip


@pytest.fixture(scope="module")
def threads():
    """A dask.distributed client of one in-process worker (a small slide needs no more)."""
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                       dashboard_address=None)  # fmt: skip
    with distributed.Client(cluster) as client:
        yield client
    cluster.close()


@pytest.fixture(scope="module")
def made(tmp_path_factory, plan, threads) -> Path:
    """A complete store of the classical model on a small generated slide."""
    out = tmp_path_factory.mktemp("made") / "made.zarr"
    assert se.run_slide(plan, out, threads).complete
    return out


@pytest.fixture
def store(made, tmp_path) -> Path:
    out = tmp_path / "s.zarr"
    shutil.copytree(made, out)
    return out


def level(out: Path, i: int = 0) -> np.ndarray:
    return zarr.open_array(str(se.labels_path(out) / str(i)), mode="r")[:]


def table(out: Path) -> dict[int, np.ndarray]:
    data = np.genfromtxt(out / "nuclei.csv", delimiter=",", names=True)
    return {int(r["id"]): r for r in np.atleast_1d(data)}


def measured(lab: np.ndarray, px: float) -> dict[int, tuple]:
    """Centroid, bounding box (µm) and area (µm²) of every nucleus, as the engine's table."""
    ids, inv = np.unique(lab, return_inverse=True)
    compact = inv.reshape(lab.shape)
    out = {}
    for k, sl in enumerate(ndi.find_objects(compact), start=1):
        if sl is None or ids[k] == 0:
            continue
        rr, cc = np.nonzero(compact[sl] == k)
        rr, cc = rr + sl[0].start, cc + sl[1].start
        out[int(ids[k])] = ((rr.mean() + 0.5) * px, (cc.mean() + 0.5) * px, rr.min() * px,
                            cc.min() * px, (rr.max() + 1) * px, (cc.max() + 1) * px,
                            rr.size * px * px)  # fmt: skip
    return out


def check_table_matches_labels(out: Path) -> None:
    px = json.loads((out / ".zattrs").read_text())[se.STORE_KEY]["scale_um"][0]
    want, got = measured(level(out), px), table(out)
    assert set(got) == set(want)
    cols = ("centroid_y_um", "centroid_x_um", "bbox_y0_um", "bbox_x0_um", "bbox_y1_um",
            "bbox_x1_um", "area_um2")  # fmt: skip
    for i, values in want.items():
        np.testing.assert_allclose([got[i][c] for c in cols], values, atol=1e-3)
    chunks = np.concatenate([np.load(p) for p in sorted((out / "chunks").glob("*.npy"))])
    assert sorted(chunks["id"].tolist()) == sorted(want)  # the chunk tables too, once each


def check_pyramid(out: Path) -> None:
    top = level(out)
    n = json.loads((out / ".zattrs").read_text())[se.STORE_KEY]["label_levels"]
    assert n == 3
    for i in range(1, n):
        np.testing.assert_array_equal(level(out, i), top[:: 2**i, :: 2**i])


def snapshot(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}  # fmt: skip


def editable(region: ed.SlideRegion, min_area: int = 30) -> list[int]:
    """Nuclei of the requested box that may be edited, largest first."""
    r0, r1, c0, c1 = region.requested
    b = region.box
    inner = region.labels[r0 - b[0] : r1 - b[0], c0 - b[2] : c1 - b[2]]
    ids, counts = np.unique(inner, return_counts=True)
    keep = [(c, int(i)) for i, c in zip(ids, counts, strict=True)
            if i and int(i) not in region.locked and c >= min_area]  # fmt: skip
    return [i for _, i in sorted(keep, reverse=True)]


def edit_four_ways(region: ed.SlideRegion):
    """Delete one, add one, reshape one and split one nucleus; returns (edited, ids)."""
    lab = region.labels.copy()
    split, grown, gone = editable(region)[:3]
    lab[lab == gone] = 0
    rr, cc = np.nonzero(lab == split)
    half = rr < np.median(rr)
    assert 0 < half.sum() < rr.size
    lab[rr[half], cc[half]] = 9001  # a new id for the split-off part
    wider = ndi.binary_dilation(lab == grown, iterations=2) & (lab == 0)
    lab[wider] = grown
    empty = np.argwhere(ndi.binary_erosion(lab == 0, np.ones((9, 9))))
    r, c = empty[len(empty) // 2]
    lab[r - 3 : r + 4, c - 3 : c + 4] = 9002  # a new nucleus in background
    return lab, {"split": split, "grown": grown, "gone": gone}


def test_round_trip_keeps_ids_unique_table_pyramid_and_status(store):
    before = level(store)
    top = int(before.max())
    region = ed.read_region(store, BOX)
    b = region.box
    assert b[0] <= BOX[0] and b[1] >= BOX[1] and b[2] <= BOX[2] and b[3] >= BOX[3]
    # every nucleus touching the requested box is whole in the region
    inner = set(np.unique(before[BOX[0] : BOX[1], BOX[2] : BOX[3]]).tolist()) - {0}
    outside = before.copy()
    outside[b[0] : b[1], b[2] : b[3]] = 0
    assert not inner & set(np.unique(outside).tolist())
    assert not inner & region.locked
    assert set(region.status.values()) == {"predicted"}

    lab, ids = edit_four_ways(region)
    status = dict(region.status)
    status[ids["grown"]] = "verified"  # verified after the reshape
    res = ed.write_region(store, region.box, region.labels, lab, status)
    assert (res.added, res.deleted, res.changed) == (2, 1, 2)
    assert sorted(res.new_ids) == [9001, 9002]
    assert min(res.new_ids.values()) > top  # above every id of the slide
    after = level(store)
    want = lab.astype(np.int64)
    for old, new in res.new_ids.items():
        want[lab == old] = new
    np.testing.assert_array_equal(after[b[0] : b[1], b[2] : b[3]], want)
    outside_before, outside_after = before.copy(), after.copy()
    outside_before[b[0] : b[1], b[2] : b[3]] = outside_after[b[0] : b[1], b[2] : b[3]] = 0
    np.testing.assert_array_equal(outside_after, outside_before)  # only the region changed
    for new in res.new_ids.values():  # unique over the slide: nowhere else
        assert (after == new).sum() == (want == new).sum() > 0
    assert ids["gone"] not in table(store)
    check_table_matches_labels(store)
    check_pyramid(store)
    split_new = res.new_ids[9001]
    assert table(store)[split_new]["score"] != table(store)[split_new]["score"]  # NaN: by hand

    again = ed.read_region(store, BOX)  # the statuses survive: the store keeps them
    assert again.status[ids["grown"]] == "verified"
    assert again.status[ids["split"]] == "edited" and again.status[split_new] == "edited"
    assert again.status[res.new_ids[9002]] == "edited"
    assert ids["gone"] not in again.status

    lab2 = again.labels.copy()  # a second edit: one more nucleus, elsewhere in the region
    empty = np.argwhere(ndi.binary_erosion(lab2 == 0, np.ones((9, 9))))
    r, c = empty[len(empty) // 3]
    lab2[r - 2 : r + 3, c - 2 : c + 3] = 5
    res2 = ed.write_region(store, again.box, again.labels, lab2, again.status)
    assert res2.added == 1 and min(res2.new_ids.values()) > max(res.new_ids.values())
    third = ed.read_region(store, BOX)
    assert third.status[ids["grown"]] == "verified"  # kept across the second write
    assert third.status[res2.new_ids[5]] == "edited"
    check_table_matches_labels(store)
    check_pyramid(store)
    attrs = json.loads((store / ".zattrs").read_text())
    assert attrs[ed.EDIT_KEY]["edits"] == 2
    assert attrs[ed.EDIT_KEY]["next_id"] == max(res2.new_ids.values()) + 1
    assert attrs[se.STORE_KEY]["status"] == "complete"
    assert not (store / ed.JOURNAL).exists() and not (store / ed.LOCK).exists()


def test_a_status_change_alone_is_written(store):
    region = ed.read_region(store, BOX)
    i = editable(region)[0]
    res = ed.write_region(store, region.box, region.labels, region.labels, {i: "verified"})
    assert res.added == res.deleted == res.changed == 0
    assert ed.read_region(store, BOX).status[i] == "verified"
    assert (store / ed.REVIEW_CSV).read_text() == f"label,status\n{i},verified\n"


def test_nothing_changed_writes_nothing(store):
    region = ed.read_region(store, BOX)
    files = snapshot(store)
    ed.write_region(store, region.box, region.labels, region.labels.copy(), region.status)
    assert snapshot(store) == files


def _incomplete(store: Path) -> None:
    attrs = json.loads((store / ".zattrs").read_text())
    attrs[se.STORE_KEY]["status"] = "incomplete"
    (store / ".zattrs").write_text(json.dumps(attrs))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("incomplete", "is incomplete, not complete"),
        ("outside", "outside the labels"),
        ("stale", "changed since it was read"),
        ("shape", "edited: shape"),
        ("dtype", "edited: labels must be integers, got dtype float32"),
        ("negative", "edited: labels contain negative values"),
        ("locked", "crosses the edge of the region"),
        ("status", "unknown status 'done'"),
    ],
)
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(store, case, message):
    region = ed.read_region(store, BOX)
    box, original, edited, status = region.box, region.labels, region.labels.copy(), None
    if case == "incomplete":
        _incomplete(store)
    elif case == "outside":
        box = (900, 1100, 0, 100)
    elif case == "stale":  # someone else wrote the region meanwhile
        other = region.labels.copy()
        other[other == editable(region)[0]] = 0
        ed.write_region(store, region.box, region.labels, other)
    elif case == "shape":
        edited = edited[:-1]
    elif case == "dtype":
        edited = edited.astype(np.float32)
    elif case == "negative":
        edited = edited.astype(np.int64)
        edited[0, 0] = -1
    elif case == "locked":
        assert region.locked
        edited[edited == min(region.locked)] = 0
    elif case == "status":
        status = {editable(region)[0]: "done"}
    files = snapshot(store)
    with pytest.raises(InputError, match=message) as info:
        ed.write_region(store, box, original, edited, status)
    assert "\n" not in str(info.value)
    assert snapshot(store) == files


def test_read_refuses_an_incomplete_store_and_a_box_outside(store):
    with pytest.raises(InputError, match="outside the labels"):
        ed.read_region(store, (0, 10, 1000, 1030))
    _incomplete(store)
    with pytest.raises(InputError, match="is incomplete"):
        ed.read_region(store, BOX)


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(store):
    region = ed.read_region(store, BOX)
    (store / ed.LOCK).write_text("1@some-other-host")
    with pytest.raises(InputError, match="another process"):
        ed.write_region(store, region.box, region.labels, region.labels, {})


def test_an_empty_lock_is_taken_over_only_once_it_is_old(store):
    """A writer that died between creating and filling its lock does not block forever."""
    region = ed.read_region(store, BOX)
    lock = store / ed.LOCK
    lock.write_text("")  # just created by a live writer: wait for it
    with pytest.raises(InputError, match="another process"):
        ed.write_region(store, region.box, region.labels, region.labels, {})
    old = time.time() - 2 * ed.EMPTY_LOCK_S
    os.utime(lock, (old, old))  # its writer is long gone
    ed.write_region(store, region.box, region.labels, region.labels, {})
    assert not lock.exists()


def _result(out: Path) -> tuple:
    n = json.loads((out / ".zattrs").read_text())[se.STORE_KEY]["label_levels"]
    review = out / ed.REVIEW_CSV
    return ([level(out, i) for i in range(n)], (out / "nuclei.csv").read_bytes(),
            review.read_bytes() if review.exists() else None,
            json.loads((out / ".zattrs").read_text()).get(ed.EDIT_KEY))  # fmt: skip


def _same(a: tuple, b: tuple) -> None:
    for x, y in zip(a[0], b[0], strict=True):
        np.testing.assert_array_equal(x, y)
    assert a[1:] == b[1:]


def _die_in(monkeypatch, step: str) -> None:
    """Make the write stop (as a killed process would) at ``step`` of the apply."""
    if step == "pyramid":  # level 0 written, the coarser levels not yet
        real_level = ed._level

        def level_(st, i, mode="r"):
            if i >= 1 and mode == "r+":
                raise KeyboardInterrupt
            return real_level(st, i, mode)

        monkeypatch.setattr(ed, "_level", level_)
        return

    def die(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ed, step, die)


@pytest.mark.parametrize("step", ["pyramid", "_apply_tables", "_apply_review", "_apply_attrs",
                                  "_drop_journal"])  # fmt: skip
def test_a_write_killed_mid_apply_is_finished_from_the_journal(store, tmp_path, monkeypatch,
                                                               step):  # fmt: skip
    clean = tmp_path / "clean.zarr"
    shutil.copytree(store, clean)
    region = ed.read_region(store, BOX)
    lab, ids = edit_four_ways(region)
    status = {**region.status, ids["grown"]: "verified"}
    ed.write_region(clean, region.box, region.labels, lab, status)  # uninterrupted

    _die_in(monkeypatch, step)
    with pytest.raises(KeyboardInterrupt):
        ed.write_region(store, region.box, region.labels, lab, status)
    monkeypatch.undo()
    assert (store / ed.JOURNAL).exists()
    if step != "_drop_journal":  # the store is half-written now
        with pytest.raises(AssertionError):
            _same(_result(store), _result(clean))
    if step in ("pyramid", "_apply_attrs"):
        ed.read_region(store, BOX)  # reading finishes the write first
    else:  # pressing "write back" again finishes it, then says the region changed
        with pytest.raises(InputError, match="an interrupted write was just finished"):
            ed.write_region(store, region.box, region.labels, lab, status)
    assert not (store / ed.JOURNAL).exists()
    _same(_result(store), _result(clean))
    assert ed.read_region(store, BOX).status == ed.read_region(clean, BOX).status
    check_table_matches_labels(store)
    check_pyramid(store)


def test_a_write_killed_before_its_journal_leaves_the_store_as_it_was(store, monkeypatch):
    region = ed.read_region(store, BOX)
    lab, _ = edit_four_ways(region)
    files = snapshot(store)

    def die(st, journal):
        raise KeyboardInterrupt

    monkeypatch.setattr(ed, "_write_journal", die)
    with pytest.raises(KeyboardInterrupt):
        ed.write_region(store, region.box, region.labels, lab)
    assert snapshot(store) == files


def test_applying_a_journal_twice_gives_the_same_store(store, tmp_path, monkeypatch):
    region = ed.read_region(store, BOX)
    lab, _ = edit_four_ways(region)
    monkeypatch.setattr(ed, "_drop_journal", lambda st: None)  # killed before the delete
    ed.write_region(store, region.box, region.labels, lab)
    once = _result(store)
    monkeypatch.undo()
    assert ed.recover(store) is True  # the whole journal again
    _same(_result(store), once)
    assert ed.recover(store) is False


def test_edits_survive_a_resumed_run_of_the_engine(store, plan, threads):
    region = ed.read_region(store, BOX)
    lab, ids = edit_four_ways(region)
    ed.write_region(store, region.box, region.labels, lab, {ids["grown"]: "verified"})
    edited = _result(store)
    run = se.run_slide(plan, store, threads, resume=True)  # nothing to redo: the table again
    assert run.complete and run.painted == 0
    _same(_result(store), edited)
    assert json.loads((store / ".zattrs").read_text())[se.STORE_KEY]["status"] == "complete"
    assert ed.read_region(store, BOX).status[ids["grown"]] == "verified"


def test_overwriting_a_corrected_store_keeps_the_corrections(store, plan, threads, capsys):
    region = ed.read_region(store, BOX)
    lab, ids = edit_four_ways(region)
    ed.write_region(store, region.box, region.labels, lab, {ids["grown"]: "verified"})
    edited = _result(store)
    run = se.run_slide(plan, store, threads, overwrite=True)
    assert run.complete
    kept = [p for p in store.parent.glob(f"{store.stem}.edited-*.zarr")]
    assert len(kept) == 1 and str(kept[0]) in capsys.readouterr().err
    _same(_result(kept[0]), edited)  # the corrections are all there, under the new name
    assert ed.read_region(kept[0], BOX).status[ids["grown"]] == "verified"
    assert "napari_medinst_edits" not in json.loads((store / ".zattrs").read_text())
