"""OME-Zarr labels: written by us, read by the ``ome-zarr`` library's own reader."""

import json
import os

import numpy as np
import pytest

from conftest import disk_labels
from napari_medinst._io import InputError
from napari_medinst.measure import measure_nuclei
from napari_medinst.omezarr import level_count, read_labels_zarr, write_labels_zarr

ome_zarr = pytest.importorskip("ome_zarr")
from ome_zarr.format import FormatV04  # noqa: E402
from ome_zarr.io import parse_url  # noqa: E402
from ome_zarr.reader import Label, Labels, Multiscales, Reader  # noqa: E402


def _big_labels(shape=(600, 520)):
    lab = np.zeros(shape, np.uint32)
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    for i, (r, c) in enumerate([(50, 60), (300, 250), (520, 400), (120, 480)], start=1):
        lab[(rr - r) ** 2 + (cc - c) ** 2 <= 30**2] = i * 10
    return lab


def _nodes(path):
    return list(Reader(parse_url(str(path)))())


def _label_node(path):
    found = [n for n in _nodes(path) if n.load(Label)]
    assert len(found) == 1, [n.specs for n in _nodes(path)]
    return found[0]


def test_pyramid_level_rule():
    assert level_count((100, 80)) == 1
    assert level_count((255, 255)) == 1
    assert level_count((256, 10)) == 2  # 256 -> 128
    assert level_count((600, 520)) == 3  # 600 -> 300 -> 150
    with pytest.raises(InputError, match="levels"):
        level_count((10, 10), 0)


def test_library_reader_finds_labels_pyramid_colours_properties(tmp_path):
    lab = _big_labels()
    cols = measure_nuclei(lab, pixel_size=0.5)
    out = write_labels_zarr(
        tmp_path / "tile_labels.zarr",
        lab,
        pixel_size=0.5,
        colours={10: (255, 0, 0), 20: (0, 255, 0, 128)},
        properties=cols,
    )
    assert out == tmp_path / "tile_labels.zarr" / "nuclei"
    node = _label_node(tmp_path / "tile_labels.zarr")
    assert node.load(Multiscales) is not None
    assert node.metadata["name"] == "nuclei"
    assert [lvl.shape for lvl in node.data] == [(600, 520), (300, 260), (150, 130)]
    np.testing.assert_array_equal(np.asarray(node.data[0]), lab)
    np.testing.assert_array_equal(np.asarray(node.data[1]), lab[::2, ::2])  # nearest neighbour
    assert set(np.unique(np.asarray(node.data[2]))) <= {0, 10, 20, 30, 40}
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    assert scales == [[0.5, 0.5], [1.0, 1.0], [2.0, 2.0]]
    assert node.metadata["color"][10] == [1.0, 0.0, 0.0, 1.0]
    assert node.metadata["color"][20] == pytest.approx([0, 1, 0, 128 / 255])
    props = node.metadata["properties"]
    assert sorted(props) == [10, 20, 30, 40]
    assert props[20]["area_um2"] == pytest.approx(float(cols["area_um2"][1]))
    assert [a["unit"] for a in node.metadata["axes"]] == ["micrometer", "micrometer"]
    np.testing.assert_array_equal(read_labels_zarr(tmp_path / "tile_labels.zarr"), lab)


def test_labels_inside_an_existing_image_zarr(tmp_path):
    import zarr
    from ome_zarr.writer import write_image

    img = np.random.default_rng(0).integers(0, 255, (3, 600, 520), dtype=np.uint8)
    root = tmp_path / "image.zarr"
    group = zarr.open_group(str(root), mode="w", zarr_format=2)
    write_image(img, group, axes="cyx", fmt=FormatV04())
    lab = _big_labels()
    write_labels_zarr(root, lab, name="other", levels=1)
    write_labels_zarr(root, lab, properties={10: {"status": "verified"}})
    nodes = _nodes(root)
    assert nodes[0].load(Multiscales) is not None and nodes[0].data[0].shape == img.shape
    assert any(n.load(Labels) for n in nodes)
    labels = {n.metadata["name"]: n for n in nodes if n.load(Label)}
    assert set(labels) == {"other", "nuclei"}  # the first label image was kept
    assert len(labels["nuclei"].data) == 3 and len(labels["other"].data) == 1
    assert labels["nuclei"].metadata["properties"][10] == {"status": "verified"}
    attrs = json.loads((root / "labels" / "nuclei" / ".zattrs").read_text())
    assert attrs["image-label"]["source"] == {"image": "../../"}
    np.testing.assert_array_equal(read_labels_zarr(root, name="nuclei"), lab)
    np.testing.assert_array_equal(read_labels_zarr(root / "labels" / "other"), lab)
    with pytest.raises(InputError, match=r"image\.zarr: the image is \(600, 520\)"):
        write_labels_zarr(root, lab[:100], name="small")


