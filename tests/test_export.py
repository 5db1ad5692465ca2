import numpy as np
import pytest
import tifffile

from conftest import disk_labels
from napari_medinst._io import InputError
from napari_medinst.export import export_sample
from napari_medinst.model.data import load_folder
from napari_medinst.targets import hv_maps


def test_export_appends_never_overwrites_and_loads_for_training(tmp_path):
    lab = disk_labels((96, 96), ((30, 30), (30, 52), (70, 60)), 10)
    img = np.where(lab[..., None] > 0, [90, 40, 140], [230, 200, 220]).astype(np.uint8)
    a = export_sample(tmp_path, img, lab, name="slide 1", pixel_size=0.25, modality="he")
    b = export_sample(tmp_path, img, lab, name="slide 1", pixel_size=0.25, modality="he")
    assert a.sample_id == "slide_1" and b.sample_id == "slide_1-2"
    assert tifffile.imread(a.labels_path).max() == 3
    targets = tifffile.imread(tmp_path / "targets" / "slide_1.tif")
    np.testing.assert_allclose(targets[1:3], hv_maps(lab))
    rows = (tmp_path / "index.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("id,height")
    samples = load_folder(tmp_path)
    assert len(samples) == 2 and samples[0].modality == "he"
    assert samples[0].scale == pytest.approx(0.5)  # 0.25 µm/px brought to 0.5 µm/px


def test_verified_only_crops_and_masks_the_rest(tmp_path):
    lab = disk_labels((120, 120), ((20, 20), (90, 90)), 8)
    img = np.where(lab > 0, 200, 10).astype(np.uint8)
    res = export_sample(tmp_path, img, lab, name="v", verified_ids=[1], margin=4)
    out = tifffile.imread(res.labels_path)
    assert out.max() == 1 and res.region[2] < 60
    with pytest.raises(InputError, match="verified"):
        export_sample(tmp_path, img, lab, name="v", verified_ids=[])


def test_export_bad_input(tmp_path):
    with pytest.raises(InputError, match="different shapes"):
        export_sample(
            tmp_path, np.zeros((10, 10), np.uint8), np.zeros((10, 12), np.int32), name="x"
        )
    with pytest.raises(InputError, match="empty"):
        export_sample(
            tmp_path, np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.int32), name="x"
        )


def test_export_keeps_existing_index_columns_and_files_are_readable(tmp_path):
    (tmp_path / "index.csv").write_text("id,height,width,organ\nold,10,10,kidney\n")
    lab = disk_labels((64, 64), ((20, 20),), 8)
    res = export_sample(tmp_path, np.where(lab > 0, 200, 20).astype(np.uint8), lab, name="new")
    text = (tmp_path / "index.csv").read_text().splitlines()
    assert text[0].startswith("id,height,width,organ") and "kidney" in text[1]
    assert res.image_path.stat().st_mode & 0o044  # group/others may read, as usual


# -------------------------------------------------------- all or nothing (checked first)


def _snapshot(folder):
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _pair():
    lab = disk_labels((64, 64), ((20, 20), (40, 44)), 8)
    return np.where(lab > 0, 200, 20).astype(np.uint8), lab


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("manifest.json", b'{"samples": [', "manifest.json: not valid JSON"),
        ("manifest.json", b"[]", "manifest.json: unexpected structure"),
        ("manifest.json", b'{"samples": [1]}', "manifest.json: unexpected structure"),
        ("manifest.json", '{"samples": [], "note": "Gewebe ä"}'.encode("latin-1"), "not UTF-8"),
        ("index.csv", "id,organ\nold,Gewebe ä\n".encode("latin-1"), "index.csv: not UTF-8"),
        ("index.csv", b"", "index.csv: has no header row"),
        ("index.csv", b"name,organ\nold,kidney\n", "index.csv: the header has no 'id' column"),
        ("index.csv", b"id,organ\na,x\nb,y\na,z\n", r"id 'a' appears twice \(lines 2 and 4"),
    ],
)
def test_bad_index_or_manifest_is_refused_and_nothing_written(tmp_path, name, content, match):
    img, lab = _pair()
    export_sample(tmp_path, img, lab, name="first")
    (tmp_path / name).write_bytes(content)
    before = _snapshot(tmp_path)
    with pytest.raises(InputError, match=match):
        export_sample(tmp_path, img, lab, name="second")
    assert _snapshot(tmp_path) == before  # no image, labels, targets; index untouched


def test_new_id_avoids_ids_of_the_index_without_files(tmp_path):
    (tmp_path / "index.csv").write_text("id,height\nslide,10\n")
    img, lab = _pair()
    assert export_sample(tmp_path, img, lab, name="slide").sample_id == "slide-2"


def test_failed_write_changes_nothing_and_leaves_no_staging(tmp_path, monkeypatch):
    """Disk full at the targets (the float TIFF): nothing is moved into place."""
    import errno
    import os

    img, lab = _pair()
    export_sample(tmp_path, img, lab, name="first")
    before = _snapshot(tmp_path)
    real = tifffile.imwrite

    def imwrite(path, data, **kwargs):
        if np.asarray(data).dtype == np.float32:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", imwrite)
    with pytest.raises(OSError) as info:
        export_sample(tmp_path, img, lab, name="second")
    assert info.value.errno == errno.ENOSPC and "second.tif" in info.value.filename
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "images",
        "index.csv",
        "labels",
        "manifest.json",
        "targets",
    ]


def test_failed_manifest_rename_puts_everything_back(tmp_path, monkeypatch):
    import errno
    import os

    img, lab = _pair()
    export_sample(tmp_path, img, lab, name="first")
    before = _snapshot(tmp_path)
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith("manifest.json"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="manifest"):
        export_sample(tmp_path, img, lab, name="second")
    assert _snapshot(tmp_path) == before  # index.csv restored, second.tif files removed


def test_a_killed_exports_staging_folder_is_removed_next_time(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    staging = tmp_path / f".staging.{dead.pid}-abcdefgh.part"
    (staging / "images").mkdir(parents=True)
    (staging / "images" / "half.tif").write_bytes(b"II*")
    img, lab = _pair()
    export_sample(tmp_path, img, lab, name="next")
    assert not staging.exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".part")]
