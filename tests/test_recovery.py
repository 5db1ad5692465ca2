"""Autosave records tied to their source, and the crash-proof ground-truth TIFF / CSV pair."""

from __future__ import annotations

import re
from datetime import datetime

import numpy as np
import pytest
import tifffile

from conftest import disk_labels
from napari_medinst import editing, recovery
from napari_medinst._io import InputError, write_bytes, write_tiff
from napari_medinst.recovery import Record, Source


def source(path=None, base="b" * 64, image="i" * 64, shape=(96, 96), origin="x"):
    return Source(path=path, origin=origin, base_sha256=base, image_sha256=image, shape=shape)


# ---------------------------------------------------------------------------- hashes


def test_labels_hash_ignores_dtype_but_not_values_or_shape():
    lab = disk_labels()
    h = recovery.labels_sha256(lab)
    assert recovery.labels_sha256(lab.astype(np.uint16)) == h
    assert recovery.labels_sha256(lab.astype(np.int64)) == h
    moved = lab.copy()
    moved[0, 0] = 7
    assert recovery.labels_sha256(moved) != h
    flat = np.arange(6).reshape(2, 3)
    assert recovery.labels_sha256(flat) != recovery.labels_sha256(flat.reshape(3, 2))


def test_hashes_are_the_same_block_by_block(monkeypatch):
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 50, (37, 23))
    img = rng.integers(0, 255, (37, 23, 3), dtype=np.uint8)
    whole = recovery.labels_sha256(lab), recovery.image_sha256(img)
    monkeypatch.setattr(recovery, "_BLOCK", 50)  # two rows per block
    assert (recovery.labels_sha256(lab), recovery.image_sha256(img)) == whole


def test_image_hash_tells_images_apart():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    b = a.copy()
    b[10, 10] ^= 1
    assert recovery.image_sha256(a) == recovery.image_sha256(a.copy())
    assert recovery.image_sha256(a) != recovery.image_sha256(b)
    assert recovery.image_sha256(a) != recovery.image_sha256(a.astype(np.uint16))


def test_paired_image_is_the_nearest_below_else_above():
    # layer list bottom to top: image, labels(gt), image
    assert recovery.paired_image_index(1, [True, False, True]) == 0
    assert recovery.paired_image_index(3, [True, False, True, False]) == 2
    assert recovery.paired_image_index(0, [False, False, True, True]) == 2
    assert recovery.paired_image_index(1, [False, False]) is None


def test_changed_nuclei_counts_added_deleted_and_restatused():
    base = {1: "predicted", 2: "predicted", 3: "verified"}
    now = {1: "edited", 3: "verified", 4: "edited"}  # 1 edited, 2 deleted, 4 new
    assert recovery.changed_nuclei(base, now) == 3
    assert recovery.changed_nuclei(base, base) == 0


# ---------------------------------------------------------------------- source rules


def test_a_file_source_matches_only_the_same_file():
    a = source(path="/data/A.tif", base="1" * 64, image="2" * 64)
    assert a.matches(source(path="/data/A.tif", base="3" * 64, image=None))
    assert not a.matches(source(path="/data/B.tif", base="1" * 64, image="2" * 64))
    assert not a.matches(source(path=None, base="1" * 64, image="2" * 64))
    assert not a.matches(source(path="/data/A.tif", shape=(96, 97)))
    assert a.key() != source(path="/data/B.tif").key()


def test_a_new_layer_needs_the_same_labels_and_image():
    a = source(base="1" * 64, image="2" * 64, origin="new from prediction 'p'")
    assert a.matches(source(base="1" * 64, image="2" * 64, origin="anything else"))
    assert not a.matches(source(base="1" * 64, image="9" * 64))
    assert not a.matches(source(base="9" * 64, image="2" * 64))
    assert not a.matches(source(base="1" * 64, image=None))
    assert a.key() == source(base="1" * 64, image="2" * 64, origin="other").key()
    assert a.key() != source(base="1" * 64, image="9" * 64).key()


