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


# ------------------------------------------------------------------ review fixes


def _bioformats2raw(root):
    """A bioformats2raw-style store: root attrs with the layout, the image at 0/."""
    import zarr

    g = zarr.open_group(str(root), mode="w", zarr_format=2)
    g.attrs["bioformats2raw.layout"] = 3
    img = g.create_group("0")
    img.create_array("0", shape=(20, 30), dtype="uint8", chunks=(20, 30))[...] = 7
    img.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": "y", "type": "space"}, {"name": "x", "type": "space"}], "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1]}]}]}]  # fmt: skip
    (root / "OME").mkdir()
    (root / "OME" / "METADATA.ome.xml").write_text("<OME/>")


def test_bioformats2raw_store_gets_labels_inside_its_image(tmp_path):
    root = tmp_path / "slide.zarr"
    _bioformats2raw(root)
    lab = np.zeros((20, 30), np.uint32)
    lab[2:5, 2:5] = 1
    for _ in range(2):  # the second time replaces our label image, nothing else
        dest = write_labels_zarr(root, lab, overwrite=True)
    assert dest == root / "0" / "labels" / "nuclei"
    assert sorted(p.name for p in root.iterdir()) == [".zattrs", ".zgroup", "0", "OME"]
    assert (root / "OME" / "METADATA.ome.xml").read_text() == "<OME/>"
    assert np.array_equal(read_labels_zarr(root), lab)


@pytest.mark.parametrize("attrs", [{"plate": {"rows": []}}, {"something": 1}, None])
def test_other_folders_are_never_replaced(tmp_path, attrs):
    import zarr

    path = tmp_path / "x.zarr"
    if attrs is None:
        path.mkdir()
        (path / "notes.txt").write_text("mine")
    else:
        zarr.open_group(str(path), mode="w", zarr_format=2).attrs.update(attrs)
    before = sorted(p.name for p in path.iterdir())
    with pytest.raises(InputError, match="not changed") as info:
        write_labels_zarr(path, disk_labels(), overwrite=True)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in path.iterdir()) == before
    if attrs and "plate" in attrs:
        assert "plate" in str(info.value)


def test_own_store_is_replaced_and_foreign_label_image_is_not(tmp_path):
    lab = disk_labels()
    write_labels_zarr(tmp_path / "own.zarr", lab)
    write_labels_zarr(tmp_path / "own.zarr", lab * 2, overwrite=True)
    assert np.array_equal(read_labels_zarr(tmp_path / "own.zarr"), lab * 2)
    root = tmp_path / "slide.zarr"
    _bioformats2raw(root)
    small = np.zeros((20, 30), np.uint32)
    write_labels_zarr(root, small, name="theirs")
    attrs = json.loads((root / "0/labels/theirs/.zattrs").read_text())
    del attrs["napari_medinst"]  # as if another tool had written it
    (root / "0/labels/theirs/.zattrs").write_text(json.dumps(attrs))
    with pytest.raises(InputError, match="not written by napari-medinst"):
        write_labels_zarr(root, small + 1, name="theirs", overwrite=True)
    assert read_labels_zarr(root, "theirs").max() == 0


def test_offset_is_a_translation_and_the_table_reads_back(tmp_path):
    from napari_medinst.omezarr import read_labels_zarr_table

    lab = disk_labels()
    props = {int(i): {"uuid": f"u{i}", "status": "verified", "objectType": "annotation",
                      "Area px^2": 12.5} for i in np.unique(lab)[1:]}  # fmt: skip
    path = write_labels_zarr(tmp_path / "o.zarr", lab, pixel_size=0.5, offset=(100, 40),
                             properties=props)  # fmt: skip
    moves = json.loads((path / ".zattrs").read_text())["multiscales"][0]["datasets"][-1]
    assert {"type": "translation", "translation": [50.0, 20.0]} in moves[
        "coordinateTransformations"
    ]
    z = read_labels_zarr_table(tmp_path / "o.zarr")
    assert z.offset == (100, 40) and z.pixel_size == 0.5
    row = z.table[0]
    assert row["uuid"] == f"u{row['id']}" and row["status"] == "verified"
    assert row["objectType"] == "annotation" and row["measurements"] == {"Area px^2": 12.5}


def test_convert_zarr_to_geojson_keeps_uuids_status_and_offset(tmp_path):
    from napari_medinst.cli import main

    feats = [{"type": "Feature", "id": f"id-{k}", "geometry": {"type": "Polygon", "coordinates": [
        [[500 + 4 * k, 300], [502 + 4 * k, 300], [502 + 4 * k, 302], [500 + 4 * k, 302],
         [500 + 4 * k, 300]]]}, "properties": {"objectType": "annotation", "measurements": {"m": k},
        "metadata": {"napari_medinst.status": "edited"}}} for k in range(3)]  # fmt: skip
    src = tmp_path / "a.geojson"
    src.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    assert main(["convert", str(src), str(tmp_path / "a.zarr")]) == 0
    assert main(["convert", str(tmp_path / "a.zarr"), str(tmp_path / "b.geojson")]) == 0
    back = json.loads((tmp_path / "b.geojson").read_text())["features"]
    assert [f["id"] for f in back] == ["id-0", "id-1", "id-2"]
    assert [f["geometry"] for f in back] == [f["geometry"] for f in feats]
    assert {f["properties"]["metadata"]["napari_medinst.status"] for f in back} == {"edited"}
    assert [f["properties"]["objectType"] for f in back] == ["annotation"] * 3
    assert [f["properties"]["measurements"] for f in back] == [{"m": 0.0}, {"m": 1.0}, {"m": 2.0}]


def test_segment_overwrite_keeps_the_old_zarr_until_the_rest_is_written(tmp_path, monkeypatch):
    from napari_medinst import cli

    dest = tmp_path / "he_instances.ome.zarr"
    old = disk_labels()
    write_labels_zarr(dest, old)

    def fail():
        assert np.array_equal(read_labels_zarr(dest), old)  # not yet replaced
        raise OSError("disk full")

    new = np.ones_like(old)
    with pytest.raises(OSError, match="disk full"):
        cli._write_with_zarr({"ome-zarr": dest}, new, None, fail, True)
    assert np.array_equal(read_labels_zarr(dest), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]
    cli._write_with_zarr({"ome-zarr": dest}, new, None, lambda: None, True)
    assert np.array_equal(read_labels_zarr(dest), new)
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]
