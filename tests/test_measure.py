"""Per-nucleus measurements and their CSV/Parquet tables."""

import importlib.util

import numpy as np
import pandas as pd
import pytest

from conftest import disk_labels
from napari_medinst._io import InputError
from napari_medinst.measure import measure_nuclei, write_table


def _square_labels():
    lab = np.zeros((40, 60), np.int32)
    lab[5:15, 10:30] = 3  # 10 x 20 rectangle
    lab[20:36, 40:56] = 7  # 16 x 16 square
    return lab


def test_pixel_units_when_pixel_size_unknown():
    cols = measure_nuclei(_square_labels())
    assert list(cols["label"]) == [3, 7]
    assert cols["area_px"].tolist() == [200.0, 256.0]
    np.testing.assert_allclose(cols["centroid_y_px"], [9.5, 27.5])
    np.testing.assert_allclose(cols["centroid_x_px"], [19.5, 47.5])
    np.testing.assert_allclose(
        cols["equivalent_diameter_px"], np.sqrt(4 * np.array([200, 256]) / np.pi)
    )
    np.testing.assert_allclose(cols["solidity"], [1.0, 1.0])
    assert cols["eccentricity"][1] == pytest.approx(0.0, abs=1e-9)  # a square is isotropic
    assert not any(k.endswith(("_um", "_um2")) for k in cols)


def test_micrometres_when_pixel_size_known():
    px = measure_nuclei(_square_labels())
    um = measure_nuclei(_square_labels(), pixel_size=0.5)
    np.testing.assert_allclose(um["area_um2"], px["area_px"] * 0.25)
    np.testing.assert_allclose(um["centroid_x_um"], px["centroid_x_px"] * 0.5)
    np.testing.assert_allclose(um["perimeter_um"], px["perimeter_px"] * 0.5)
    np.testing.assert_allclose(um["equivalent_diameter_um"], px["equivalent_diameter_px"] * 0.5)
    np.testing.assert_allclose(um["eccentricity"], px["eccentricity"])
    assert "area_px" not in um


def test_mean_intensity_per_channel_and_scores():
    lab = _square_labels()
    rgb = np.zeros((*lab.shape, 3), np.uint8)
    rgb[lab == 3] = (10, 20, 30)
    rgb[lab == 7] = (200, 100, 0)
    cols = measure_nuclei(lab, rgb, scores={7: 0.9})
    np.testing.assert_allclose(cols["mean_intensity_0"], [10, 200])
    np.testing.assert_allclose(cols["mean_intensity_2"], [30, 0])
    assert np.isnan(cols["score"][0]) and cols["score"][1] == pytest.approx(0.9)
    grey = measure_nuclei(lab, rgb[..., 1], scores=np.arange(1, 8) / 10)
    np.testing.assert_allclose(grey["mean_intensity"], [20, 100])
    np.testing.assert_allclose(grey["score"], [0.3, 0.7])  # scores[i] belongs to id i + 1


def test_empty_labels_give_empty_columns():
    cols = measure_nuclei(np.zeros((10, 10), np.uint16), pixel_size=0.25)
    assert cols["label"].size == 0 and cols["area_um2"].size == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image": np.zeros((5, 5))}, "does not match the labels"),
        ({"pixel_size": -1}, "pixel size"),
    ],
)
def test_bad_input_is_one_clear_message(kwargs, message):
    with pytest.raises(InputError, match=message):
        measure_nuclei(disk_labels(), **kwargs)


def test_labels_must_be_2d_integers():
    with pytest.raises(InputError, match="2-D"):
        measure_nuclei(np.zeros((2, 3, 4), np.int32))