# --------------------------------------------------------------------------- records


def test_record_round_trip_and_listing(tmp_path):
    lab = disk_labels()
    src = source(path=str(tmp_path / "A.tif"), origin="A.tif")
    record = recovery.new_record(src, "labels", lab, {1: "edited", 2: "verified"}, 2)
    path = recovery.write_record(tmp_path, record, lab)
    assert path == recovery.record_path(tmp_path, src) and path.name == f"{src.key()}.tif"
    assert not list(tmp_path.glob("*.part"))
    back = recovery.read_record(path)
    assert back == record
    np.testing.assert_array_equal(recovery.read_record_labels(path, back), lab)
    assert "A.tif" in back.describe() and record.saved in back.describe()
    assert "2 changed nuclei" in back.describe()
    # junk in the folder is skipped, not fatal
    write_tiff(tmp_path / "labels__96x96.tif", lab)  # an old-style autosave
    (tmp_path / "broken.tif").write_bytes(b"not a tiff")
    assert recovery.list_records(tmp_path) == [(path, record)]
    assert recovery.list_records(tmp_path / "missing") == []


def test_damaged_or_swapped_autosave_is_refused(tmp_path):
    lab = disk_labels()
    record = recovery.new_record(source(), "labels", lab, {}, 0)
    path = recovery.write_record(tmp_path, record, lab)
    other = lab.copy()
    other[other == 1] = 0
    tifffile.imwrite(path, other, metadata={"napari_medinst": record.to_dict()})
    with pytest.raises(InputError, match="do not match their record"):
        recovery.read_record_labels(path, recovery.read_record(path))
    with pytest.raises(InputError, match="damaged autosave record"):
        Record.from_dict({"schema": recovery.RECORD_SCHEMA, "layer": "x"}, "r.tif")


# ---------------------------------------------------------- ground truth TIFF + CSV


def test_status_csv_carries_the_labels_hash_and_old_readers_still_work():
    status = {2: "verified", 1: "edited"}
    text = recovery.status_csv(status, "ab" * 32)
    assert text.splitlines()[0] == "label,status,labels_sha256"
    assert editing.status_from_csv(text) == status  # readers of label,status only
    assert recovery.read_status_csv(text) == (status, "ab" * 32)
    assert recovery.read_status_csv(editing.status_to_csv(status)) == (status, None)
    mixed = text.replace("ab" * 32, "cd" * 32, 1)
    with pytest.raises(InputError, match="labels_sha256"):
        recovery.read_status_csv(mixed, "gt_status.csv")


def test_ground_truth_round_trip(tmp_path):
    lab = disk_labels()
    status = {1: "verified", 2: "edited", 3: "predicted"}
    tif, csv = tmp_path / "gt.tif", tmp_path / "gt_status.csv"
    digest, kept = recovery.write_ground_truth(tif, lab, status, csv)
    assert digest == recovery.labels_sha256(lab) and kept is None
    data, got, warning = recovery.read_ground_truth(tif, csv)
    np.testing.assert_array_equal(data, lab)
    assert got == status and warning is None
    # the CSV is the user's to edit: a matching CSV wins over the embedded table
    write_bytes(csv, recovery.status_csv({1: "edited"}, digest).encode(), overwrite=True)
    assert recovery.read_ground_truth(tif, csv)[1] == {1: "edited"}
    csv.unlink()  # the TIFF alone still has its statuses
    assert recovery.read_ground_truth(tif, csv)[1:] == (status, None)


