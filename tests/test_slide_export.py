"""A whole-slide result exported to QuPath GeoJSON chunk by chunk (slide_export, convert)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import classical_store
from napari_medinst import cli
from napari_medinst import slide_edit as ed
from napari_medinst import slide_engine as se
from napari_medinst._io import InputError
from napari_medinst.geojson import read_geojson
from napari_medinst.slide_export import export_geojson, is_slide_store

zarr = pytest.importorskip("zarr")
pytest.importorskip("imagecodecs")
distributed = pytest.importorskip("distributed")

SIZE = 2048  # level 0 at 0.25 µm/px; the labels are at the working level (1024 px)
BLOCK = 256  # 16 chunks


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    return classical_store(tmp_path_factory.mktemp("slide"), SIZE, BLOCK)


@pytest.fixture
def store(made, tmp_path) -> Path:
    out = tmp_path / "s.zarr"
    shutil.copytree(made, out)
    return out


def labels_of(out: Path) -> np.ndarray:
    return zarr.open_array(str(se.labels_path(out) / "0"), mode="r")[:]


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images hold the same nuclei (pixel sets), whatever their ids."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[a > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@pytest.mark.parametrize("sub", [512, 48])  # a chunk traced whole / in parts of 48 px
def test_every_nucleus_is_exported_once_in_slide_pixels(store, tmp_path, sub, monkeypatch):
    from napari_medinst import slide_export

    monkeypatch.setattr(slide_export, "SUB", sub)
    lab = labels_of(store)
    n = len(np.unique(lab)) - 1
    seen = []
    dest = tmp_path / "nuclei.geojson"
    assert export_geojson(store, dest, progress=lambda k, m: seen.append((k, m))) == n
    assert seen[-1] == (16, 16) and len(seen) == 16  # chunk by chunk
    feats = json.loads(dest.read_text())["features"]
    assert len(feats) == n
    assert len({f["properties"]["metadata"]["napari_medinst.label"] for f in feats}) == n
    assert all("Score" in f["properties"]["measurements"] for f in feats)
    # level-0 pixels: the labels' grid is twice as coarse, so painted back at level 0
    # each label pixel is a 2 x 2 block, and every nucleus is exactly the stored one
    back = read_geojson(dest, shape=(SIZE, SIZE)).labels
    assert same_partition(back[::2, ::2], lab) and same_partition(back[1::2, 1::2], lab)


def test_corrections_and_status_go_along(store, tmp_path):
    region = ed.read_region(store, (300, 560, 300, 560))
    ids, counts = np.unique(region.labels, return_counts=True)
    big = [int(i) for i, c in zip(ids, counts, strict=True) if i and c > 30
           and int(i) not in region.locked]  # fmt: skip
    edited = region.labels.copy()
    edited[edited == big[0]] = 0
    ed.write_region(store, region.box, region.labels, edited, {big[1]: "verified"})
    dest = tmp_path / "n.geojson"
    export_geojson(store, dest)
    meta = {int(f["properties"]["metadata"]["napari_medinst.label"]): f["properties"]["metadata"]
            for f in json.loads(dest.read_text())["features"]}  # fmt: skip
    assert big[0] not in meta and meta[big[1]]["napari_medinst.status"] == "verified"
    assert len(meta) == len(np.unique(labels_of(store))) - 1


def test_refusals_leave_nothing_behind(store, tmp_path):
    dest = tmp_path / "n.geojson"
    export_geojson(store, dest)
    before = dest.read_bytes()
    with pytest.raises(FileExistsError):
        export_geojson(store, dest)
    assert dest.read_bytes() == before
    with pytest.raises(InputError, match=r"must end in \.geojson"):
        export_geojson(store, tmp_path / "n.tif")
    with pytest.raises(InputError, match="not a store written by"):
        export_geojson(tmp_path, tmp_path / "x.geojson")
    attrs = json.loads((store / ".zattrs").read_text())
    attrs[se.STORE_KEY]["status"] = "incomplete"
    (store / ".zattrs").write_text(json.dumps(attrs))
    with pytest.raises(InputError, match="not complete"):
        export_geojson(store, tmp_path / "y.geojson")
    assert not (tmp_path / "y.geojson").exists()
    attrs[se.STORE_KEY]["status"] = "complete"
    (store / ".zattrs").write_text(json.dumps(attrs))

    def boom(k, m):
        if k == 5:
            raise KeyboardInterrupt  # the user stops it midway

    with pytest.raises(KeyboardInterrupt):
        export_geojson(store, tmp_path / "z.geojson", progress=boom)
    assert not (tmp_path / "z.geojson").exists()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".part"] == []


def test_convert_command_exports_a_slide_result(store, tmp_path, capsys):
    assert is_slide_store(store) and not is_slide_store(tmp_path)
    dest = tmp_path / "c.geojson"
    assert cli.main(["convert", str(store), str(dest)]) == 0
    n = len(np.unique(labels_of(store))) - 1
    assert f"{n} nuclei written" in capsys.readouterr().out
    assert cli.main(["convert", str(store), str(tmp_path / "c.tif")]) == 2
    assert "converts to GeoJSON only" in capsys.readouterr().err
    assert cli.main(["convert", str(store), str(tmp_path / "d.geojson"), "--shape", "5x5"]) == 2
    assert "--shape does not apply" in capsys.readouterr().err