def test_csv_round_trip_and_no_silent_overwrite(tmp_path):
    cols = measure_nuclei(disk_labels(), pixel_size=0.25, scores=[0.5, 0.6, 0.7])
    path = write_table(tmp_path / "nuclei.csv", cols)
    back = pd.read_csv(path)
    assert list(back.columns) == list(cols)
    for key, value in cols.items():
        np.testing.assert_allclose(back[key].to_numpy(), value)  # full precision
    with pytest.raises(FileExistsError):
        write_table(path, cols)
    write_table(path, {"label": [1]}, overwrite=True)
    assert pd.read_csv(path)["label"].tolist() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["nuclei.csv"]  # no temporary files left


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed")
def test_parquet_round_trip(tmp_path):
    cols = measure_nuclei(disk_labels(), scores=[0.5, 0.6, 0.7])
    back = pd.read_parquet(write_table(tmp_path / "nuclei.parquet", cols))
    assert list(back.columns) == list(cols)
    assert back["label"].tolist() == [1, 2, 3]
    np.testing.assert_array_equal(back["area_px"].to_numpy(), cols["area_px"])


def test_parquet_without_pyarrow_is_a_clear_message(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pyarrow" else real_find_spec(name, *a),
    )
    with pytest.raises(InputError, match=r"nuclei\.parquet: writing Parquet needs the pyarrow"):
        write_table(tmp_path / "nuclei.parquet", {"label": [1, 2]})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("name", "columns", "message"),
    [
        ("t.xlsx", {"label": [1]}, "must end in .csv or .parquet"),
        ("t.csv", {"label": [1, 2], "area_px": [3.0]}, "equally long"),
        ("t.csv", {}, "no columns"),
    ],
)
def test_bad_tables_are_refused_before_writing(tmp_path, name, columns, message):
    with pytest.raises(InputError, match=message):
        write_table(tmp_path / name, columns)
    assert not list(tmp_path.iterdir())


def test_as_features_keeps_existing_columns_by_label():
    from napari_medinst.measure import as_features

    cols = measure_nuclei(_square_labels())
    existing = pd.DataFrame(
        {"index": [7, 3], "label": [7, 3], "score": [0.9, 0.1], "area_px": [0, 0]}
    )
    feats = as_features(cols, existing)
    assert feats["index"].tolist() == [3, 7]  # napari maps label values through "index"
    assert feats["score"].tolist() == [0.1, 0.9]  # matched on label, not on row order
    assert feats["area_px"].tolist() == [200.0, 256.0]  # the new measurement wins
    assert as_features(cols, pd.DataFrame({"index": [3], "type": [2]}))["type"].tolist()[0] == 2


def test_segment_format_measurements_writes_the_table(tmp_path):
    """`segment --format measurements` writes one row per nucleus, in µm when the pixel
    size is given, in the same all-or-nothing group as the other outputs."""
    import csv

    import tifffile

    from napari_medinst.cli import main
    from napari_medinst.samples import DATA

    img = tmp_path / "he.tif"
    img.write_bytes((DATA / "he_tile.tif").read_bytes())
    out = tmp_path / "out"
    rc = main(["segment", str(img), "-o", str(out), "--model", "classical",
               "--pixel-size", "0.25", "--format", "tif,measurements"])  # fmt: skip
    assert rc == 0
    labels = tifffile.imread(out / "he_instances.tif")
    with open(out / "he_measurements.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == int(labels.max()) and "area_um2" in rows[0]
    first = int(rows[0]["label"])
    assert float(rows[0]["area_um2"]) == pytest.approx((labels == first).sum() * 0.25**2)
    assert not (out / "he_instances.csv").exists()  # only what was asked for


def test_geojson_and_measurements_outputs_measure_once(tmp_path, monkeypatch):
    """Asking for both outputs that carry measurements computes them once per image."""
    from napari_medinst import measure
    from napari_medinst.cli import main
    from napari_medinst.samples import DATA

    calls = []
    real = measure.measure_nuclei
    monkeypatch.setattr(measure, "measure_nuclei", lambda *a, **k: calls.append(1) or real(*a, **k))
    img = tmp_path / "he.tif"
    img.write_bytes((DATA / "he_tile.tif").read_bytes())
    rc = main(["segment", str(img), "-o", str(tmp_path / "out"), "--model", "classical",
               "--format", "tif,geojson,measurements"])  # fmt: skip
    assert rc == 0 and len(calls) == 1
    assert (tmp_path / "out" / "he.geojson").exists()
    assert (tmp_path / "out" / "he_measurements.csv").exists()
