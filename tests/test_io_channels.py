"""Channel axes, pixel size from file metadata, and decompression bombs refused early."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_medinst import _io
from napari_medinst._io import InputError, guess_axes, open_image, read_image, read_image_info
from napari_medinst.channels import iter_planes, plan_layout, trailing_channels
from napari_medinst.cli import main
from napari_medinst.samples import DATA

H, W = 520, 348  # the fluorescence sample


@pytest.fixture(scope="module")
def fluo() -> np.ndarray:
    return tifffile.imread(DATA / "fluo_tile.tif")


def _channels(fluo: np.ndarray, n: int, nuclear: int, axis: int) -> np.ndarray:
    """``n`` channels of noise with the nuclear image at ``nuclear``, stacked on ``axis``."""
    rng = np.random.default_rng(n)
    chans = [rng.integers(0, 40, fluo.shape).astype(np.uint16) for _ in range(n)]
    chans[nuclear] = fluo.astype(np.uint16)
    return np.stack(chans, axis=axis)


def _segment(path, out, *extra) -> int:
    return main(["segment", str(path), "-o", str(out), "--model", "classical", *extra])


@pytest.fixture(scope="module")
def reference(fluo, tmp_path_factory) -> np.ndarray:
    """The fluorescence sample segmented alone, as uint16 (what the channel must give)."""
    tmp = tmp_path_factory.mktemp("ref")
    tifffile.imwrite(tmp / "ref.tif", fluo.astype(np.uint16))
    assert _segment(tmp / "ref.tif", tmp) == 0
    return tifffile.imread(tmp / "ref_instances.tif")


# ----------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("shape", "axes"),
    [
        ((H, W), "YX"),
        ((H, W, 3), "YXC"),
        ((H, W, 5), "YXC"),
        ((H, W, 16), "YXC"),
        ((H, W, 17), "ZYX"),
        ((8, H, W), "ZYX"),
        ((4, H, W, 3), "ZYXC"),
        ((2, 4, H, W), "TZYX"),
    ],
)
def test_guess_axes_never_takes_a_short_last_axis_as_space(shape, axes):
    assert guess_axes(shape) == axes


@pytest.mark.parametrize(
    ("shape", "dtype", "axes", "meta", "kw", "lead", "channel", "colour"),
    [
        ((H, W, 3), np.uint8, "YXC", False, {}, (), None, True),  # RGB as before
        ((H, W, 3), np.float32, "YXC", False, {}, (), None, True),
        ((H, W, 3), np.uint8, "YXS", True, {"channel": 1}, (), 1, False),
        ((H, W, 1), np.uint16, "YXC", False, {}, (), 0, False),
        ((H, W, 8), np.uint16, "YXC", False, {"channel": 7}, (), 7, False),
        ((8, H, W), np.uint16, "ZYX", False, {}, (8,), None, False),  # planes
        ((8, H, W), np.uint16, "ZYX", False, {"channel": 3}, (), 3, False),  # said: channels
        ((3, H, W), np.uint8, "ZYX", False, {"channel_axis": 0}, (), None, True),
        ((3, H, W), np.uint16, "CYX", True, {"channel": 0}, (), 0, False),
        ((2, 3, 4, H, W), np.uint16, "TZCYX", True, {"channel": 2}, (2, 3), 2, False),
    ],
)
def test_plan_layout(shape, dtype, axes, meta, kw, lead, channel, colour):
    layout = plan_layout(shape, dtype, axes, from_metadata=meta, **kw)
    assert (layout.lead, layout.channel, layout.colour) == (lead, channel, colour)
    arr = np.zeros(shape, dtype)
    planes = list(iter_planes(arr, layout))
    assert len(planes) == int(np.prod(lead))
    assert planes[0][1].shape == ((H, W, 3) if colour else (H, W))


@pytest.mark.parametrize(
    ("shape", "dtype", "axes", "meta", "kw", "match"),
    [
        ((H, W, 5), np.uint16, "YXC", False, {}, "5-channel image (axes YXC); pick the nuclear"),
        ((3, H, W), np.uint16, "CYX", True, {}, "--channel N (0-2)"),
        ((H, W, 5), np.uint16, "YXC", False, {"channel": 5}, "out of range (5 channels: 0-4)"),
        ((8, H, W), np.uint16, "ZYX", True, {"channel": 1}, "no channel axis"),
        ((H, W), np.uint8, "YX", True, {"channel_axis": 2}, "--channel-axis 2 does not exist"),
    ],
)
def test_plan_layout_refuses_with_a_clear_message(shape, dtype, axes, meta, kw, match):
    with pytest.raises(InputError, match=match.replace("(", r"\(").replace(")", r"\)")):
        plan_layout(shape, dtype, axes, from_metadata=meta, name="x.tif", **kw)


def test_trailing_channels_for_napari_layers():
    assert trailing_channels((H, W, 5), rgb=False) == 5
    assert trailing_channels((4, H, W, 2), rgb=False) == 2
    assert trailing_channels((H, W, 3), rgb=True) == 0
    assert trailing_channels((8, H, W), rgb=False) == 0
    assert trailing_channels((H, W), rgb=False) == 0


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("n", [5, 8])
def test_channels_last_needs_and_honours_channel(tmp_path, capsys, fluo, reference, n):
    path = tmp_path / f"hw{n}.tif"
    tifffile.imwrite(path, _channels(fluo, n, nuclear=n - 1, axis=-1))
    assert _segment(path, tmp_path / "a") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(path) in err and f"{n}-channel" in err and "--channel N" in err
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    assert _segment(path, tmp_path / "b", "--channel", str(n - 1)) == 0
    labels = tifffile.imread(tmp_path / "b" / f"hw{n}_instances.tif")
    assert labels.shape == (H, W)
    np.testing.assert_array_equal(labels, reference)


def test_channels_first_without_metadata_is_planes_unless_a_channel_is_picked(
    tmp_path, capsys, fluo, reference
):
    path = tmp_path / "chw.tif"
    tifffile.imwrite(path, _channels(fluo, 8, nuclear=3, axis=0))
    assert _segment(path, tmp_path / "planes") == 0
    assert "8 grey planes" in capsys.readouterr().err
    assert tifffile.imread(tmp_path / "planes" / "chw_instances.tif").shape == (8, H, W)
    assert _segment(path, tmp_path / "c", "--channel", "3") == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "c" / "chw_instances.tif"), reference)


@pytest.mark.parametrize("kind", ["imagej", "ome"])
def test_channels_first_with_axes_metadata(tmp_path, capsys, fluo, reference, kind):
    path = tmp_path / f"{kind}.tif"
    data = _channels(fluo, 8, nuclear=5, axis=0)
    tifffile.imwrite(path, data, **{kind: True}, metadata={"axes": "CYX"})
    info = read_image_info(path)
    assert (info.axes, info.axes_from_metadata) == ("CYX", True)
    assert _segment(path, tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert str(path) in err and "8-channel" in err
    assert _segment(path, tmp_path / "b", "--channel", "5") == 0
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "b" / f"{kind}_instances.tif"), reference
    )


def test_imagej_z_stack_is_planes(tmp_path, fluo):
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, np.stack([fluo, fluo[::-1]]), imagej=True, metadata={"axes": "ZYX"})
    assert _segment(path, tmp_path / "o") == 0
    assert tifffile.imread(tmp_path / "o" / "z_instances.tif").shape == (2, H, W)
    assert _segment(path, tmp_path / "p", "--channel", "0") == 2  # no channel axis to pick from


def test_channel_axis_option_reads_channels_first_colour(tmp_path):
    he = tifffile.imread(DATA / "he_tile.tif")
    path = tmp_path / "chw_rgb.tif"
    tifffile.imwrite(path, np.moveaxis(he, -1, 0), photometric="minisblack", metadata=None)
    info = read_image_info(path)
    assert info.axes_from_metadata is False and info.axes == "ZYX"
    assert _segment(path, tmp_path / "o", "--channel-axis", "0") == 0
    assert tifffile.imread(tmp_path / "o" / "chw_rgb_instances.tif").shape == he.shape[:2]
    with pytest.raises(SystemExit) as exc:  # argparse: one usage line, status 2
        main(["segment", str(path), "-o", str(tmp_path / "x"), "--channel", "-1"])
    assert exc.value.code == 2


@pytest.mark.parametrize("metadata", [None, {}])
def test_rgb_uint8_is_still_colour(tmp_path, metadata):
    he = tifffile.imread(DATA / "he_tile.tif")
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, he, metadata=metadata)
    arr, info = open_image(path)
    np.testing.assert_array_equal(arr, he)
    layout = plan_layout(arr.shape, arr.dtype, info.axes, from_metadata=info.axes_from_metadata)
    assert layout.colour and layout.lead == ()
    png = tmp_path / "rgb.png"
    Image.fromarray(he).save(png)
    assert read_image_info(png).axes == "YXS"
    np.testing.assert_array_equal(read_image(png), he)


# ----------------------------------------------------------------------------- pixel size


@pytest.mark.parametrize(
    ("kwargs", "expected", "source"),
    [
        ({"resolution": (20000, 20000), "resolutionunit": "CENTIMETER"}, 0.5, "TIFF resolution"),
        ({"resolution": (50800, 50800), "resolutionunit": "INCH"}, 0.5, "TIFF resolution"),
        ({"imagej": True, "resolution": (2, 2), "metadata": {"unit": "um"}}, 0.5, "ImageJ"),
        (
            {"ome": True, "metadata": {"PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm"}},
            0.5,
            "OME",
        ),
        (
            {"ome": True, "metadata": {"PhysicalSizeX": 500, "PhysicalSizeXUnit": "nm"}},
            0.5,
            "OME",
        ),
        ({}, None, None),  # tifffile's default: 1 px per (no unit)
        ({"resolution": (1, 1), "resolutionunit": "INCH"}, None, None),  # the TIFF default
        ({"resolution": (72, 72), "resolutionunit": "INCH"}, None, None),  # an editor's dpi
    ],
)
def test_pixel_size_from_tiff_metadata(tmp_path, kwargs, expected, source):
    path = tmp_path / "px.tif"
    tifffile.imwrite(path, np.zeros((32, 32), np.uint8), **kwargs)
    info = read_image_info(path)
    if expected is None:
        assert info.pixel_size is None
    else:
        assert info.pixel_size == pytest.approx(expected)
    assert (info.pixel_size_source or "").startswith(source or "")


def test_cli_uses_the_file_pixel_size_unless_given(tmp_path, capsys, fluo):
    path = tmp_path / "tagged.tif"
    tifffile.imwrite(path, fluo, resolution=(20000, 20000), resolutionunit="CENTIMETER")
    assert _segment(path, tmp_path / "a") == 0
    assert "0.500 µm/px from file metadata" in capsys.readouterr().out
    assert _segment(path, tmp_path / "b", "--pixel-size", "0.4") == 0
    out = capsys.readouterr().out
    assert "0.400 µm/px" in out and "file metadata" not in out


# ----------------------------------------------------------------------------- bombs


def _tiff_bomb(path, side: int = 40_000, tile: int = 4096) -> None:
    """A few-MB TIFF declaring side x side uint8: identical zlib-compressed zero tiles."""
    chunk = zlib.compress(bytes(tile * tile), 9)
    n = math.ceil(side / tile) ** 2
    tifffile.imwrite(
        path,
        data=(chunk for _ in range(n)),
        shape=(side, side),
        dtype="uint8",
        tile=(tile, tile),
        compression="zlib",
    )


def _png_bomb(path, side: int = 40_000) -> None:
    """A tiny PNG whose header declares side x side (the pixel data is a 1x1 image)."""
    Image.new("L", (1, 1)).save(path)
    raw = bytearray(path.read_bytes())
    ihdr = struct.pack(">II", side, side) + raw[24:29]
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(bytes(raw))


def test_tiff_bomb_refused_from_the_header(tmp_path, capsys):
    path = tmp_path / "bomb.tif"
    _tiff_bomb(path)
    assert path.stat().st_size < 10e6
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"bomb\.tif: declares 40000x40000 px"):
        read_image(path)
    assert time.perf_counter() - t0 < 2.0
    assert _segment(path, tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "40000x40000" in err


def test_tiff_bomb_refused_without_decoding(tmp_path):
    """In a fresh process: the peak memory barely moves while the bomb is refused."""
    path = tmp_path / "bomb.tif"
    _tiff_bomb(path)
    code = (
        "import resource, sys\n"
        "from napari_medinst._io import InputError, read_image\n"
        "import tifffile, imageio.v3\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    read_image(sys.argv[1])\n"
        "except InputError:\n"
        "    pass\n"
        "else:\n"
        "    sys.exit('not refused')\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    assert int(proc.stdout) < 200 * 1024  # KiB on Linux


def test_png_bomb_refused(tmp_path, capsys):
    path = tmp_path / "bomb.png"
    _png_bomb(path)
    with pytest.raises(InputError, match=r"bomb\.png: "):
        read_image_info(path)
    assert _segment(path, tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err


def test_byte_limit_counts_every_plane(tmp_path, monkeypatch):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((4, 64, 64), np.uint16), photometric="minisblack")
    monkeypatch.setattr(_io, "MAX_DECODE_BYTES", 4 * 64 * 64 * 2 - 1)
    with pytest.raises(InputError, match=r"stack\.tif: declares 4 x 64 x 64 uint16"):
        read_image(path)
    monkeypatch.setattr(_io, "MAX_DECODE_BYTES", 4 * 64 * 64 * 2)
    assert read_image(path).shape == (4, 64, 64)


@pytest.mark.parametrize("how", ["imagej", "ome"])
def test_8bit_three_channel_composite_from_metadata_is_not_colour(tmp_path, capsys, how):
    """An 8-bit ImageJ/OME composite whose metadata says channels (C) is fluorescence: the
    user must pick the nuclear channel (it used to be run silently as an H&E colour image)."""
    from napari_medinst.cli import main

    rng = np.random.default_rng(0)
    path = tmp_path / "c3.tif"
    data = rng.integers(0, 255, (3, 64, 64), dtype=np.uint8)
    if how == "imagej":
        tifffile.imwrite(path, data, imagej=True, metadata={"axes": "CYX"})
    else:
        tifffile.imwrite(path, data, ome=True, metadata={"axes": "CYX"})
    rc = main(["segment", str(path), "-o", str(tmp_path / "out"), "--model", "classical"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "c3.tif" in err and "--channel" in err and len(err.splitlines()) == 1


def test_metadata_errors_do_not_refuse_intact_pixels(tmp_path, capfd):
    """tifffile logs an error for a malformed OME-XML description but reads the pixels;
    such a file must be read (it was refused as damaged), quietly."""
    a = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    path = tmp_path / "badome.tif"
    broken = '<?xml version="1.0"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image & </OME>'
    tifffile.imwrite(path, a, photometric="rgb", description=broken, metadata=None)
    capfd.readouterr()
    assert np.array_equal(read_image(path), a)
    assert capfd.readouterr().err == ""


def test_damage_in_one_thread_does_not_fail_another_threads_read(tmp_path):
    """The tifffile log catcher is per thread: a damaged file read in one thread does
    not make a concurrent read of a good file fail."""
    import threading

    good = tmp_path / "good.tif"
    tifffile.imwrite(good, np.ones((64, 64), np.uint8))
    errors = []

    def read_good():
        for _ in range(20):
            try:
                read_image(good)
            except InputError as exc:
                errors.append(exc)

    def log_errors():
        import logging

        for _ in range(200):
            logging.getLogger("tifffile").error("simulated damage elsewhere")

    threads = [threading.Thread(target=read_good), threading.Thread(target=log_errors)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_implausible_pixel_size_tags_are_not_used_and_nothing_is_written_first(tmp_path, capsys):
    """A 4000 dpi TIFF (6.35 µm/px, a scanner's dpi, not the specimen's) used to be read as
    the pixel size and refused mid-run, after the first image's outputs were written. Now it
    is estimated instead, with a warning naming the file, and both images are segmented."""
    img = tifffile.imread(
        _io.Path(__file__).resolve().parents[1] / "src/napari_medinst/data/he_tile.tif"
    )
    ok, odd = tmp_path / "ok.tif", tmp_path / "odd.tif"
    tifffile.imwrite(
        ok, img, photometric="rgb", resolution=(40000, 40000), resolutionunit="CENTIMETER"
    )
    tifffile.imwrite(odd, img, photometric="rgb", resolution=(4000, 4000), resolutionunit="INCH")
    out = tmp_path / "out"
    rc = main(["segment", str(ok), str(odd), "-o", str(out), "--model", "classical"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "odd.tif: warning: its metadata says 6.35 µm/px" in captured.err
    assert "ok.tif" in captured.out and "0.250 µm/px from file metadata" in captured.out
    assert (out / "odd_instances.tif").exists() and (out / "ok_instances.tif").exists()


def test_png_between_pillows_limit_and_ours_is_accepted_from_the_header(tmp_path):
    """A 15,000² PNG (225 Mpx) is a normal big image: Pillow's own 179 Mpx bomb limit used
    to refuse it although this tool's limit is MAX_DECODE_PIXELS (1 Gpx)."""
    path = tmp_path / "big.png"
    _png_bomb(path, side=15_000)
    info = read_image_info(path)
    assert info.shape == (15_000, 15_000)


def test_grey_alpha_png_is_grey(tmp_path):
    """A grey + alpha PNG (mode LA) is a grey image, not a 2-channel one."""
    grey = np.random.default_rng(1).integers(0, 255, (40, 50), dtype=np.uint8)
    path = tmp_path / "la.png"
    Image.fromarray(np.dstack([grey, np.full_like(grey, 255)]), mode="LA").save(path)
    arr, info = open_image(path)
    assert np.array_equal(arr, grey) and info.shape == (40, 50)


def test_cmyk_jpeg_is_read_as_rgb(tmp_path):
    """A CMYK JPEG used to be decoded raw (4 bands read as RGBA: colours inverted)."""
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 200  # a red image
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    arr = read_image(path)
    assert arr.shape == (32, 32, 3)
    assert arr[..., 0].mean() > 150 and arr[..., 1].mean() < 60