def test_crash_between_tiff_and_csv_never_pairs_new_labels_with_old_statuses(tmp_path, monkeypatch):
    old = disk_labels()
    tif, csv = tmp_path / "gt.tif", tmp_path / "gt_status.csv"
    recovery.write_ground_truth(tif, old, {1: "verified", 2: "verified", 3: "verified"}, csv)
    old_csv = csv.read_bytes()
    new = old.copy()
    new[new == 2] = 0
    new_status = {1: "edited", 3: "predicted"}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(recovery, "write_bytes", crash)
    with pytest.raises(OSError):
        recovery.write_ground_truth(tif, new, new_status, csv)
    assert csv.read_bytes() == old_csv  # the crash left the old CSV
    data, status, warning = recovery.read_ground_truth(tif, csv)
    np.testing.assert_array_equal(data, new)
    assert status == new_status  # the TIFF's own statuses, not the CSV's
    assert "gt_status.csv" in warning and "ignored" in warning


def test_old_files_still_load_and_a_stale_csv_is_ignored(tmp_path):
    lab = disk_labels()
    tif, csv = tmp_path / "gt.tif", tmp_path / "gt_status.csv"
    write_tiff(tif, lab)  # written before statuses were embedded
    write_bytes(csv, editing.status_to_csv({1: "verified"}).encode())
    assert recovery.read_ground_truth(tif, csv)[1:] == ({1: "verified"}, None)
    # a hashed CSV of other labels beside a TIFF without embedded statuses: loaded for
    # the ids present, with a warning to check them (see the test below)
    other = recovery.labels_sha256(lab[::-1])
    write_bytes(csv, recovery.status_csv({1: "verified"}, other).encode(), overwrite=True)
    _, status, warning = recovery.read_ground_truth(tif, csv)
    assert status == {1: "verified"} and "other labels" in warning and "check them" in warning
    # an old CSV beside a TIFF that embeds its own statuses: the TIFF wins
    recovery.write_ground_truth(tif, lab, {1: "edited"}, tmp_path / "elsewhere.csv")
    write_bytes(csv, editing.status_to_csv({1: "verified"}).encode(), overwrite=True)
    _, status, warning = recovery.read_ground_truth(tif, csv)
    assert status == {1: "edited"} and "is older" in warning


def test_a_status_csv_that_is_not_utf8_is_named(tmp_path):
    tif, csv = tmp_path / "gt.tif", tmp_path / "gt_status.csv"
    recovery.write_ground_truth(tif, disk_labels(), {1: "verified"}, csv)
    csv.write_bytes("label,status\n1,vérifié\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"gt_status\.csv: not UTF-8"):
        recovery.read_ground_truth(tif, csv)


def test_a_hand_edited_row_without_hash_still_loads(tmp_path):
    """A row added in a spreadsheet without copying the hash must not block loading."""
    lab = disk_labels()
    tif, csv = tmp_path / "gt.tif", tmp_path / "gt_status.csv"
    recovery.write_ground_truth(tif, lab, {1: "verified", 2: "predicted", 3: "predicted"}, csv)
    lines = csv.read_text().splitlines()
    lines[-1] = "3,verified,"
    csv.write_text("\n".join(lines) + "\n")
    assert recovery.read_ground_truth(tif, csv)[1:] == (
        {1: "verified", 2: "predicted", 3: "verified"},
        None,
    )
    lines[-1] = "3,verified," + "cd" * 32  # a non-empty cell that disagrees: named by line
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"gt_status\.csv, line 4: labels_sha256 differs"):
        recovery.read_ground_truth(tif, csv)


def test_statuses_survive_labels_changed_by_another_program(tmp_path):
    """A 1-pixel fix in another program drops the embedded table and changes the hash."""
    lab = disk_labels()
    tif, csv = tmp_path / "gt.tif", tmp_path / "gt_status.csv"
    status = {1: "verified", 2: "verified", 3: "edited"}
    recovery.write_ground_truth(tif, lab, status, csv)
    fixed = lab.copy()
    fixed[fixed == 3] = 0  # nucleus 3 removed, a pixel of a new nucleus 4 added
    fixed[0, 0] = 4
    write_tiff(tif, fixed, overwrite=True)
    _, got, warning = recovery.read_ground_truth(tif, csv)
    assert got == {1: "verified", 2: "verified"}  # the ids still present
    assert "gt_status.csv was written for other labels than gt.tif" in warning
    assert "check them" in warning


