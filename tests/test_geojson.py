"""QuPath GeoJSON export/import: pixel-exact round trips, QuPath's forms, bad input, CLI."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from napari_medinst._io import InputError
from napari_medinst.cli import main
from napari_medinst.geojson import (
    OBJECT_TYPES,
    features_to_labels,
    labels_to_features,
    read_geojson,
    write_geojson,
)

shapely = pytest.importorskip("shapely")
from shapely.geometry import shape as to_shape  # noqa: E402


def _round_trip(lab: np.ndarray, **kwargs) -> dict:
    """Export, check every polygon is valid, go through JSON text, import, compare."""
    fc = json.loads(json.dumps(labels_to_features(lab, **kwargs)))
    for feat in fc["features"]:
        geom = to_shape(feat["geometry"])
        assert geom.is_valid, (shapely.is_valid_reason(geom), feat["geometry"])
        assert geom.area == np.count_nonzero(
            lab == int(feat["properties"]["metadata"]["napari_medinst.label"])
        )
    res = features_to_labels(fc, lab.shape, offset=kwargs.get("offset", (0, 0)))
    assert res.problems == []
    np.testing.assert_array_equal(res.labels, lab)
    return fc


# ------------------------------------------------------------------ round trips


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arrays(np.uint16, st.tuples(st.integers(1, 14), st.integers(1, 14)), elements=st.integers(0, 4))
)
def test_round_trip_random_labels(lab):
    """Noise labels: pinches, holes, islands in holes, one-pixel and border nuclei."""
    _round_trip(lab)


@st.composite
def _blobs(draw):
    h, w = draw(st.integers(4, 40)), draw(st.integers(4, 40))
    lab = np.zeros((h, w), np.uint32)
    for k in range(draw(st.integers(1, 8))):
        r0, c0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        r1, c1 = draw(st.integers(r0 + 1, h)), draw(st.integers(c0 + 1, w))
        value = draw(st.sampled_from([0, k + 1, 2**31 + k]))  # 0 cuts holes
        lab[r0:r1, c0:c1] = value
    return lab


@settings(max_examples=200, deadline=None)
@given(_blobs())
def test_round_trip_touching_rectangles_and_holes(lab):
    _round_trip(lab, offset=(7, 1000))


@pytest.mark.parametrize(
    "rows",
    [
        ["111", "101", "111"],  # hole
        ["11111", "10001", "10201", "10001", "11111"],  # other nucleus in the hole
        ["11111", "10001", "10101", "10001", "11111"],  # island of the same label in its hole
        ["1110", "1010", "1100"],  # hole touching the outside at a corner
        ["11111", "10101", "11011", "10101", "11111"],  # holes touching holes at corners
        ["10", "01"],  # pixels touching only at a corner
        ["1"],  # one pixel filling the image
        ["12", "21"],  # two nuclei, both diagonal pairs
    ],
)
def test_round_trip_special_shapes(rows):
    lab = np.array([[int(c) for c in r] for r in rows], np.uint8)
    _round_trip(lab)


def test_one_pixel_polygon_along_pixel_edges_counter_clockwise():
    lab = np.zeros((4, 5), np.uint8)
    lab[2, 3] = 1
    fc = labels_to_features(lab, offset=(100, 200))
    ring = [list(p) for p in fc["features"][0]["geometry"]["coordinates"][0]]
    assert ring == [[203, 102], [204, 102], [204, 103], [203, 103], [203, 102]]
    assert shapely.Polygon(ring).exterior.is_ccw  # in x/y, as RFC 7946 asks


def test_exterior_counter_clockwise_hole_clockwise():
    lab = np.ones((3, 3), np.uint8)
    lab[1, 1] = 0
    poly = to_shape(labels_to_features(lab)["features"][0]["geometry"])
    assert poly.exterior.is_ccw and not poly.interiors[0].is_ccw


def test_diagonal_pixels_become_a_multipolygon_and_collinear_steps_merge():
    lab = np.zeros((6, 6), np.uint8)
    lab[0:3, 0:3] = 1
    lab[3:6, 3:6] = 1
    geom = labels_to_features(lab)["features"][0]["geometry"]
    assert geom["type"] == "MultiPolygon" and len(geom["coordinates"]) == 2
    assert all(len(p[0]) == 5 for p in geom["coordinates"])  # squares: 4 corners only


def test_shared_label_images_round_trip(shared_data):
    """Every label image of the shared data: pixel-identical after labels -> GeoJSON -> labels."""
    paths = sorted(shared_data.glob("*/labels/*.tif"))
    assert len(paths) > 500
    differing = []
    for path in paths:
        lab = tifffile.imread(path)
        res = features_to_labels(labels_to_features(lab), lab.shape)
        if not np.array_equal(res.labels, lab) or res.problems:
            differing.append(path.name)
    assert differing == []


# ------------------------------------------------------------------ properties


def test_properties_uuid_status_type_model_survive_a_round_trip(tmp_path):
    lab = np.zeros((10, 10), np.uint16)
    lab[1:4, 1:4], lab[5:9, 5:9], lab[1:3, 6:9] = 1, 2, 3
    kept = str(uuid.uuid4())
    path = write_geojson(
        tmp_path / "n.geojson",
        lab,
        object_type="annotation",
        status={1: "verified", 2: "edited"},
        types={1: 2, 2: 1},
        type_names={1: ("Tumor", (200, 0, 0)), 2: ("Stroma", (0, 150, 0))},
        measurements={1: {"Area µm^2": 2.25, "Score": float("nan")}},
        ids={1: kept},
        model={"name": "default", "version": "1.2"},
    )
    fc = json.loads(path.read_text())
    props = fc["features"][0]["properties"]
    assert fc["features"][0]["id"] == kept and props["objectType"] == "annotation"
    assert props["classification"] == {"name": "Stroma", "color": [0, 150, 0]}
    assert props["measurements"] == {"Area µm^2": 2.25}  # NaN left out: JSON has none
    assert props["metadata"]["napari_medinst.status"] == "verified"
    assert props["metadata"]["napari_medinst.model"] == "default"
    assert props["metadata"]["napari_medinst.model_version"] == "1.2"
    assert uuid.UUID(fc["features"][2]["id"]).version == 4
    res = read_geojson(path, lab.shape, type_names={1: ("Tumor", None), 2: ("Stroma", None)})
    np.testing.assert_array_equal(res.labels, lab)
    rows = {r["id"]: r for r in res.table}
    assert rows[1]["uuid"] == kept and rows[1]["status"] == "verified" and rows[1]["type"] == 2
    assert rows[2]["name"] == "Tumor" and rows[2]["color"] == (200, 0, 0)
    assert rows[3]["status"] is None and rows[3]["type"] == 0
    again = labels_to_features(res.labels, ids={r["id"]: r["uuid"] for r in res.table})
    assert [f["id"] for f in again["features"]] == [f["id"] for f in fc["features"]]


def test_write_geojson_never_overwrites_unless_asked(tmp_path):
    path = tmp_path / "n.geojson"
    path.write_text("keep me")
    with pytest.raises(FileExistsError):
        write_geojson(path, np.ones((3, 3), np.uint8))
    assert path.read_text() == "keep me"
    with pytest.raises(InputError, match="status"):
        write_geojson(path, np.ones((3, 3), np.uint8), overwrite=True, status={1: "done"})
    assert path.read_text() == "keep me" and list(tmp_path.iterdir()) == [path]


# ------------------------------------------------------------------ QuPath's forms


def _square(x, y, s):
    return [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]


def _write(tmp_path, features, name="q.geojson"):
    path = tmp_path / name
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def test_qupath_detection_annotation_cell_multipolygon(tmp_path):
    feats = [
        {"type": "Feature", "id": "a1", "geometry": {"type": "Polygon", "coordinates": [_square(1, 1, 3)]},
         "properties": {"objectType": "detection", "isLocked": False,
                        "classification": {"name": "Tumor", "color": [255, 0, 0]},
                        "measurements": {"Area µm^2": 9.0, "Missing": "NaN"}}},
        {"type": "Feature", "id": "a2", "geometry": {"type": "Polygon", "coordinates": [_square(6, 1, 3)]},
         "properties": {"objectType": "annotation", "classification": {"name": "Stroma", "colorRGB": -16744448},
                        "measurements": [{"name": "Perimeter µm", "value": 12.0}]}},
        {"type": "Feature", "id": "c3", "geometry": {"type": "Polygon", "coordinates": [_square(0, 6, 6)]},
         "nucleusGeometry": {"type": "Polygon", "coordinates": [_square(1, 7, 2)]},
         "properties": {"objectType": "cell", "classification": {"names": ["Tumor", "Positive"]}}},
        {"type": "Feature", "id": "m4", "properties": {"objectType": "annotation"},
         "geometry": {"type": "MultiPolygon", "coordinates": [
             [_square(7, 6, 5), _square(8, 7, 3)[::-1]], [_square(13, 13, 1)]]}},
    ]  # fmt: skip
    res = read_geojson(_write(tmp_path, feats), (14, 14), object_types=OBJECT_TYPES)
    assert res.problems == []
    expect = np.zeros((14, 14), np.uint32)
    expect[1:4, 1:4], expect[1:4, 6:9], expect[7:9, 1:3] = 1, 2, 3
    expect[6:11, 7:12] = 4
    expect[7:10, 8:11] = 0  # the hole
    expect[13, 13] = 4
    np.testing.assert_array_equal(res.labels, expect)
    rows = {r["uuid"]: r for r in res.table}
    assert rows["a1"]["measurements"] == {"Area µm^2": 9.0} and rows["a1"]["type"] == 1
    assert rows["a2"]["measurements"] == {"Perimeter µm": 12.0}
    assert rows["a2"]["color"] == (0, 128, 0) and rows["a2"]["objectType"] == "annotation"
    assert rows["c3"]["objectType"] == "cell" and rows["c3"]["name"] == "Tumor: Positive"
    assert rows["m4"]["type"] == 0 and rows["m4"]["name"] is None


def test_float_coordinates_take_pixels_by_their_centre():
    feat = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[0.6, 0.4], [3.4, 0.4], [3.4, 2.6], [0.6, 2.6], [0.6, 0.4]]]}, "properties": {}}  # fmt: skip
    res = features_to_labels({"type": "FeatureCollection", "features": [feat]}, (4, 5))
    expect = np.zeros((4, 5), np.uint32)
    expect[0:3, 1:3] = 1  # centres x 1.5, 2.5 and y 0.5, 1.5, 2.5 inside; x 0.5, 3.5 not
    np.testing.assert_array_equal(res.labels, expect)


def test_shape_defaults_to_the_features_extent():
    lab = np.zeros((9, 7), np.uint8)
    lab[2:5, 1:6] = 3
    res = features_to_labels(labels_to_features(lab))
    np.testing.assert_array_equal(res.labels, lab[2:5, 1:6])
    assert res.offset == (2, 1)
    res = features_to_labels(labels_to_features(lab), offset=(0, 0))  # from a given corner
    np.testing.assert_array_equal(res.labels, lab[:5, :6])


def test_overlapping_features_keep_the_earlier_pixels():
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(0, 0, 3)]}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(2, 0, 3)]}},
    ]}  # fmt: skip
    res = features_to_labels(fc, (3, 5))
    assert (res.labels[:, :3] == 1).all() and (res.labels[:, 3:] == 2).all()
    assert len(res.problems) == 1 and "feature 1" in res.problems[0] and "3 px" in res.problems[0]


# ------------------------------------------------------------------ bad input


def _good(x=0):
    return {"type": "Feature", "id": f"ok{x}", "properties": {"objectType": "detection"},
            "geometry": {"type": "Polygon", "coordinates": [_square(x, 0, 2)]}}  # fmt: skip


BAD = {
    "self-crossing": ({"type": "Polygon", "coordinates": [[[0, 0], [6, 6], [6, 0], [0, 9], [0, 0]]]},
                      "crosses itself"),
    "hole outside": ({"type": "Polygon", "coordinates": [_square(0, 0, 3), _square(5, 5, 2)]},
                     "crosses itself or a hole outside"),
    "empty": ({"type": "Polygon", "coordinates": []}, "empty polygon"),
    "flat": ({"type": "Polygon", "coordinates": [[[1, 1], [4, 1], [6, 1], [1, 1]]]}, "empty polygon"),
    "point": ({"type": "Point", "coordinates": [3, 3]}, "is a Point"),
    "line": ({"type": "LineString", "coordinates": [[0, 0], [3, 3]]}, "is a LineString"),
    "outside": ({"type": "Polygon", "coordinates": [_square(8, 8, 4)]}, "outside the image"),
    "strings": ({"type": "Polygon", "coordinates": [[["a", "b"], [1, 2], [3, 4], ["a", "b"]]]},
                "not pairs of numbers"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_feature_strict_names_file_and_feature_and_lenient_keeps_the_rest(tmp_path, case):
    geometry, words = BAD[case]
    feats = [_good(0), {"type": "Feature", "id": "bad-one", "geometry": geometry}, _good(4)]
    path = _write(tmp_path, feats)
    with pytest.raises(InputError, match=words) as info:
        read_geojson(path, (10, 10))
    assert str(path) in str(info.value) and "feature 1 (id bad-one)" in str(info.value)
    assert "\n" not in str(info.value)
    res = read_geojson(path, (10, 10), strict=False)
    assert len(res.problems) == 1 and "feature 1 (id bad-one)" in res.problems[0]
    assert {r["uuid"] for r in res.table} >= {"ok0", "ok4"}
    ids = {r["uuid"]: r["id"] for r in res.table}
    assert (res.labels[0:2, 0:2] == ids["ok0"]).all() and (res.labels[0:2, 4:6] == ids["ok4"]).all()
    if case == "outside":  # clipped, not skipped
        assert res.labels[8:, 8:].tolist() == [[ids["bad-one"]] * 2] * 2
        assert "clipped" in res.problems[0]
    else:
        assert np.count_nonzero(res.labels) == 8 and "skipped" in res.problems[0]


def test_unknown_classification(tmp_path):
    feat = _good(0)
    feat["properties"]["classification"] = {"name": "Alien"}
    path = _write(tmp_path, [feat])
    known = {1: ("Tumor", (255, 0, 0))}
    with pytest.raises(InputError, match=r"feature 0 \(id ok0\): unknown classification 'Alien'"):
        read_geojson(path, (4, 4), type_names=known)
    res = read_geojson(path, (4, 4), type_names=known, strict=False)
    assert res.table[0]["type"] == 0 and "imported without a type" in res.problems[0]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (b"{not json", "not a JSON file"),
        (b"\xff\xfe\x00", "not a JSON file"),
        (b'{"type": "Polygon", "coordinates": []}', "not a GeoJSON FeatureCollection"),
        (b"[1, 2]", "not a GeoJSON FeatureCollection"),
        (b'{"type": "FeatureCollection"}', "without a 'features' list"),
    ],
)
def test_file_that_is_not_a_feature_collection(tmp_path, text, words):
    path = tmp_path / "x.geojson"
    path.write_bytes(text)
    with pytest.raises(InputError, match=words) as info:
        read_geojson(path)
    assert str(path) in str(info.value)


def test_file_of_another_image_is_refused(tmp_path):
    lab = np.zeros((50, 60), np.uint8)
    lab[40:45, 50:58] = 1
    path = write_geojson(tmp_path / "big.geojson", lab)
    with pytest.raises(InputError, match=r"outside the image.*another image"):
        read_geojson(path, (20, 20))


# ------------------------------------------------------------------ CLI


def test_cli_convert_tif_to_geojson_and_back(tmp_path):
    lab = np.zeros((30, 40), np.uint16)
    lab[2:9, 3:12], lab[9:15, 3:12], lab[20:28, 30:39] = 1, 2, 7
    lab[23:25, 33:35] = 0
    tifffile.imwrite(tmp_path / "a.tif", lab)
    assert main(["convert", str(tmp_path / "a.tif"), str(tmp_path / "a.geojson"),
                 "--object-type", "annotation", "--offset", "100,200"]) == 0  # fmt: skip
    fc = json.loads((tmp_path / "a.geojson").read_text())
    assert len(fc["features"]) == 3
    assert fc["features"][0]["properties"]["objectType"] == "annotation"
    assert fc["features"][0]["geometry"]["coordinates"][0][0] == [203, 102]
    tifffile.imwrite(tmp_path / "like.tif", np.zeros((30, 40, 3), np.uint8))
    assert main(["convert", str(tmp_path / "a.geojson"), str(tmp_path / "b.tif"),
                 "--like", str(tmp_path / "like.tif"), "--offset", "100,200"]) == 0  # fmt: skip
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "b.tif"), lab)
    # the UUIDs and label ids survive GeoJSON -> GeoJSON
    assert main(["convert", str(tmp_path / "a.geojson"), str(tmp_path / "c.json"),
                 "--shape", "30x40", "--offset", "100,200"]) == 0  # fmt: skip
    again = json.loads((tmp_path / "c.json").read_text())
    assert [f["id"] for f in again["features"]] == [f["id"] for f in fc["features"]]


def test_cli_convert_bad_input_exit_2_and_nothing_written(tmp_path, capsys):
    path = _write(
        tmp_path,
        [_good(0), {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}}],
    )
    out = tmp_path / "o.tif"
    assert main(["convert", str(path), str(out), "--shape", "4x4"]) == 2
    err = capsys.readouterr().err
    assert "feature 1" in err and str(path) in err and err.count("\n") == 1
    assert not out.exists()
    assert main(["convert", str(path), str(out), "--shape", "4x4", "--skip-bad"]) == 0
    assert "warning:" in capsys.readouterr().err and tifffile.imread(out).max() == 1
    out.write_bytes(b"old")
    assert main(["convert", str(path), str(out), "--shape", "4x4", "--skip-bad"]) == 2
    assert out.read_bytes() == b"old"
    assert main(["convert", str(path), str(tmp_path / "o.png")]) == 2
    assert "cannot write '.png'" in capsys.readouterr().err


def test_cli_segment_format_geojson(tmp_path):
    from napari_medinst.samples import DATA

    image = tmp_path / "tile.tif"
    image.write_bytes((DATA / "he_tile.tif").read_bytes())
    out = tmp_path / "out"
    args = ["segment", str(image), "-o", str(out), "--model", "classical", "--pixel-size", "0.25"]
    assert main([*args, "--format", "geojson,tif"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["tile.geojson", "tile_instances.tif"]
    labels = tifffile.imread(out / "tile_instances.tif")
    fc = json.loads((out / "tile.geojson").read_text())
    assert len(fc["features"]) == labels.max()
    props = fc["features"][0]["properties"]
    assert props["metadata"]["napari_medinst.status"] == "predicted"
    assert props["metadata"]["napari_medinst.model"] == "classical"
    assert {"Area µm^2", "Solidity", "Score", "Mean intensity channel 0"} <= set(
        props["measurements"]
    )
    np.testing.assert_array_equal(read_geojson(out / "tile.geojson", labels.shape).labels, labels)
    with pytest.raises(SystemExit) as info:  # argparse: exit 2 with a usage line
        main([*args, "--format", "geojson,zip"])
    assert info.value.code == 2


# ------------------------------------------------------------------ review fixes


def _feat(x, y, size, kind=None, fid=None, **props):
    """A square feature with an optional objectType and extra properties."""
    props = props | ({"objectType": kind} if kind else {})
    feat = {"type": "Feature", "properties": props,
            "geometry": {"type": "Polygon", "coordinates": [_square(x, y, size)]}}  # fmt: skip
    return feat | ({"id": fid} if fid else {})


def test_qupath_export_imports_the_detections_not_the_tissue_annotation(tmp_path, capsys):
    feats = [_feat(0, 0, 20, "annotation", "tissue")]
    feats += [_feat(2 + 5 * i, 2, 3, "detection", f"n{i}") for i in range(3)]
    feats.append({"type": "Feature", "id": "pt", "properties": {"objectType": "annotation"},
                  "geometry": {"type": "MultiPoint", "coordinates": [[1, 1]]}})  # fmt: skip
    path = _write(tmp_path, feats)
    res = read_geojson(path, (20, 20))
    assert [r["uuid"] for r in res.table] == ["n0", "n1", "n2"]
    assert np.count_nonzero(res.labels) == 27
    assert len(res.problems) == 1 and "2 feature(s) of type annotation left out" in res.problems[0]
    res = read_geojson(path, (20, 20), object_types=["annotation"], strict=False)
    assert [r["uuid"] for r in res.table] == ["tissue"]
    with pytest.raises(InputError, match="object_types"):
        read_geojson(path, (20, 20), object_types=["nucleus"])
    # a file of annotations only imports them
    only = _write(tmp_path, [_feat(0, 0, 3, "annotation", "a"), _feat(4, 0, 3, "annotation", "b")],
                  "ann.geojson")  # fmt: skip
    res = read_geojson(only, (4, 8))
    assert [r["uuid"] for r in res.table] == ["a", "b"] and res.problems == []
    out = tmp_path / "t.tif"
    assert main(["convert", str(path), str(out), "--shape", "20x20", "--skip-bad",
                 "--object-types", "annotation"]) == 0  # fmt: skip
    assert (tifffile.imread(out) == 1).all()  # the tissue only
    with pytest.raises(SystemExit):
        main(["convert", str(path), str(out), "--object-types", "blob"])


def test_slide_coordinates_give_the_features_region_with_its_offset(tmp_path, capsys):
    path = _write(tmp_path, [_feat(80000, 60000, 10, "detection", "far")])
    res = read_geojson(path)
    assert res.labels.shape == (10, 10) and res.offset == (60000, 80000)
    assert (res.labels == 1).all()
    # float corners: the region is floored/ceiled
    fc = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
        [[10.6, 20.4], [13.4, 20.4], [13.4, 22.6], [10.6, 22.6], [10.6, 20.4]]]}}]  # fmt: skip
    res = features_to_labels(fc)
    assert res.offset == (20, 10) and res.labels.shape == (3, 4)
    # GeoJSON -> GeoJSON keeps slide coordinates; -> TIFF says which offset to restore
    assert main(["convert", str(path), str(tmp_path / "b.geojson")]) == 0
    back = json.loads((tmp_path / "b.geojson").read_text())["features"][0]
    assert back["geometry"]["coordinates"][0][0] == [80000, 60000] and back["id"] == "far"
    assert main(["convert", str(path), str(tmp_path / "b.tif")]) == 0
    assert "--offset 60000,80000" in capsys.readouterr().out
    assert tifffile.imread(tmp_path / "b.tif").shape == (10, 10)
    assert main(["convert", str(tmp_path / "b.tif"), str(tmp_path / "c.geojson"),
                 "--offset", "60000,80000"]) == 0  # fmt: skip
    again = json.loads((tmp_path / "c.geojson").read_text())["features"][0]
    assert again["geometry"] == back["geometry"]
    # a region beyond the decode limit is refused with a hint
    huge = _write(tmp_path, [_feat(0, 0, 2, "detection"), _feat(90000, 90000, 2, "detection")],
                  "huge.geojson")  # fmt: skip
    with pytest.raises(InputError, match="--shape") as info:
        read_geojson(huge)
    assert str(huge) in str(info.value)


@pytest.mark.parametrize("props, geometry, words", [
    ({"classification": {"name": "T", "color": ["r", 0, 0]}}, None, "color"),
    ({"classification": {"name": "T", "color": [1, 2, 3e40]}}, None, "color"),
    ({"classification": {"name": "T", "color": [1, 2, 300]}}, None, "color"),
    ({"measurements": {"a": 10**400}}, None, "measurement 'a'"),
    ({}, {"type": "Polygon", "coordinates": [[[10**400, 0], [1, 1], [2, 0], [10**400, 0]]]},
     "coordinates"),
    ({}, {"type": "Polygon", "coordinates": [_square(0, 0, 1e300)]}, "coordinates beyond"),
])  # fmt: skip
def test_bad_values_are_per_feature_errors(tmp_path, props, geometry, words):
    bad = _feat(4, 0, 2, "detection", "bad-one", **props)
    if geometry is not None:
        bad["geometry"] = geometry
    path = tmp_path / "v.geojson"
    text = json.dumps({"type": "FeatureCollection", "features": [_good(0), bad]})
    path.write_text(text)
    with pytest.raises(InputError, match=words) as info:
        read_geojson(path, (4, 8))
    assert f"{path}: feature 1 (id bad-one)" in str(info.value)
    res = read_geojson(path, (4, 8), strict=False)
    assert [r["uuid"] for r in res.table] == ["ok0"] and "skipped" in res.problems[0]


def test_deeply_nested_file_is_a_clear_error(tmp_path):
    path = tmp_path / "deep.geojson"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(InputError, match="nested too deeply") as info:
        read_geojson(path)
    assert str(path) in str(info.value)


def _labelled(x, label):
    return _feat(x, 0, 2, "detection", metadata={"napari_medinst.label": label})


def test_label_ids_kept_up_to_uint32_max_and_new_ids_fill_gaps():
    fc = [_labelled(0, "4294967294"), _feat(2, 0, 2), _feat(4, 0, 2), _labelled(6, "4294967295")]
    res = features_to_labels(fc, (2, 8))
    assert res.labels[0, ::2].tolist() == [4294967294, 1, 2, 4294967295]
    assert res.problems == []
    fc = [_labelled(0, "2"), _labelled(2, "2"), _labelled(4, str(2**32)), _feat(6, 0, 2)]
    res = features_to_labels(fc, (2, 8))
    assert res.labels[0, ::2].tolist() == [2, 1, 3, 4]
    assert len(res.problems) == 2
    assert "feature 1" in res.problems[0] and "(already used); renumbered to 1" in res.problems[0]
    assert "feature 2" in res.problems[1] and "renumbered to 3" in res.problems[1]


def test_export_refuses_labels_above_uint32():
    lab = np.zeros((2, 2), np.uint64)
    lab[0, 0] = 2**63 + 5
    with pytest.raises(InputError, match=r"above 2\*\*32 - 1"):
        labels_to_features(lab)
    lab[0, 0] = 2**32 - 1
    fc = labels_to_features(lab)
    assert fc["features"][0]["properties"]["metadata"]["napari_medinst.label"] == "4294967295"


def test_convert_geojson_keeps_object_types_and_models(tmp_path):
    meta = {"napari_medinst.model": "hovernet", "napari_medinst.model_version": "1.2"}
    feats = [_feat(0, 0, 2, "annotation", "a", metadata=meta), _feat(3, 0, 2, "annotation", "b")]
    path = _write(tmp_path, feats)
    assert main(["convert", str(path), str(tmp_path / "o.geojson")]) == 0
    out = json.loads((tmp_path / "o.geojson").read_text())["features"]
    assert [f["properties"]["objectType"] for f in out] == ["annotation", "annotation"]
    assert out[0]["properties"]["metadata"]["napari_medinst.model"] == "hovernet"
    assert out[0]["properties"]["metadata"]["napari_medinst.model_version"] == "1.2"
    assert "napari_medinst.model" not in out[1]["properties"]["metadata"]
    assert main(["convert", str(path), str(tmp_path / "d.geojson"),
                 "--object-type", "detection"]) == 0  # fmt: skip
    out = json.loads((tmp_path / "d.geojson").read_text())["features"]
    assert [f["properties"]["objectType"] for f in out] == ["detection", "detection"]


def test_cli_segment_geojson_in_pixels_when_the_pixel_size_is_estimated(tmp_path):
    from napari_medinst.samples import DATA

    image = tmp_path / "tile.tif"
    tifffile.imwrite(image, tifffile.imread(DATA / "he_tile.tif"))  # no pixel size in it
    out = tmp_path / "out"
    assert main(["segment", str(image), "-o", str(out), "--model", "classical",
                 "--format", "geojson,tif"]) == 0  # fmt: skip
    names = set(json.loads((out / "tile.geojson").read_text())["features"][0]["properties"]
                ["measurements"])  # fmt: skip
    assert "Area px^2" in names and "Area µm^2" not in names
