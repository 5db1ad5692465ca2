"""Opening whole-slide images lazily: every claimed format, pixel sizes, levels, bad input."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest

from napari_medinst import slide as sl
from napari_medinst._io import InputError

pytest.importorskip("zarr")
pytest.importorskip("imagecodecs")
_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_test_slide.py"
_spec = importlib.util.spec_from_file_location("make_test_slide", _SCRIPT)
mts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mts)

needs_openslide = pytest.mark.skipif(sl._openslide() is None, reason="openslide not installed")
SIZE = 2000
NAMES = {"svs": "slide.svs", "ome-tiff": "slide.ome.tif", "tiff": "slide.tif",
         "ome-zarr": "slide.zarr"}  # fmt: skip
FORMATS = {"svs": "openslide:aperio", "ome-tiff": "ome-tiff", "tiff": "tiff",
           "ome-zarr": "ome-zarr"}  # fmt: skip
SOURCES = {"svs": "Aperio MPP", "ome-tiff": "OME PhysicalSizeX", "tiff": "TIFF resolution tags",
           "ome-zarr": "NGFF scale"}  # fmt: skip


@pytest.fixture(scope="module")
def tiles():
    return [mts.read_image(mts.BUNDLED_TILE)[..., :3]]


def _make(tmp_path, fmt, tiles, **kwargs):
    return mts.make_slide(tmp_path / NAMES[fmt], SIZE, fmt, tiles=tiles, **kwargs)


@pytest.mark.parametrize("fmt", list(NAMES))
def test_every_format_opens_with_levels_and_pixel_size(tmp_path, tiles, fmt):
    if fmt == "svs" and sl._openslide() is None:
        pytest.skip("openslide not installed")
    path, mosaic = _make(tmp_path, fmt, tiles, compression="zlib")
    slide = sl.open_slide(path)
    assert slide.format == FORMATS[fmt]
    assert slide.pixel_size_um == pytest.approx(0.25)
    assert slide.pixel_size_source == SOURCES[fmt]
    factor = 4 if fmt == "svs" else 2
    sides = mts.level_shapes(SIZE, factor)
    assert [lv.shape for lv in slide.levels] == [(s, s, 3) for s in sides]
    assert slide.downsamples == pytest.approx([SIZE / s for s in sides])
    assert all(lv.dtype == np.uint8 for lv in slide.levels)
    # lossless tiles: level 0 is the mosaic, level 1 its area average, exactly
    np.testing.assert_array_equal(slide.levels[0][700:1500, 100:900].compute(),
                                  mosaic.region(700, 1500, 100, 900))  # fmt: skip
    lv1 = mts.downsample(mosaic.region(0, SIZE, 0, SIZE), factor)
    np.testing.assert_array_equal(slide.levels[1].compute(), lv1)


@pytest.mark.parametrize("fmt", ["svs", "ome-tiff"])
def test_jpeg_slides_are_close_to_the_mosaic(tmp_path, tiles, fmt):
    path, mosaic = _make(tmp_path, fmt, tiles)  # JPEG tiles, quality 85
    got = sl.open_slide(path).levels[0][:1024, 512:1536].compute().astype(int)
    ref = mosaic.region(0, 1024, 512, 1536).astype(int)
    assert np.abs(got - ref).mean() < 6
    assert (ref != got).any()  # it really went through the lossy codec


def test_svs_without_openslide_is_read_by_tifffile(tmp_path, tiles, monkeypatch):
    path, mosaic = _make(tmp_path, "svs", tiles, compression="zlib")
    monkeypatch.setattr(sl, "_openslide", lambda: None)
    sl._cached_reader.cache_clear()
    slide = sl.open_slide(path)
    assert slide.format == "svs" and slide.pixel_size_source == "Aperio MPP"
    assert [lv.shape[0] for lv in slide.levels] == mts.level_shapes(SIZE, 4)  # no thumbnail
    np.testing.assert_array_equal(
        slide.levels[0][:300, :300].compute(), mosaic.region(0, 300, 0, 300)
    )


@pytest.mark.parametrize("fmt", list(NAMES))
def test_read_region_by_path_matches_the_levels(tmp_path, tiles, fmt):
    if fmt == "svs" and sl._openslide() is None:
        pytest.skip("openslide not installed")
    path, _ = _make(tmp_path, fmt, tiles, compression="zlib")
    slide = sl.open_slide(path)
    region = sl.read_region(str(path), 1, 10, 210, 20, 330)
    np.testing.assert_array_equal(region, slide.levels[1][10:210, 20:330].compute())
    # the graph holds only the path: it pickles (a dask.distributed worker can run it)
    level = pickle.loads(pickle.dumps(slide.levels[0]))
    sl._cached_reader.cache_clear()  # as in a fresh worker process
    np.testing.assert_array_equal(level[:50, :60].compute(), slide.levels[0][:50, :60].compute())


def test_level_for_picks_the_coarsest_fine_enough_level(tmp_path, tiles):
    path, _ = _make(tmp_path, "ome-tiff", tiles)
    slide = sl.open_slide(path)  # 0.25, 0.5, 1.0, 2.0 µm/px
    assert slide.level_for(0.25) == 0
    assert slide.level_for(0.1) == 0
    assert slide.level_for(0.5) == 1
    assert slide.level_for(0.9) == 1
    assert slide.level_for(1.0) == 2
    assert slide.level_for(100.0) == 3
    with pytest.raises(ValueError, match="positive"):
        slide.level_for(0)


def test_open_slide_decodes_nothing(tmp_path, tiles, monkeypatch):
    path, _ = _make(tmp_path, "ome-tiff", tiles)
    calls = []
    real = sl._read_block
    monkeypatch.setattr(sl, "_read_block", lambda *a: calls.append(a[1]) or real(*a))
    slide = sl.open_slide(path)
    assert calls == []
    slide.levels[2][:10, :10].compute()
    assert calls == [2]


@pytest.mark.parametrize("fmt", ["svs", "tiff", "ome-tiff"])
def test_slide_without_pixel_size_says_it_will_be_estimated(tmp_path, tiles, fmt):
    path, _ = _make(tmp_path, fmt, tiles, mpp=None)
    slide = sl.open_slide(path)
    assert slide.pixel_size_um is None
    assert "estimated" in slide.pixel_size_source
    assert slide.level_for(1.0) == 0  # unknown size: full resolution


def test_unknown_format_is_refused(tmp_path):
    path = tmp_path / "slide.czi"
    path.write_bytes(b"ZISRAWFILE" + bytes(100))
    with pytest.raises(InputError, match=r"slide\.czi: unsupported slide format '\.czi'"):
        sl.open_slide(path)


def test_missing_file_and_not_a_slide(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        sl.open_slide(tmp_path / "none.svs")
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all" * 10)
    with pytest.raises(InputError, match=r"junk\.tif: not a readable slide"):
        sl.open_slide(junk)


@pytest.mark.parametrize("fmt", ["svs", "ome-tiff"])
def test_truncated_slide_is_refused_at_open(tmp_path, tiles, fmt):
    path, _ = _make(tmp_path, fmt, tiles)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match=rf"{path.name}: (truncated slide|not a readable slide)"):
        sl.open_slide(path)


def _damage_tile(path: Path, page_index: int) -> None:
    """Overwrite the first tile of a page with zeros."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[page_index]
        offset, count = page.dataoffsets[0], page.databytecounts[0]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * count)


