"""The slide reader contribution: File > Open gives a lazy multiscale layer in µm."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_medinst._napari import _segment_widget as sw
from napari_medinst._napari._slide_reader import get_slide_reader

pytestmark = pytest.mark.gui
pytest.importorskip("imagecodecs")
PLUGIN = "napari-medinst"
_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_test_slide.py"
_spec = importlib.util.spec_from_file_location("make_test_slide", _SCRIPT)
mts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mts)


@pytest.mark.parametrize(("name", "fmt"), [("s.svs", "svs"), ("s.ome.tif", "ome-tiff")])
def test_open_slide_is_lazy_multiscale_in_micrometres(make_napari_viewer, tmp_path, level_reads,
                                                      name, fmt):  # fmt: skip
    tiles = [mts.read_image(mts.BUNDLED_TILE)[..., :3]]
    path, _ = mts.make_slide(tmp_path / name, 4000, fmt, tiles=tiles)
    viewer = make_napari_viewer()
    [layer] = viewer.open(path, plugin=PLUGIN)
    viewer.window._qt_viewer.canvas._scene_canvas.update()
    layer.refresh()
    assert layer.multiscale and layer.rgb
    assert len(layer.data) == len(mts.level_shapes(4000, 4 if fmt == "svs" else 2))
    np.testing.assert_allclose(layer.scale, [0.25, 0.25])
    assert layer.metadata["pixel_size_um"] == pytest.approx(0.25)
    assert layer.metadata["slide_path"] == str(path)
    assert sw._pixel_size_from_layer(layer) == pytest.approx(0.25)
    # napari drew a coarse level; level 0 (16 Mpx) was never decoded
    assert level_reads, "nothing was read: the layer was never drawn"
    assert 0 not in level_reads, sorted(set(level_reads))
    assert layer.data_level > 0


def test_plain_tiff_is_left_to_napari(tmp_path):
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.zeros((64, 64, 3), np.uint8))
    assert get_slide_reader(str(small)) is None
    pyramid = tmp_path / "pyr.tif"
    mts.make_slide(pyramid, 512, "tiff", tiles=[mts.read_image(mts.BUNDLED_TILE)[..., :3]])
    assert get_slide_reader(str(pyramid)) is not None
    assert get_slide_reader([str(pyramid), str(small)]) is None


def test_labels_only_zarr_is_not_claimed(tmp_path):
    folder = tmp_path / "labels.zarr"
    folder.mkdir()
    (folder / ".zattrs").write_text('{"labels": ["nuclei"]}')
    assert get_slide_reader(str(folder)) is None


def test_slide_without_pixel_size_opens_unscaled(make_napari_viewer, tmp_path):
    path, _ = mts.make_slide(tmp_path / "s.ome.tif", 1024, "tiff",
                             tiles=[mts.read_image(mts.BUNDLED_TILE)[..., :3]], mpp=None)  # fmt: skip
    viewer = make_napari_viewer()
    [layer] = viewer.open(path, plugin=PLUGIN)
    np.testing.assert_allclose(layer.scale, [1.0, 1.0])
    assert "pixel_size_um" not in layer.metadata
    assert "estimated" in layer.metadata["pixel_size_source"]
    assert sw._pixel_size_from_layer(layer) is None


def _slide_store(root: Path, status: str) -> np.ndarray:
    """A segment-slide output store as the engine lays it out (two label levels)."""
    import json

    import zarr

    from napari_medinst.omezarr import label_image_attrs
    from napari_medinst.slide_engine import STORE_KEY

    lab = np.zeros((64, 96), np.uint32)
    lab[10:20, 10:20], lab[40:50, 60:80] = 7, 300001
    group = zarr.open_group(str(root), mode="w", zarr_format=2)
    group.attrs[STORE_KEY] = {"status": status}
    nuclei = group.create_group("labels").create_group("nuclei")
    for i in range(2):
        level = lab[:: 2**i, :: 2**i]
        nuclei.create_array(str(i), shape=level.shape, dtype=level.dtype, chunks=(32, 32))
        nuclei[str(i)][...] = level
    (root / "labels" / "nuclei" / ".zattrs").write_text(
        json.dumps(label_image_attrs("nuclei", 2, 0.5))
    )
    return lab


@pytest.mark.parametrize("status", ["complete", "incomplete"])
def test_a_slide_result_opens_as_lazy_multiscale_labels_in_micrometres(
    make_napari_viewer, tmp_path, status
):
    lab = _slide_store(tmp_path / "out.zarr", status)
    reader = get_slide_reader(str(tmp_path / "out.zarr"))
    assert reader is not None
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "out.zarr"), plugin=PLUGIN)
    assert layer.multiscale and len(layer.data) == 2
    assert type(layer.data[0]).__name__ == "Array"  # dask: nothing read up front
    np.testing.assert_array_equal(np.asarray(layer.data[0]), lab)
    np.testing.assert_allclose(layer.scale, (0.5, 0.5))
    assert ("incomplete" in layer.name) == (status != "complete")