def test_never_overwrites_without_permission_and_leaves_no_parts(tmp_path):
    path = tmp_path / "labels.zarr"
    first = disk_labels()
    write_labels_zarr(path, first)
    with pytest.raises(FileExistsError, match="already exists"):
        write_labels_zarr(path, np.zeros_like(first))
    np.testing.assert_array_equal(read_labels_zarr(path), first)
    second = disk_labels(centres=((20, 20),))
    write_labels_zarr(path, second, overwrite=True)
    np.testing.assert_array_equal(read_labels_zarr(path), second)
    assert sorted(os.listdir(tmp_path)) == ["labels.zarr"]


def test_failed_write_leaves_the_old_store(tmp_path, monkeypatch):
    from napari_medinst import omezarr

    path = tmp_path / "labels.zarr"
    first = disk_labels()
    write_labels_zarr(path, first)

    def broken(folder, levels, attrs):
        (folder / "junk").mkdir(parents=True)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(omezarr, "_write_label_group", broken)
    with pytest.raises(OSError, match="No space"):
        write_labels_zarr(path, np.zeros_like(first), overwrite=True)
    monkeypatch.undo()
    np.testing.assert_array_equal(read_labels_zarr(path), first)
    assert sorted(os.listdir(tmp_path)) == ["labels.zarr"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "../x"}, "not a valid label name"),
        ({"colours": {1: (300, 0, 0)}}, "colours: label 1"),
        ({"pixel_size": 0}, "pixel size"),
    ],
)
def test_bad_arguments_are_one_line_messages(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        write_labels_zarr(tmp_path / "x.zarr", disk_labels(), **kwargs)
    assert not list(tmp_path.iterdir())


def test_reading_something_else_is_a_clear_message(tmp_path):
    (tmp_path / "empty.zarr").mkdir()
    (tmp_path / "empty.zarr" / ".zgroup").write_text('{"zarr_format": 2}')
    with pytest.raises(InputError, match=r"empty\.zarr: no OME-Zarr labels"):
        read_labels_zarr(tmp_path / "empty.zarr")
    with pytest.raises(InputError, match="no such OME-Zarr folder"):
        read_labels_zarr(tmp_path / "missing.zarr")
    write_labels_zarr(tmp_path / "l.zarr", disk_labels())
    with pytest.raises(InputError, match=r"no label image 'cells' \(there are: nuclei\)"):
        read_labels_zarr(tmp_path / "l.zarr", name="cells")


def test_without_zarr_installed_is_a_clear_message(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "zarr", None)  # makes `import zarr` fail
    with pytest.raises(InputError, match=r"OME-Zarr needs the zarr package \(pip install"):
        write_labels_zarr(tmp_path / "x.zarr", disk_labels())
    assert not list(tmp_path.iterdir())


def test_cli_convert_and_segment_write_ome_zarr(tmp_path):
    """`convert` between TIFF, GeoJSON and OME-Zarr, and `segment --format ome-zarr`:
    the library's reader finds the labels; every route gives the same pixels back."""
    import tifffile

    from napari_medinst.cli import main
    from napari_medinst.samples import DATA

    lab = tifffile.imread(DATA / "he_tile_labels.tif").astype(np.uint32)
    tifffile.imwrite(tmp_path / "gt.tif", lab)
    assert main(["convert", str(tmp_path / "gt.tif"), str(tmp_path / "gt.zarr")]) == 0
    assert main(["convert", str(tmp_path / "gt.zarr"), str(tmp_path / "gt.geojson")]) == 0
    assert main(["convert", str(tmp_path / "gt.geojson"), str(tmp_path / "back.tif"),
                 "--shape", "512x512"]) == 0  # fmt: skip
    assert np.array_equal(tifffile.imread(tmp_path / "back.tif"), lab)
    assert np.array_equal(np.asarray(_label_node(tmp_path / "gt.zarr").data[0]), lab)
    # GeoJSON (with uuids and statuses) to OME-Zarr keeps them as label properties
    assert main(["convert", str(tmp_path / "gt.geojson"), str(tmp_path / "gt2.zarr"),
                 "--shape", "512x512"]) == 0  # fmt: skip
    props = _label_node(tmp_path / "gt2.zarr").zarr.root_attrs["image-label"]["properties"]
    assert len(props) == int(lab.max()) and all("uuid" in p for p in props)

    img = tmp_path / "he.tif"
    img.write_bytes((DATA / "he_tile.tif").read_bytes())
    out = tmp_path / "out"
    rc = main(["segment", str(img), "-o", str(out), "--model", "classical",
               "--format", "tif,ome-zarr"])  # fmt: skip
    assert rc == 0
    from napari_medinst.omezarr import read_labels_zarr

    seg = tifffile.imread(out / "he_instances.tif")
    assert np.array_equal(read_labels_zarr(out / "he_instances.ome.zarr"), seg)
    # a second run without --overwrite is refused before any work and changes nothing
    assert main(["segment", str(img), "-o", str(out), "--model", "classical",
                 "--format", "tif,ome-zarr"]) == 2  # fmt: skip