def test_a_save_keeps_a_status_csv_that_was_not_loaded(tmp_path):
    """Saving replaces the CSV only if it was the table of the labels replaced."""
    lab = disk_labels()
    tif, csv = tmp_path / "gt.tif", tmp_path / "gt_status.csv"
    recovery.write_ground_truth(tif, lab, {1: "verified", 2: "verified"}, csv)
    review = csv.read_bytes()
    fixed = lab.copy()
    fixed[0, 0] = 4
    write_tiff(tif, fixed, overwrite=True)  # changed outside: the CSV no longer matches
    saved = recovery.write_ground_truth(tif, fixed, {1: "predicted", 4: "predicted"}, csv)
    assert saved.kept_csv is not None and saved.kept_csv.read_bytes() == review
    assert re.fullmatch(r"gt_status\.stale-\d{8}-\d{6}\.csv", saved.kept_csv.name)
    assert recovery.read_ground_truth(tif, csv)[1:] == ({1: "predicted", 4: "predicted"}, None)
    # now the CSV is the table of the labels replaced: no copy
    assert recovery.write_ground_truth(tif, fixed, {1: "edited"}, csv).kept_csv is None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["gt.tif", "gt_status.csv", saved.kept_csv.name]
    )


def test_a_kept_status_csv_never_replaces_an_earlier_copy(tmp_path, monkeypatch):
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2024, 1, 2, 3, 4, 5)

    monkeypatch.setattr(recovery, "datetime", Frozen)
    lab = disk_labels()
    tif, csv = tmp_path / "gt.tif", tmp_path / "gt_status.csv"
    earlier = tmp_path / "gt_status.stale-20240102-030405.csv"
    earlier.write_bytes(b"earlier copy")
    csv.write_bytes(b"label,status\n1,maybe\n")  # unreadable: kept too
    saved = recovery.write_ground_truth(tif, lab, {1: "verified"}, csv)  # no TIFF before
    assert saved.kept_csv == tmp_path / "gt_status.stale-20240102-030405-2.csv"
    assert saved.kept_csv.read_bytes() == b"label,status\n1,maybe\n"
    assert earlier.read_bytes() == b"earlier copy"


def test_a_failed_save_leaves_no_copy_of_the_csv(tmp_path, monkeypatch):
    lab = disk_labels()
    tif, csv = tmp_path / "gt.tif", tmp_path / "gt_status.csv"
    write_bytes(csv, recovery.status_csv({1: "verified"}, "ab" * 32).encode())

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recovery, "_write_tiff", crash)
    with pytest.raises(OSError):
        recovery.write_ground_truth(tif, lab, {1: "edited"}, csv)
    assert [p.name for p in tmp_path.iterdir()] == ["gt_status.csv"]
    assert recovery.read_status_csv(csv.read_text()) == ({1: "verified"}, "ab" * 32)


def test_each_editor_of_one_source_has_its_own_autosave_file(tmp_path):
    src = source(path="/data/gt.tif")
    a = recovery.record_path(tmp_path, src, "aaaa1111")
    b = recovery.record_path(tmp_path, src, "bbbb2222")
    assert a != b and a.parent == b.parent == tmp_path
    assert (
        a.name.startswith(src.key())
        and recovery.record_path(tmp_path, src).name == f"{src.key()}.tif"
    )
    lab = disk_labels()
    for token, changed in (("aaaa1111", 1), ("bbbb2222", 2)):
        rec = recovery.new_record(src, "gt", lab, {1: "edited"}, changed)
        recovery.write_record(tmp_path, rec, lab, token)
    listed = recovery.list_records(tmp_path)
    assert sorted(p.name for p, _ in listed) == sorted([a.name, b.name])
    assert sorted(r.changed for _, r in listed) == [1, 2]