@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
def test_failing_tile_names_file_and_level_when_read(tmp_path, tiles, monkeypatch, compression):
    monkeypatch.setattr(sl, "_openslide", lambda: None)  # tifffile reads the damaged file
    sl._cached_reader.cache_clear()
    path, _ = _make(tmp_path, "svs", tiles, compression=compression)
    _damage_tile(path, 2)  # the first tile of level 1 (page 1 is the thumbnail)
    slide = sl.open_slide(path)  # the header is intact
    slide.levels[0][:256, :256].compute()  # other levels still read
    with pytest.raises(InputError, match=rf"{path.name}: level 1 region \[0:\d+, 0:\d+\] cannot"):
        slide.levels[1][:64, :64].compute()


@needs_openslide
def test_failing_tile_through_openslide(tmp_path, tiles):
    path, _ = _make(tmp_path, "svs", tiles)
    _damage_tile(path, 2)
    slide = sl.open_slide(path)
    with pytest.raises(InputError, match=rf"{path.name}: level 1 region .* cannot be decoded"):
        slide.levels[1][:64, :64].compute()
    # the broken handle is dropped: level 0 opens afresh and reads
    assert slide.levels[0][:64, :64].compute().shape == (64, 64, 3)


def test_region_outside_level_and_zarr_without_multiscales(tmp_path, tiles):
    path, _ = _make(tmp_path, "ome-zarr", tiles)
    with pytest.raises(InputError, match=r"outside level 3"):
        sl.read_region(path, 3, 0, 300, 0, 10)
    with pytest.raises(InputError, match=r"level 9 does not exist"):
        sl.read_region(path, 9, 0, 1, 0, 1)
    import zarr

    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w", zarr_format=2).create_array("0", shape=(4, 4), dtype="u1")
    with pytest.raises(InputError, match=r"plain\.zarr: .*without OME-NGFF 'multiscales'"):
        sl.open_slide(plain)


def test_16_bit_tiff_is_refused(tmp_path):
    import tifffile

    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, np.zeros((512, 512), np.uint16), tile=(256, 256))
    with pytest.raises(InputError, match=r"deep\.tif: slide pixels are uint16, expected 8-bit"):
        sl.open_slide(path)


def test_generator_cli_refuses_bad_arguments_and_keeps_existing_files(tmp_path, capsys):
    out = tmp_path / "s.svs"
    out.write_bytes(b"keep")
    assert mts.main(["--size", "512", "--out", str(out), "--tiles", str(tmp_path)]) == 2
    assert out.read_bytes() == b"keep"
    assert "already exists" in capsys.readouterr().err
    assert mts.main(["--size", "10", "--out", str(tmp_path / "t.svs")]) == 2
    assert not (tmp_path / "t.svs").exists()


def test_generator_tissue_share(tmp_path, tiles, capsys):
    for share in (0.05, 0.1):
        mosaic = mts.Mosaic(4000, tiles, tissue=share)
        assert mosaic._tissue(0, 4000, 0, 4000).mean() == pytest.approx(share, rel=0.02)
    drawn = mts.Mosaic(4000, tiles)._tissue(0, 4000, 0, 4000).mean()
    assert 0.3 < drawn < 0.6  # the default layout is unchanged by the option
    out = tmp_path / "t.svs"
    assert mts.main(["--size", "512", "--out", str(out), "--tissue", "0"]) == 2
    assert "--tissue must be a share" in capsys.readouterr().err and not out.exists()
