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
