"""The bad-input and fault matrix: one row per case, what the README promises for each.

Every row states an input (written into ``tmp_path`` by its ``setup``), a command line
(``{t}`` stands for ``tmp_path``) or a core API call, and the expected outcome:

* CLI rows run ``napari_medinst.cli.main(argv)`` in-process. Exit 0, or exit 2 with
  exactly one line on stderr that contains the row's message pattern and the name of
  the offending file or argument. No traceback, no warning, no log record at WARNING
  or above (a user would see those on stderr too).
* On an error nothing in ``tmp_path`` is created or changed (all-or-nothing writes)
  and no ``.part`` file is left behind; ``absent`` paths must not exist afterwards,
  ``present`` paths must exist after a success.
* Argument-parser rows (``usage=True``) end with argparse's usage text plus one
  ``error:`` line naming the argument.
* API rows call a core function and expect an exception type (or success).
* Fault rows run the CLI in a subprocess: a file-size limit (``RLIMIT_FSIZE``, the
  same error a full disk gives) or a SIGKILL in the middle of a write.

The matrix is the catalogue of bad inputs; ``test_matrix_size`` keeps it complete.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_medinst._io import InputError
from napari_medinst.cli import main

Setup = Callable[[Path], None]

# ----------------------------------------------------------------------------- arrays


def blobs(n: int = 64, dtype=np.uint8, rgb: bool = False) -> np.ndarray:
    """Bright disks on a dark background (a tiny fluorescence-like image)."""
    lab = disk_labels(n)
    img = np.where(lab > 0, 200, 20).astype(np.float64)
    img += np.random.default_rng(0).normal(0, 5, img.shape)
    img = np.clip(img, 0, 255)
    if rgb:
        img = np.stack([img, img * 0.5, img * 0.8], axis=-1)
    if np.issubdtype(dtype, np.integer) and np.iinfo(dtype).max > 255:
        img = img * 200
    return img.astype(dtype)


def he_like(n: int = 64) -> np.ndarray:
    """Dark purple disks on a bright background (H&E-like RGB)."""
    lab = disk_labels(n)
    img = np.full((n, n, 3), (235, 220, 230), np.uint8)
    img[lab > 0] = (90, 40, 120)
    return img


def disk_labels(n: int = 64) -> np.ndarray:
    rr, cc = np.mgrid[:n, :n]
    out = np.zeros((n, n), np.int32)
    centres = [(n // 4, n // 4), (n // 4, 3 * n // 4), (3 * n // 4, n // 2)]
    for i, (r, c) in enumerate(centres, start=1):
        out[(rr - r) ** 2 + (cc - c) ** 2 <= (n // 8) ** 2] = i
    return out


# ---------------------------------------------------------------------- setup helpers


def S(*steps: Setup) -> Setup:
    """All ``steps`` in order."""

    def run(t: Path) -> None:
        for step in steps:
            step(t)

    return run


def _target(t: Path, name: str) -> Path:
    path = t / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def raw(name: str, data: bytes) -> Setup:
    return lambda t: _target(t, name).write_bytes(data)


def text(name: str, content: str, encoding: str = "utf-8") -> Setup:
    return lambda t: _target(t, name).write_bytes(content.encode(encoding))


def folder(name: str) -> Setup:
    return lambda t: (t / name).mkdir(parents=True, exist_ok=True)


def tif(name: str, arr: np.ndarray, **kw) -> Setup:
    return lambda t: tifffile.imwrite(_target(t, name), arr, **kw)


def img(name: str, arr: np.ndarray) -> Setup:
    """PNG or JPEG through imageio."""

    def run(t: Path) -> None:
        import imageio.v3 as iio

        iio.imwrite(_target(t, name), arr)

    return run


def truncated(name: str, writer: Callable[[str, np.ndarray], Setup], keep: float) -> Setup:
    """A valid image of ``blobs(96)`` cut to ``keep`` of its bytes."""

    def run(t: Path) -> None:
        writer(name, blobs(96, rgb=True))(t)
        data = (t / name).read_bytes()
        (t / name).write_bytes(data[: int(len(data) * keep)])

    return run


def huge_tiff(name: str, side: int, consistent: bool = True) -> Setup:
    """A tiny TIFF whose header declares ``side`` x ``side`` pixels.

    ``consistent``: one strip, as a real (compressed) bomb; else the strip tags
    disagree with the size (a damaged file).
    """

    def run(t: Path) -> None:
        kw = {"rowsperstrip": 64, "metadata": None} if consistent else {}
        tifffile.imwrite(_target(t, name), np.zeros((64, 64), np.uint8), **kw)
        with tifffile.TiffFile(t / name, mode="r+b") as tf:
            tf.pages[0].tags["ImageWidth"].overwrite(side)
            tf.pages[0].tags["ImageLength"].overwrite(side)
            if consistent:
                tf.pages[0].tags["RowsPerStrip"].overwrite(side)

    return run


def huge_png(name: str, side: int) -> Setup:
    """A PNG whose header declares ``side`` x ``side`` pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    row = b"\x00" + bytes(side)
    idat = zlib.compress(row * 64, 9)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
    return raw(name, data + chunk(b"IEND", b""))


class _Evil:
    """Unpickling this creates a file: proof that a pickle ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_pickle(name: str, marker: str = "pwned") -> Setup:
    def run(t: Path) -> None:
        import torch

        torch.save({"weight": _Evil(str(t / marker))}, _target(t, name))

    return run


# ------------------------------------------------------------------------ model folders

MODEL = "tinymodel"


@functools.cache
def _tiny_model_files() -> dict[str, bytes]:
    import torch

    from napari_medinst.model.folder import save_model_folder
    from napari_medinst.model.network import NetConfig, NucleusNet

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        path = save_model_folder(Path(d) / "m", NucleusNet(NetConfig(widths=(4, 8))), half=False)
        return {p.name: p.read_bytes() for p in path.iterdir()}


def model(*edits: Setup) -> Setup:
    """A tiny valid model folder at ``tmp/tinymodel``, then ``edits``."""

    def run(t: Path) -> None:
        for name, data in _tiny_model_files().items():
            _target(t, f"{MODEL}/{name}").write_bytes(data)
        for edit in edits:
            edit(t)

    return run


def edit_config(change: Callable[[dict], object], resign: bool = False) -> Setup:
    """Change the model's config.json; ``resign`` stores the weights' new checksum."""

    def run(t: Path) -> None:
        from napari_medinst.model.folder import sha256_file

        path = t / MODEL / "config.json"
        cfg = json.loads(path.read_text())
        cfg = change(cfg) or cfg
        if resign:
            cfg["weights_sha256"] = sha256_file(t / MODEL / "weights.pt")
        path.write_text(json.dumps(cfg))

    return run


def remove(name: str) -> Setup:
    return lambda t: (t / name).unlink()


def _set_widths(widths):
    return lambda cfg: cfg["net"].__setitem__("widths", widths)


def _drop_sha(cfg: dict) -> None:
    cfg.pop("weights_sha256")


# ------------------------------------------------------------------------- data folders


def dataset(
    name: str = "ds",
    n: int = 2,
    labels: Callable[[int], np.ndarray] | None = None,
    index: str | None = None,
    index_encoding: str = "utf-8",
) -> Setup:
    """``name/images/s<i>.tif`` + ``name/labels/s<i>.tif`` (+ ``index.csv``)."""

    def run(t: Path) -> None:
        for i in range(n):
            tifffile.imwrite(_target(t, f"{name}/images/s{i}.tif"), blobs(64))
            lab = disk_labels(64) if labels is None else labels(i)
            tifffile.imwrite(_target(t, f"{name}/labels/s{i}.tif"), lab)
        if index is not None:
            _target(t, f"{name}/index.csv").write_bytes(index.encode(index_encoding))

    return run


# ----------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Case:
    """One row of the matrix.

    Attributes
    ----------
    id : str
        Test id.
    argv : sequence of str or callable
        CLI arguments (``{t}`` is replaced by the test's folder), or for API rows a
        callable taking the folder.
    setup : callable
        Writes the inputs into the folder.
    rc : int or exception type or None
        CLI: expected exit status (0 or 2). API: the exception type expected, or None.
    match : str
        Regular expression the error message (or, for rc 0, stdout) must contain.
    names : tuple of str
        Substrings naming the offending file or argument; all must appear in the error.
    absent : tuple of str
        Paths (relative to the folder) that must not exist afterwards.
    present : tuple of str
        Paths that must exist afterwards (successful rows).
    usage : bool
        The argument parser rejects it (usage text, then one ``error:`` line).
    """

    id: str
    argv: Sequence[str] | Callable[[Path], object]
    setup: Setup | None = None
    rc: int | type[BaseException] | None = 2
    match: str = ""
    names: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    present: tuple[str, ...] = ()
    usage: bool = False


def P(*parts: str) -> str:
    return "/".join(("{t}", *parts))


def seg(*images: str, model: str = "classical", out: str = "out", extra: Sequence[str] = ()):
    return ["segment", *(P(i) for i in images), "-o", P(out), "--model", model, *extra]


GOOD = tif("good.tif", blobs(64))
GOOD_OUT = ("out/good_instances.tif", "out/good_instances.csv")


def bad_image(id: str, name: str, setup: Setup | None, match: str, extra=()) -> Case:
    stem = Path(name).stem
    return Case(
        id,
        seg(name, extra=extra),
        setup,
        2,
        match,
        (name,),
        absent=(f"out/{stem}_instances.tif", f"out/{stem}_instances.csv"),
    )


def ok_image(id: str, name: str, setup: Setup, extra=(), model: str = "classical") -> Case:
    stem = Path(name).stem
    return Case(
        id,
        seg(name, extra=extra, model=model),
        setup,
        0,
        "nuclei",
        present=(f"out/{stem}_instances.tif", f"out/{stem}_instances.csv"),
    )


def _png_bytes() -> bytes:
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", blobs(), extension=".png")


PNG_BYTES = _png_bytes()
UNREADABLE = r"not a readable image|cannot read|not an image|corrupt|truncated"
UNSUPPORTED = r"unsupported file type"
TOO_BIG = r"(?i)pixels|too large|larger than|bomb"

# The tables keep one row per line.
# fmt: off
IMAGE_CASES = [
    bad_image("image-missing", "missing.tif", None, "file not found"),
    bad_image("image-is-folder", "adir.tif", folder("adir.tif"), "is a folder"),
    bad_image("image-empty-tif", "empty.tif", raw("empty.tif", b""), UNREADABLE),
    bad_image("image-empty-png", "empty.png", raw("empty.png", b""), UNREADABLE),
    bad_image("image-empty-jpg", "empty.jpg", raw("empty.jpg", b""), UNREADABLE),
    bad_image("image-junk-tif", "junk.tif", raw("junk.tif", b"hello world" * 50), UNREADABLE),
    bad_image("image-junk-png", "junk.png", raw("junk.png", bytes(range(64))), UNREADABLE),
    bad_image("image-junk-jpeg", "junk.jpeg", raw("junk.jpeg", b"\xff\xd8junk"), UNREADABLE),
    bad_image("image-png-named-tif", "png_in.tif", raw("png_in.tif", PNG_BYTES), UNREADABLE),
    bad_image("image-suffix-txt", "notes.txt", text("notes.txt", "x"), UNSUPPORTED),
    bad_image("image-suffix-bmp", "pic.bmp", raw("pic.bmp", b"BM" + bytes(64)), UNSUPPORTED),
    bad_image("image-suffix-none", "noext", tif("noext", blobs()), UNSUPPORTED),
    bad_image("image-suffix-npy", "arr.npy", raw("arr.npy", b"\x93NUMPY"), UNSUPPORTED),
    bad_image("image-truncated-tif", "cut.tif", truncated("cut.tif", tif, 0.5), UNREADABLE),
    bad_image("image-truncated-png", "cut.png", truncated("cut.png", img, 0.5), UNREADABLE),
    bad_image("image-truncated-jpg", "cut.jpg", truncated("cut.jpg", img, 0.5), UNREADABLE),
    bad_image("image-header-only-tif", "hdr.tif", raw("hdr.tif", b"II*\x00"), UNREADABLE),
    bad_image("image-zero-size", "zero.tif", tif("zero.tif", np.zeros((0, 0), np.uint8)), "no pixels|too small|empty"),
    bad_image("image-1x1-tif", "one.tif", tif("one.tif", np.zeros((1, 1), np.uint8)), "too small"),
    bad_image("image-1x1-png", "one.png", img("one.png", np.zeros((1, 1), np.uint8)), "too small"),
    bad_image("image-7x64", "thin.tif", tif("thin.tif", np.zeros((7, 64), np.uint8)), "too small"),
    bad_image("image-1d", "line.tif", tif("line.tif", np.zeros(64, np.uint8)), "not an image|shape"),
    bad_image("image-2-channel", "two.tif", tif("two.tif", np.zeros((64, 64, 2), np.uint8)), "2-channel"),
    bad_image("image-float-nan", "nan.tif", tif("nan.tif", np.where(disk_labels() > 0, np.nan, 0.1).astype(np.float32)), "NaN"),
    bad_image("image-float-inf", "inf.tif", tif("inf.tif", np.where(disk_labels() > 0, np.inf, 0.1).astype(np.float32)), "infinite"),
    bad_image("image-float64-neginf", "ninf.tif", tif("ninf.tif", np.full((64, 64), -np.inf)), "infinite"),
    bad_image("image-complex", "cplx.tif", tif("cplx.tif", np.ones((64, 64), np.complex64)), "dtype"),
    bad_image("image-hw5-no-channel", "hw5.tif", tif("hw5.tif", blobs(64)[..., None].repeat(5, -1)), "channel"),
    bad_image("image-huge-declared-tif", "bomb.tif", huge_tiff("bomb.tif", 50000), TOO_BIG),
    bad_image("image-huge-declared-png", "bomb.png", huge_png("bomb.png", 20000), TOO_BIG),
    bad_image("image-huge-declared-png-50k", "bomb5.png", huge_png("bomb5.png", 50000), TOO_BIG),
    bad_image("image-tiff-strips-inconsistent", "strips.tif", huge_tiff("strips.tif", 20000, consistent=False), UNREADABLE),
    bad_image("image-stack-plane-nan", "stk.tif", tif("stk.tif", np.stack([blobs(64).astype(np.float32), np.full((64, 64), np.nan, np.float32)])), "NaN"),
    bad_image("image-1xN-stack", "flat.tif", tif("flat.tif", np.zeros((2, 4, 64), np.uint8)), "too small"),
    ok_image("image-grey-uint8", "g8.tif", tif("g8.tif", blobs(64))),
    ok_image("image-grey-uint16", "g16.tif", tif("g16.tif", blobs(64, np.uint16))),
    ok_image("image-grey-int32", "i32.tif", tif("i32.tif", blobs(64, np.int32))),
    ok_image("image-grey-float32", "f32.tif", tif("f32.tif", blobs(64, np.float32) / 255)),
    ok_image("image-float-negative", "neg.tif", tif("neg.tif", blobs(64, np.float32) - 100)),
    ok_image("image-bool", "mask.tif", tif("mask.tif", disk_labels() > 0)),
    ok_image("image-constant", "flat0.tif", tif("flat0.tif", np.zeros((64, 64), np.uint8))),
    ok_image("image-rgb-png", "rgb.png", img("rgb.png", he_like())),
    ok_image("image-rgba-png", "rgba.png", img("rgba.png", np.dstack([he_like(), np.full((64, 64), 255, np.uint8)]))),
    ok_image("image-rgb-jpg", "rgb.jpg", img("rgb.jpg", he_like())),
    ok_image("image-rgb-uint16-tif", "rgb16.tif", tif("rgb16.tif", he_like().astype(np.uint16) * 257)),
    ok_image("image-grey-hw1", "hw1.tif", tif("hw1.tif", blobs(64)[..., None])),
    ok_image("image-uppercase-suffix", "UP.TIF", tif("UP.TIF", blobs(64))),
    ok_image("image-stack-3d", "zstack.tif", tif("zstack.tif", np.stack([blobs(64)] * 2))),
    ok_image("image-5d-planes", "five.tif", tif("five.tif", np.stack([[blobs(64)] * 2] * 2)[:, :, None])),
    ok_image("image-stack-4d-rgb", "zrgb.tif", tif("zrgb.tif", np.stack([he_like()] * 2))),
    ok_image("image-channel-first-as-planes", "cfirst.tif", tif("cfirst.tif", np.stack([blobs(64)] * 3), photometric="minisblack")),
    ok_image("image-hw5-channel-2", "hw5c.tif", tif("hw5c.tif", blobs(64)[..., None].repeat(5, -1)), extra=("--channel", "2")),
    ok_image("image-chw-channel-axis", "chw.tif", tif("chw.tif", np.moveaxis(he_like(), -1, 0), photometric="minisblack"), extra=("--channel-axis", "0")),
    ok_image("image-float64-beyond-float32", "f64.tif", tif("f64.tif", blobs(64, np.float64) * 1e300)),
    ok_image("image-non-square", "wide.tif", tif("wide.tif", np.hstack([blobs(64), blobs(64)]))),
    ok_image("image-unicode-name", "kern_ü.tif", tif("kern_ü.tif", blobs(64))),
    ok_image("image-space-name", "a b.tif", tif("a b.tif", blobs(64))),
]

PX = r"(?i)pixel[ _-]?size"

ARG_CASES = [
    Case("px-zero", seg("good.tif", extra=("--pixel-size", "0")), GOOD, 2, PX, absent=GOOD_OUT),
    Case("px-negative", seg("good.tif", extra=("--pixel-size", "-1")), GOOD, 2, PX, absent=GOOD_OUT),
    Case("px-nan", seg("good.tif", extra=("--pixel-size", "nan")), GOOD, 2, PX, absent=GOOD_OUT),
    Case("px-inf", seg("good.tif", extra=("--pixel-size", "inf")), GOOD, 2, PX, absent=GOOD_OUT),
    Case("px-tiny", seg("good.tif", extra=("--pixel-size", "1e-9")), GOOD, 2, PX, absent=GOOD_OUT),
    Case("px-huge", seg("good.tif", extra=("--pixel-size", "1e9")), GOOD, 2, PX, absent=GOOD_OUT),
    Case("px-below-range", seg("good.tif", extra=("--pixel-size", "0.04")), GOOD, 2, PX, absent=GOOD_OUT),
    Case("px-above-range", seg("good.tif", extra=("--pixel-size", "5.5")), GOOD, 2, PX, absent=GOOD_OUT),
    Case("px-text", seg("good.tif", extra=("--pixel-size", "abc")), GOOD, 2, "invalid float", ("--pixel-size",), GOOD_OUT, usage=True),
    Case("px-lowest-ok", seg("good.tif", extra=("--pixel-size", "0.05")), GOOD, 0, "nuclei", present=GOOD_OUT),
    Case("px-highest-ok", seg("good.tif", extra=("--pixel-size", "5")), GOOD, 0, "nuclei", present=GOOD_OUT),
    Case("px-typical-ok", seg("good.tif", extra=("--pixel-size", "0.25")), GOOD, 0, "nuclei", present=GOOD_OUT),
    Case("modality-unknown", seg("good.tif", extra=("--modality", "xray")), GOOD, 2, "invalid choice", ("--modality",), GOOD_OUT, usage=True),
    Case("modality-he-on-grey", seg("good.tif", extra=("--modality", "he")), GOOD, 0, "modality he", present=GOOD_OUT),
    Case("device-unknown", seg("good.tif", extra=("--device", "tpu")), GOOD, 2, "unknown device", ("tpu",), GOOD_OUT),
    Case("device-bad-ordinal", seg("good.tif", extra=("--device", "cuda:abc")), GOOD, 2, "device", ("cuda:abc",), GOOD_OUT),
    Case("device-empty", seg("good.tif", extra=("--device", "")), GOOD, 2, "device", absent=GOOD_OUT),
    Case("model-name-unknown", seg("good.tif", model="nosuchmodel"), GOOD, 2, "not found", ("nosuchmodel",), GOOD_OUT),
    Case("model-path-is-file", seg("good.tif", model=P("good.tif")), GOOD, 2, "must be a folder", ("good.tif",), GOOD_OUT),
    Case("no-out-argument", ["segment", P("good.tif")], GOOD, 2, "required", ("-o/--out",), usage=True),
    Case("no-images", ["segment", "-o", P("out")], GOOD, 2, "required", ("images",), usage=True),
    Case("unknown-option", seg("good.tif", extra=("--bogus",)), GOOD, 2, "unrecognized", ("--bogus",), GOOD_OUT, usage=True),
    Case("no-command", [], None, 2, "required", ("command",), usage=True),
    Case("unknown-command", ["frobnicate"], None, 2, "invalid choice", ("frobnicate",), usage=True),
]

if not __import__("torch").cuda.is_available():  # on a GPU machine these are valid requests
    ARG_CASES.append(
        Case("device-cuda-absent", seg("good.tif", extra=("--device", "cuda")), GOOD, 2, "no CUDA", ("cuda",), GOOD_OUT)
    )
    ARG_CASES.append(
        Case("device-cuda-ordinal-absent", seg("good.tif", extra=("--device", "cuda:0")), GOOD, 2, "no CUDA", ("cuda:0",), GOOD_OUT)
    )


def params(content: str | bytes) -> Setup:
    data = content if isinstance(content, bytes) else content.encode()
    return S(GOOD, raw("p.json", data))


def param_case(id: str, content: str | bytes | None, match: str, rc: int = 2, names=("p.json",)):
    setup = GOOD if content is None else params(content)
    if rc == 0:
        return Case(id, seg("good.tif", extra=("--params", P("p.json"))), setup, 0, "nuclei", present=GOOD_OUT)
    return Case(id, seg("good.tif", extra=("--params", P("p.json"))), setup, 2, match, names, GOOD_OUT)


PARAM_CASES = [
    param_case("params-missing", None, "not found"),
    Case("params-is-folder", seg("good.tif", extra=("--params", P("pdir"))), S(GOOD, folder("pdir")), 2, "folder|directory|not a file", ("pdir",), GOOD_OUT),
    param_case("params-empty-file", "", "JSON"),
    param_case("params-not-json", "fg_threshold = 0.5", "JSON"),
    param_case("params-truncated-json", '{"fg_threshold": 0.', "JSON"),
    param_case("params-list", "[0.5, 0.3]", "JSON object"),
    param_case("params-string", '"fg_threshold"', "JSON object"),
    param_case("params-null", "null", "JSON object"),
    param_case("params-number", "0.5", "JSON object"),
    param_case("params-unknown-key", '{"fg_treshold": 0.5}', "unknown"),
    param_case("params-wrong-type-string", '{"fg_threshold": "0.5"}', "fg_threshold"),
    param_case("params-wrong-type-bool", '{"fg_threshold": true}', "fg_threshold"),
    param_case("params-wrong-type-object", '{"sobel_size": {"v": 5}}', "sobel_size"),
    param_case("params-wrong-type-null", '{"smoothing": null}', "smoothing"),
    param_case("params-out-of-range", '{"fg_threshold": 7}', "fg_threshold"),
    param_case("params-negative", '{"min_nucleus_size": -5}', "min_nucleus_size"),
    param_case("params-even-sobel", '{"sobel_size": 4}', "sobel_size"),
    param_case("params-fractional-int", '{"marker_opening": 1.5}', "marker_opening"),
    param_case("params-zero-pixel-size", '{"pixel_size": 0}', "pixel_size"),
    param_case("params-nan-float", '{"fg_threshold": NaN}', "NaN|fg_threshold"),
    param_case("params-nan-int", '{"min_nucleus_size": NaN}', "NaN|min_nucleus_size"),
    param_case("params-infinity-float", '{"contour_weight": Infinity}', "Infinity|contour_weight"),
    param_case("params-infinity-int", '{"sobel_size": Infinity}', "Infinity|sobel_size"),
    param_case("params-neg-infinity-int", '{"min_marker_size": -Infinity}', "Infinity|min_marker_size"),
    param_case("params-huge-float", '{"fg_threshold": 1e308}', "fg_threshold"),
    param_case("params-huge-int", '{"min_nucleus_size": 1' + "0" * 400 + "}", "min_nucleus_size"),
    param_case("params-huge-int-as-float", '{"smoothing": 1' + "0" * 400 + "}", "smoothing"),
    param_case("params-not-utf8", '{"fg_threshold": 0.5, "n": "café"}'.encode("latin-1"), "UTF-8|utf-8|decode"),
    param_case("params-binary", b"\x00\x01\x02\xff\xfe", "JSON|UTF-8|utf-8|decode"),
    param_case("params-deep-nesting", "[" * 100_000 + "]" * 100_000, "JSON|nested|deep"),
    param_case("params-valid-subset", '{"fg_threshold": 0.4}', "", rc=0),
    param_case("params-valid-whole-float", '{"sobel_size": 5.0}', "", rc=0),
    param_case("params-valid-widget-file", '{"napari_medinst_postprocess": 1, "fg_threshold": 0.45}', "", rc=0),
    param_case("params-valid-empty-object", "{}", "", rc=0),
]


DEAD_PID = 2**22 + 1  # above Linux's largest pid: no process has it


def _exists(name: str, data: bytes = b"old") -> Setup:
    return raw(name, data)


OUTPUT_CASES = [
    Case("out-instances-exists", seg("good.tif"), S(GOOD, _exists("out/good_instances.tif")), 2, "already exists", ("good_instances.tif",), ("out/good_instances.csv",)),
    Case("out-scores-exists", seg("good.tif"), S(GOOD, _exists("out/good_instances.csv")), 2, "already exists", ("good_instances.csv",), ("out/good_instances.tif",)),
    Case("out-maps-exist", seg("good.tif", extra=("--save-maps",)), S(GOOD, _exists("out/good_prob.tif")), 2, "already exists", ("good_prob.tif",), GOOD_OUT),
    Case("out-exists-overwrite", seg("good.tif", extra=("--overwrite",)), S(GOOD, _exists("out/good_instances.tif")), 0, "nuclei", present=GOOD_OUT),
    Case("out-path-is-file", seg("good.tif"), S(GOOD, _exists("out")), 2, "not a folder|is a file|exists", ("out",)),
    Case("out-parent-is-file", seg("good.tif", out="blocker/sub"), S(GOOD, _exists("blocker")), 2, "not a folder|is a file|cannot create", ("blocker",)),
    Case("out-same-stem-twice", ["segment", P("good.tif"), P("b/good.tif"), "-o", P("out"), "--model", "classical"], S(GOOD, tif("b/good.tif", blobs())), 2, "same output name", ("good",), GOOD_OUT),
    Case("out-same-stem-other-suffix", ["segment", P("good.tif"), P("good.png"), "-o", P("out"), "--model", "classical"], S(GOOD, img("good.png", blobs())), 2, "same output name", ("good.png",), GOOD_OUT),
    Case("out-second-image-unreadable", ["segment", P("good.tif"), P("junk.tif"), "-o", P("out"), "--model", "classical"], S(GOOD, raw("junk.tif", b"junk")), 2, UNREADABLE, ("junk.tif",), GOOD_OUT),
    Case("out-second-image-nan", ["segment", P("good.tif"), P("nan.tif"), "-o", P("out"), "--model", "classical"], S(GOOD, tif("nan.tif", np.full((64, 64), np.nan, np.float32))), 2, "NaN", ("nan.tif",), GOOD_OUT),
    Case("out-second-image-too-small", ["segment", P("good.tif"), P("tiny.tif"), "-o", P("out"), "--model", "classical"], S(GOOD, tif("tiny.tif", np.zeros((4, 4), np.uint8))), 2, "too small", ("tiny.tif",), GOOD_OUT),
    Case("out-nested-new-folder", seg("good.tif", out="new/deeper"), GOOD, 0, "nuclei", present=("new/deeper/good_instances.tif",)),
    Case("out-save-maps", seg("good.tif", extra=("--save-maps",)), GOOD, 0, "nuclei", present=(*GOOD_OUT, "out/good_prob.tif", "out/good_hv.tif", "out/good_contour.tif")),
    Case("out-stale-part-file-cleaned", seg("good.tif"), S(GOOD, _exists(f"out/.good_instances.tif.{DEAD_PID}-abcdefgh.part")), 0, "nuclei", present=GOOD_OUT),
    Case("out-foreign-part-file-kept", seg("good.tif"), S(GOOD, _exists("out/notes.part")), 0, "nuclei", present=(*GOOD_OUT, "out/notes.part")),
]


# ---------------------------------------------------------------------------- evaluate


def ev(pred: str = "pred.tif", gt: str = "gt.tif", *extra: str) -> list[str]:
    return ["evaluate", "--pred", P(pred), "--gt", P(gt), *extra]


LAB = disk_labels()
PAIR = S(tif("pred.tif", LAB), tif("gt.tif", LAB))


def scores_csv(content: str | bytes) -> Setup:
    return S(PAIR, raw("pred_scores.csv", content if isinstance(content, bytes) else content.encode()))


EVAL_CASES = [
    Case("eval-pred-missing", ev(), tif("gt.tif", LAB), 2, "not found", ("pred.tif",)),
    Case("eval-gt-missing", ev(), tif("pred.tif", LAB), 2, "not found", ("gt.tif",)),
    Case("eval-pred-jpeg", ev("pred.jpg"), S(tif("gt.tif", LAB), img("pred.jpg", LAB.astype(np.uint8))), 2, "label image", ("pred.jpg",)),
    Case("eval-pred-empty-file", ev(), S(raw("pred.tif", b""), tif("gt.tif", LAB)), 2, UNREADABLE, ("pred.tif",)),
    Case("eval-gt-junk", ev(), S(tif("pred.tif", LAB), raw("gt.tif", b"junk" * 10)), 2, UNREADABLE, ("gt.tif",)),
    Case("eval-pred-folder-empty", ev("p", "g"), S(folder("p"), folder("g"), tif("g/a.tif", LAB)), 2, "no label images", ("p",)),
    Case("eval-unpaired-folders", ev("p", "g"), S(tif("p/a_instances.tif", LAB), tif("g/b.tif", LAB)), 2, "unpaired", ("a", "b")),
    Case("eval-two-files-one-stem", ev("p", "g"), S(tif("p/a.tif", LAB), tif("p/a_instances.tif", LAB), tif("g/a.tif", LAB)), 2, "two label images", ("a.tif",)),
    Case("eval-file-vs-folder-missing", ev("pred.tif", "g"), S(tif("pred.tif", LAB), tif("g/other.tif", LAB)), 2, "no ground truth", ("pred",)),
    Case("eval-shape-mismatch", ev(), S(tif("pred.tif", LAB), tif("gt.tif", LAB[:40])), 2, "shapes differ", ("pred.tif", "gt.tif")),
    Case("eval-non-integer-labels", ev(), S(tif("pred.tif", LAB * 0.5), tif("gt.tif", LAB)), 2, "integers", ("pred.tif",)),
    Case("eval-nan-labels", ev(), S(tif("pred.tif", LAB.astype(np.float32)), tif("gt.tif", np.where(LAB > 0, np.nan, 0).astype(np.float32))), 2, "integers", ("gt.tif",)),
    Case("eval-negative-labels", ev(), S(tif("pred.tif", -LAB), tif("gt.tif", LAB)), 2, "negative", ("pred.tif",)),
    Case("eval-negative-float-labels", ev(), S(tif("pred.tif", -LAB.astype(np.float32)), tif("gt.tif", LAB)), 2, "negative|integers", ("pred.tif",)),
    Case("eval-3d-labels", ev(), S(tif("pred.tif", np.stack([LAB, LAB])), tif("gt.tif", LAB)), 2, "2-D", ("pred.tif",)),
    Case("eval-rgb-labels", ev("pred.png", "gt.tif"), S(img("pred.png", he_like()), tif("gt.tif", LAB)), 2, "2-D", ("pred.png",)),
    Case("eval-complex-labels", ev(), S(tif("pred.tif", LAB.astype(np.complex64)), tif("gt.tif", LAB)), 2, "integers|dtype", ("pred.tif",)),
    Case("eval-scores-no-columns", ev(), scores_csv("id,confidence\n1,0.5\n"), 2, "label.*score", ("pred_scores.csv",)),
    Case("eval-scores-malformed-row", ev(), scores_csv("label,score\n1,high\n"), 2, "line 2", ("pred_scores.csv",)),
    Case("eval-scores-negative-label", ev(), scores_csv("label,score\n-1,0.5\n"), 2, "positive integer", ("pred_scores.csv",)),
    Case("eval-scores-fractional-label", ev(), scores_csv("label,score\n1.5,0.5\n"), 2, "positive integer", ("pred_scores.csv",)),
    Case("eval-scores-nan", ev(), scores_csv("label,score\n1,nan\n2,0.5\n3,0.5\n"), 2, "finite", ("pred_scores.csv",)),
    Case("eval-scores-duplicate", ev(), scores_csv("label,score\n1,0.5\n1,0.6\n"), 2, "twice", ("pred_scores.csv",)),
    Case("eval-scores-missing-labels", ev(), scores_csv("label,score\n1,0.5\n"), 2, "no value|missing", ("pred_scores.csv",)),
    Case("eval-scores-latin1", ev(), scores_csv("label,score,note\n1,0.5,café\n".encode("latin-1")), 2, "CSV|decode|UTF-8|utf-8", ("pred_scores.csv",)),
    Case("eval-scores-empty-file", ev(), scores_csv(""), 2, "label.*score", ("pred_scores.csv",)),
    Case("eval-scores-is-folder", ev(), S(PAIR, folder("pred_scores.csv")), 0, "mAP"),
    Case("eval-scores-complete", ev(), scores_csv("label,score\n1,0.9\n2,0.8\n3,0.7\n"), 0, r"1\.000"),
    Case("eval-identical-path", ev("gt.tif", "gt.tif"), tif("gt.tif", LAB), 0, r"1\.000"),
    Case("eval-identical-content", ev(), PAIR, 0, r"1\.000"),
    Case("eval-both-empty", ev(), S(tif("pred.tif", np.zeros((64, 64), np.uint16)), tif("gt.tif", np.zeros((64, 64), np.uint16))), 0, "mAP"),
    Case("eval-empty-pred", ev(), S(tif("pred.tif", np.zeros((64, 64), np.uint16)), tif("gt.tif", LAB)), 0, r"0\.000"),
    Case("eval-empty-gt", ev(), S(tif("pred.tif", LAB), tif("gt.tif", np.zeros((64, 64), np.uint16))), 0, r"0\.000"),
    Case("eval-bool-labels", ev(), S(tif("pred.tif", LAB > 0), tif("gt.tif", LAB > 0)), 0, r"1\.000"),
    Case("eval-whole-float-labels", ev(), S(tif("pred.tif", LAB.astype(np.float32)), tif("gt.tif", LAB)), 0, r"1\.000"),
    Case("eval-huge-ids", ev(), S(tif("pred.tif", LAB.astype(np.uint64) * (2**40)), tif("gt.tif", LAB)), 0, r"1\.000"),
    Case("eval-png-labels", ev("pred.png", "gt.png"), S(img("pred.png", LAB.astype(np.uint16)), img("gt.png", LAB.astype(np.uint16))), 0, r"1\.000"),
    Case("eval-json", ev("pred.tif", "gt.tif", "--json"), PAIR, 0, '"pooled"'),
    Case("eval-missing-gt-argument", ["evaluate", "--pred", P("pred.tif")], PAIR, 2, "required", ("--gt",), usage=True),
]


# ------------------------------------------------------------------------ model folders

MS = seg("good.tif", model=P(MODEL), extra=("--pixel-size", "0.5", "--no-tta"))


def model_case(id: str, setup: Setup, match: str, names=(MODEL,), rc: int = 2, absent=()) -> Case:
    if rc == 0:
        return Case(id, MS, S(GOOD, setup), 0, "nuclei", present=GOOD_OUT)
    return Case(id, MS, S(GOOD, setup), 2, match, names, (*GOOD_OUT, *absent))


MODEL_CASES = [
    model_case("model-valid-tiny", model(), "", rc=0),
    model_case("model-folder-missing", lambda t: None, "not found"),
    model_case("model-folder-empty", folder(MODEL), "config.json"),
    model_case("model-missing-weights", model(remove(f"{MODEL}/weights.pt")), "weights.pt"),
    model_case("model-missing-config", model(remove(f"{MODEL}/config.json")), "config.json"),
    model_case("model-config-bad-json", model(text(f"{MODEL}/config.json", "{not json")), "JSON", (f"{MODEL}/config.json",)),
    model_case("model-config-latin1", model(text(f"{MODEL}/config.json", '{"name": "é"}', "latin-1")), "JSON|decode", (f"{MODEL}/config.json",)),
    model_case("model-config-list", model(text(f"{MODEL}/config.json", "[]")), "model config", (f"{MODEL}/config.json",)),
    model_case("model-config-wrong-format", model(edit_config(lambda c: c.__setitem__("format", "keras"))), "model config", (f"{MODEL}/config.json",)),
    model_case("model-bad-checksum", model(raw(f"{MODEL}/weights.pt", b"0" * 64)), "checksum", ("weights.pt",)),
    model_case("model-truncated-weights", model(lambda t: (t / MODEL / "weights.pt").write_bytes((t / MODEL / "weights.pt").read_bytes()[:100]), edit_config(_drop_sha)), "cannot be read", ("weights.pt",)),
    model_case("model-text-weights", model(text(f"{MODEL}/weights.pt", "hello"), edit_config(_drop_sha)), "cannot be read", ("weights.pt",)),
    model_case("model-malicious-pickle", model(evil_pickle(f"{MODEL}/weights.pt"), edit_config(lambda c: None, resign=True)), "cannot be read|weights", ("weights.pt",), absent=("pwned",)),
    model_case("model-absurd-widths", model(edit_config(_set_widths([10**9, 10**9]))), "widths|network", (f"{MODEL}/config.json",)),
    model_case("model-zero-widths", model(edit_config(_set_widths([0, 8]))), "network config", (f"{MODEL}/config.json",)),
    model_case("model-string-widths", model(edit_config(_set_widths("wide"))), "network config", (f"{MODEL}/config.json",)),
    model_case("model-unknown-net-key", model(edit_config(lambda c: c["net"].__setitem__("heads", 7))), "network config", (f"{MODEL}/config.json",)),
    model_case("model-no-net", model(edit_config(lambda c: c.pop("net"))), "network config|model config", (f"{MODEL}/config.json",)),
    model_case("model-wrong-architecture", model(edit_config(_set_widths([8, 16]))), "do not fit", ("weights.pt",)),
    model_case("model-postprocess-bad-json", model(text(f"{MODEL}/postprocess.json", "{")), "JSON", ("postprocess.json",)),
    model_case("model-postprocess-bad-values", model(text(f"{MODEL}/postprocess.json", '{"he": {"fg_threshold": 9}}')), "post-processing", ("postprocess.json",)),
    model_case("model-postprocess-list", model(text(f"{MODEL}/postprocess.json", "[1, 2]")), "post-processing", ("postprocess.json",)),
    model_case("model-metrics-bad-json", model(text(f"{MODEL}/metrics.json", "{")), "JSON", ("metrics.json",)),
]


# ----------------------------------------------------------------------------- training


def tr(*data: str, out: str = "run", extra: Sequence[str] = ()) -> list[str]:
    return [
        "train",
        *(P(d) if not d.startswith("@") else d for d in data),
        "--out",
        P(out),
        "--epochs",
        "1",
        "--steps-per-epoch",
        "1",
        "--batch-size",
        "1",
        "--widths",
        "4",
        "8",
        "--device",
        "cpu",
        *extra,
    ]


DS = dataset()
RUN_MODEL = ("run/model", "run/checkpoint.pt")


def train_case(id: str, argv, setup, match: str, names, absent=RUN_MODEL, usage=False) -> Case:
    return Case(id, argv, setup, 2, match, names, absent, usage=usage)


INDEX_HEADER = "id,pixel_size,modality,split\n"

TRAIN_CASES = [
    train_case("train-folder-missing", tr("nope"), None, "images/", ("nope",)),
    train_case("train-folder-empty", tr("ds"), folder("ds"), "images/", ("ds",)),
    train_case("train-no-pairs", tr("ds"), S(folder("ds/images"), folder("ds/labels")), "no usable", ("ds",)),
    train_case("train-unpaired", tr("ds"), S(DS, remove("ds/labels/s1.tif")), "without labels", ("ds",)),
    train_case("train-folder-is-file", tr("ds"), raw("ds", b"x"), "images/|folder", ("ds",)),
    train_case("train-index-latin1", tr("ds"), dataset(index=INDEX_HEADER + "s0,0.5,he,train\ns1,0.5,café,train\n", index_encoding="latin-1"), "UTF-8|utf-8|decode|encoding", ("index.csv",)),
    train_case("train-index-duplicate-ids", tr("ds"), dataset(index=INDEX_HEADER + "s0,0.5,,train\ns0,0.25,,train\n"), "duplicate|twice", ("index.csv", "s0")),
    train_case("train-index-no-id", tr("ds"), dataset(index="name,pixel_size\ns0,0.5\n"), "'id' column", ("index.csv",)),
    train_case("train-index-bad-pixel-size", tr("ds"), dataset(index=INDEX_HEADER + "s0,abc,,train\n"), "pixel_size", ("index.csv", "s0")),
    train_case("train-index-negative-pixel-size", tr("ds"), dataset(index=INDEX_HEADER + "s0,-1,,train\n"), "pixel_size", ("index.csv", "s0")),
    train_case("train-index-only-test-split", tr("ds"), dataset(index=INDEX_HEADER + "s0,,,MoNuSeg2018-test\ns1,,,MoNuSeg2018-test\n"), "no usable", ("ds",)),
    train_case("train-all-empty-labels", tr("ds"), dataset(labels=lambda i: np.zeros((64, 64), np.int32)), "empty|no nuclei|no labelled", ("ds",)),
    train_case("train-shape-mismatch", tr("ds"), S(DS, tif("ds/labels/s1.tif", disk_labels(48))), "differ", ("s1.tif",)),
    train_case("train-labels-3d", tr("ds"), S(DS, tif("ds/labels/s1.tif", np.stack([LAB, LAB]))), "2-D", ("s1.tif",)),
    train_case("train-labels-junk", tr("ds"), S(DS, raw("ds/labels/s1.tif", b"junk")), UNREADABLE, ("s1.tif",)),
    train_case("train-image-nan", tr("ds"), S(DS, tif("ds/images/s1.tif", np.full((64, 64), np.nan, np.float32))), "NaN", ("s1.tif",)),
    train_case("train-at-nan", tr("ds@nan"), DS, PX, ("ds@nan",)),
    train_case("train-at-inf", tr("ds@inf"), DS, PX, ("ds@inf",)),
    train_case("train-at-tiny", tr("ds@1e-9"), DS, PX, ("ds@1e-9",)),
    train_case("train-at-negative", tr("ds@-1"), DS, PX, ("ds@-1",)),
    train_case("train-at-text", tr("ds@abc"), DS, PX, ("ds@abc",)),
    train_case("train-at-empty", tr("ds@"), DS, PX, ("ds@",)),
    train_case("train-epochs-zero", tr("ds", extra=("--epochs", "0")), DS, "epochs", ("epochs",)),
    train_case("train-batch-zero", tr("ds", extra=("--batch-size", "0")), DS, "batch_size", ("batch_size",)),
    train_case("train-lr-negative", tr("ds", extra=("--lr", "-1")), DS, "lr", ("lr",)),
    train_case("train-lr-nan", tr("ds", extra=("--lr", "nan")), DS, "lr", ("lr",)),
    train_case("train-he-fraction", tr("ds", extra=("--he-fraction", "1.5")), DS, "he_fraction", ("he_fraction",)),
    train_case("train-one-width", ["train", P("ds"), "--out", P("run"), "--widths", "8"], DS, "network config", ("widths",)),
    train_case("train-zero-width", ["train", P("ds"), "--out", P("run"), "--widths", "0", "8"], DS, "network config", ("widths",)),
    train_case("train-absurd-widths", ["train", P("ds"), "--out", P("run"), "--widths", str(10**9), str(10**9)], DS, "widths|network", ("widths",)),
    train_case("train-blocks-mismatch", tr("ds", extra=("--blocks", "1", "1", "1")), DS, "network config", ("blocks",)),
    train_case("train-epochs-text", tr("ds", extra=("--epochs", "many")), DS, "invalid int", ("--epochs",), usage=True),
    train_case("train-out-is-file", tr("ds"), S(DS, raw("run", b"x")), "not a folder", ("run",), absent=()),
    train_case("train-out-foreign-folder", tr("ds"), S(DS, raw("run/thesis.docx", b"x")), "not empty", ("run",)),
    train_case("train-init-missing", tr("ds", extra=("--init", P("nomodel"))), DS, "not found", ("nomodel",)),
    train_case("train-checkpoint-corrupt", tr("ds"), S(DS, raw("run/checkpoint.pt", b"garbage")), "checkpoint", ("checkpoint.pt",), absent=("run/model",)),
    train_case("train-checkpoint-malicious", tr("ds"), S(DS, evil_pickle("run/checkpoint.pt")), "checkpoint", ("checkpoint.pt",), absent=("run/model", "run/pwned")),
    train_case("train-checkpoint-foreign-dict", tr("ds"), S(DS, lambda t: __import__("torch").save({"a": 1}, _target(t, "run/checkpoint.pt"))), "checkpoint", ("checkpoint.pt",), absent=("run/model",)),
]


# ------------------------------------------------------------------------------- export


def export_call(image=None, labels=None, **kw) -> Callable[[Path], object]:
    def call(t: Path):
        from napari_medinst.export import export_sample

        i = blobs(64) if image is None else image
        lab = LAB if labels is None else labels
        args = {"name": "s1", **kw}
        return export_sample(t / "set", i, lab, **args)

    return call


def gt_call(**kw) -> Callable[[Path], object]:
    def call(t: Path):
        from napari_medinst.finetune import export_ground_truth

        return export_ground_truth(t / "set", blobs(64), LAB, name="s1", **kw)

    return call


EXISTING_SET = export_call(name="old")  # a training set with one sample already in it


def existing(*edits: Setup) -> Setup:
    def run(t: Path) -> None:
        EXISTING_SET(t)
        for edit in edits:
            edit(t)

    return run


SET_NEW = ("set/images/s1.tif", "set/labels/s1.tif", "set/targets/s1.tif")

EXPORT_CASES = [
    Case("export-ok", export_call(), None, None, present=(*SET_NEW, "set/index.csv", "set/manifest.json")),
    Case("export-appends-new-id", export_call(name="old"), existing(), None, present=("set/images/old-2.tif",)),
    Case("export-corrupt-manifest", export_call(), existing(text("set/manifest.json", "{broken")), InputError, "JSON", ("manifest.json",), SET_NEW),
    Case("export-manifest-not-object", export_call(), existing(text("set/manifest.json", "[1, 2]")), InputError, "manifest", ("manifest.json",), SET_NEW),
    Case("export-manifest-no-samples", export_call(), existing(text("set/manifest.json", '{"samples": 3}')), InputError, "manifest", ("manifest.json",), SET_NEW),
    Case("export-manifest-latin1", export_call(), existing(text("set/manifest.json", '{"samples": [], "n": "é"}', "latin-1")), InputError, "UTF-8|utf-8|decode|JSON", ("manifest.json",), SET_NEW),
    Case("export-index-latin1", export_call(), existing(text("set/index.csv", "id,organ\nold,foie gras é\n", "latin-1")), InputError, "UTF-8|utf-8|decode|encoding", ("index.csv",), SET_NEW),
    Case("export-index-is-folder", export_call(), existing(remove("set/index.csv"), folder("set/index.csv")), InputError, "index.csv|folder", ("index.csv",), SET_NEW),
    Case("export-shape-mismatch", export_call(labels=disk_labels(48)), None, InputError, "different shapes", (), ("set",)),
    Case("export-empty-labels", export_call(labels=np.zeros((64, 64), np.int32)), None, InputError, "empty", (), ("set",)),
    Case("export-negative-labels", export_call(labels=-LAB), None, InputError, "negative", (), ("set",)),
    Case("export-fractional-labels", export_call(labels=LAB * 0.5), None, InputError, "integers", (), ("set",)),
    Case("export-3d-labels", export_call(labels=np.stack([LAB, LAB])), None, InputError, "2-D", (), ("set",)),
    Case("export-nan-image", export_call(image=np.full((64, 64), np.nan, np.float32)), None, InputError, "NaN", (), ("set",)),
    Case("export-2-channel-image", export_call(image=np.zeros((64, 64, 2), np.uint8)), None, InputError, "2-channel", (), ("set",)),
    Case("export-no-verified", export_call(verified_ids=[]), None, InputError, "verified", (), ("set",)),
    Case("export-folder-is-file", export_call(), raw("set", b"x"), InputError, "set", ("set",)),
    Case("gt-export-unknown-modality", gt_call(modality="xray"), None, InputError, "modality", (), ("set",)),
    Case("gt-export-verified-without-status", gt_call(verified_only=True), None, InputError, "review status", (), ("set",)),
    Case("gt-export-nothing-verified", gt_call(verified_only=True, status={1: "predicted"}), None, InputError, "verified", (), ("set",)),
    Case("gt-export-ok", gt_call(verified_only=True, status={1: "verified"}), None, None, present=SET_NEW),
]


def status_call(content: str) -> Callable[[Path], object]:
    def call(t: Path):
        from napari_medinst.editing import status_from_csv

        return status_from_csv(content, name="status.csv")

    return call


def gt_files(status_csv: str | bytes | None = None) -> Setup:
    """``gt.tif`` saved with its statuses, then (optionally) ``gt_status.csv`` replaced."""

    def run(t: Path) -> None:
        from napari_medinst.recovery import write_ground_truth

        write_ground_truth(t / "gt.tif", LAB, {1: "verified", 2: "predicted"}, t / "gt_status.csv")
        if status_csv is not None:
            data = status_csv if isinstance(status_csv, bytes) else status_csv.encode()
            (t / "gt_status.csv").write_bytes(data)

    return run


def read_gt(expect_status: dict | None = None, warn: str | None = None):
    def call(t: Path):
        from napari_medinst.recovery import read_ground_truth

        labels, status, warning = read_ground_truth(t / "gt.tif", t / "gt_status.csv")
        assert np.array_equal(labels, LAB)
        if expect_status is not None:
            assert status == expect_status
        assert (warning is None) if warn is None else re.search(warn, warning)

    return call


def write_gt(labels: np.ndarray, target: str = "gt.tif"):
    def call(t: Path):
        from napari_medinst.recovery import write_ground_truth

        write_ground_truth(t / target, labels, {1: "verified"}, t / "gt_status.csv")

    return call


def crash_between_gt_writes(t: Path) -> None:
    """Save, then save new statuses but 'crash' before the CSV rename (old CSV stays)."""
    from napari_medinst.recovery import write_ground_truth

    gt_files()(t)
    old_csv = (t / "gt_status.csv").read_bytes()
    write_ground_truth(t / "gt.tif", LAB, {1: "edited", 3: "verified"}, t / "gt_status.csv")
    (t / "gt_status.csv").write_bytes(old_csv.replace(b"predicted", b"verified"))
    labels = LAB.copy()
    labels[0, 0] = 9  # the TIFF now holds other labels than the old CSV names
    write_ground_truth(t / "gt.tif", labels, {1: "edited"}, t / "unused.csv")
    (t / "unused.csv").unlink()


def record_call(name: str):
    def call(t: Path):
        from napari_medinst.recovery import read_record

        return read_record(t / name)

    return call


def list_records_call(t: Path):
    from napari_medinst.recovery import list_records

    assert list_records(t) == []


GT_CASES = [
    Case("gt-save-read-roundtrip", read_gt({1: "verified", 2: "predicted"}), gt_files(), None),
    Case("gt-read-missing-tiff", read_gt(), None, InputError, "not found", ("gt.tif",)),
    Case("gt-read-junk-tiff", read_gt(), raw("gt.tif", b"junk"), InputError, UNREADABLE, ("gt.tif",)),
    Case("gt-read-csv-latin1", read_gt(), gt_files("label,status\n1,vérifié\n".encode("latin-1")), InputError, "UTF-8|utf-8|decode", ("gt_status.csv",)),
    Case("gt-read-csv-bad-status", read_gt(), gt_files("label,status\n1,maybe\n"), InputError, "unknown status", ("gt_status.csv",)),
    Case("gt-read-csv-mixed-hashes", read_gt(), gt_files("label,status,labels_sha256\n1,verified,aa\n2,verified,bb\n"), InputError, "differ", ("gt_status.csv",)),
    Case("gt-read-csv-other-labels", read_gt({1: "verified", 2: "predicted"}, "ignored"), gt_files("label,status,labels_sha256\n1,edited,beef\n"), None),
    Case("gt-read-csv-old-format-ignored", read_gt({1: "verified", 2: "predicted"}, "older"), gt_files("label,status\n1,edited\n"), None),
    Case("gt-crash-between-writes", lambda t: None, crash_between_gt_writes, None),
    Case("gt-write-negative-labels", write_gt(-LAB), None, InputError, "negative", ("gt.tif",), ("gt.tif", "gt_status.csv")),
    Case("gt-write-float-labels", write_gt(LAB * 0.5), None, InputError, "integers", ("gt.tif",), ("gt.tif", "gt_status.csv")),
    Case("gt-write-3d-labels", write_gt(np.stack([LAB, LAB])), None, InputError, "2-D", ("gt.tif",), ("gt.tif", "gt_status.csv")),
    Case("gt-record-plain-tiff", record_call("plain.tif"), tif("plain.tif", LAB), InputError, "autosave", ("plain.tif",)),
    Case("gt-record-junk", record_call("junk.tif"), raw("junk.tif", b"junk"), InputError, "", ("junk.tif",)),
    Case("gt-record-missing", record_call("gone.tif"), None, InputError, "", ("gone.tif",)),
    Case("gt-list-records-skips-junk", list_records_call, S(raw("junk.tif", b"junk"), tif("plain.tif", LAB)), None),
]

STATUS_CASES = [
    Case("gt-status-not-csv", status_call("\x00\x01"), None, InputError, "", ("status.csv",)),
    Case("gt-status-bad-id", status_call("label,status\nx,verified\n"), None, InputError, "", ("status.csv",)),
    Case("gt-status-unknown", status_call("label,status\n1,maybe\n"), None, InputError, "unknown status", ("status.csv",)),
    Case("gt-status-negative", status_call("label,status\n-3,verified\n"), None, InputError, "positive", ("status.csv",)),
    Case("gt-status-ok", status_call("label,status\n1,verified\n"), None, None),
]


# ------------------------------------------------------------------------------ faults

_CHILD_FSIZE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, as a full disk gives ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from napari_medinst.cli import main
sys.exit(main({argv!r}))
"""

_CHILD_KILL = """
import os, signal, sys
import tifffile
real = tifffile.imwrite
def dying_write(path, *args, **kwargs):
    real(path, *args, **kwargs)
    with open(path, "r+b") as fh:  # half the file is on disk when the power goes
        fh.truncate(os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
tifffile.imwrite = dying_write
from napari_medinst.cli import main
sys.exit(main({argv!r}))
"""


@dataclass(frozen=True)
class Fault:
    id: str
    child: str  # script template: {argv}, {limit}
    argv: Sequence[str]
    setup: Setup
    limit: int = 0


HE_TILE = lambda t: _target(t, "tile.tif").write_bytes(  # noqa: E731
    (Path(__import__("napari_medinst.samples").samples.DATA) / "he_tile.tif").read_bytes()
)
TILE_OUT = ("out/tile_instances.tif", "out/tile_instances.csv")
OLD = S(_exists("out/tile_instances.tif", b"previous result"), _exists("out/tile_instances.csv", b"label,score\n"))
FSIZE_ARGV = seg("tile.tif", extra=("--pixel-size", "0.25"))

FAULT_CASES = [
    Fault("fsize-new-outputs", _CHILD_FSIZE, FSIZE_ARGV, HE_TILE, 4096),
    Fault("fsize-overwrite-keeps-old", _CHILD_FSIZE, [*FSIZE_ARGV, "--overwrite"], S(HE_TILE, OLD), 4096),
    Fault("fsize-save-maps", _CHILD_FSIZE, [*FSIZE_ARGV, "--save-maps"], HE_TILE, 300_000),
    Fault("sigkill-new-outputs", _CHILD_KILL, FSIZE_ARGV, HE_TILE),
    Fault("sigkill-overwrite-keeps-old", _CHILD_KILL, [*FSIZE_ARGV, "--overwrite"], S(HE_TILE, OLD)),
]

# fmt: on

CASES = [
    *IMAGE_CASES,
    *ARG_CASES,
    *PARAM_CASES,
    *OUTPUT_CASES,
    *EVAL_CASES,
    *MODEL_CASES,
    *TRAIN_CASES,
    *EXPORT_CASES,
    *STATUS_CASES,
    *GT_CASES,
]


# ----------------------------------------------------------------------------- runner


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "user-models" not in p.parts
    }


def _fill(argv: Sequence[str], t: Path) -> list[str]:
    return [a.replace("{t}", str(t)) for a in argv]


def _check_error_line(case: Case, err: str) -> None:
    lines = err.strip().splitlines()
    if case.usage:
        assert lines and lines[0].startswith("usage:"), err
        lines = [ln for ln in lines if not ln.startswith(("usage:", " "))]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert re.search(case.match, line), f"{case.match!r} not in {line!r}"
    for name in case.names:
        assert name in line, f"{name!r} not named in {line!r}"


def _run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse
        return int(exc.code or 0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_case(case: Case, tmp_path: Path, capsys, caplog) -> None:
    t = tmp_path / "w"
    t.mkdir()
    if case.setup is not None:
        case.setup(t)
    before = _files(t)
    caplog.set_level(logging.WARNING)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if callable(case.argv):
            outcome = _run_api(case, t)
            out, err = capsys.readouterr()
        else:
            outcome = _run_cli(_fill(case.argv, t))
            out, err = capsys.readouterr()
            assert "Traceback" not in err, err
            assert outcome == case.rc, f"exit {outcome}, expected {case.rc}; stderr:\n{err}"
    if outcome != 0 and not callable(case.argv):
        _check_error_line(case, err)
    noise = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not noise, f"warnings/log lines a user would also see on stderr: {noise}"
    if outcome not in (0, None):  # an error changed nothing
        assert _files(t) == before, "files were created or changed by a refused request"
    elif case.match and not callable(case.argv):
        assert re.search(case.match, out), f"{case.match!r} not in stdout:\n{out}"
    left = [str(p.relative_to(t)) for p in t.rglob("*.part")]
    assert set(left) <= set(case.present), f"a .part file was left behind: {left}"
    for name in case.absent:
        assert not (t / name).exists(), f"{name} exists"
    for name in case.present:
        assert (t / name).exists(), f"{name} missing"


def _run_api(case: Case, t: Path):
    """Call the row's API function; returns None on success, 2 on the expected error."""
    if case.rc is None:
        case.argv(t)
        return None
    with pytest.raises(case.rc) as info:
        case.argv(t)
    message = str(info.value)
    assert "\n" not in message.strip(), message
    assert re.search(case.match, message), f"{case.match!r} not in {message!r}"
    for name in case.names:
        assert name in message, f"{name!r} not named in {message!r}"
    return 2


def _child(fault: Fault, t: Path) -> subprocess.CompletedProcess:
    script = fault.child.format(argv=_fill(fault.argv, t), limit=fault.limit)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=t,
    )


@pytest.mark.parametrize("fault", FAULT_CASES, ids=lambda f: f.id)
def test_fault(fault: Fault, tmp_path: Path, capsys) -> None:
    t = tmp_path / "w"
    t.mkdir()
    fault.setup(t)
    before = _files(t)
    proc = _child(fault, t)
    assert "Traceback" not in proc.stderr, proc.stderr
    if fault.child is _CHILD_KILL:
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    else:
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert re.search(r"(?i)too large|no space|disk|cannot write|could not write", lines[0])
        assert "tile_" in lines[0] or "out" in lines[0], lines[0]
        assert not list(t.rglob("*.part")), "a .part file was left behind"
    # the previous outputs (or none) survive byte for byte
    assert {k: v for k, v in _files(t).items() if not k.endswith(".part")} == before
    # the next run succeeds and leaves no .part behind
    argv = _fill(fault.argv, t)
    if "--overwrite" not in argv and any((t / name).exists() for name in TILE_OUT):
        argv.append("--overwrite")
    assert main([a for a in argv if a != "--save-maps"]) == 0
    capsys.readouterr()
    assert not list(t.rglob("*.part")), "the next run did not clean the .part files"
    for name in TILE_OUT:
        assert (t / name).read_bytes() != before.get(name)


def test_matrix_size() -> None:
    """The catalogue keeps at least the 161 kinds of case of the original report."""
    ids = [c.id for c in CASES] + [f.id for f in FAULT_CASES]
    assert len(ids) == len(set(ids)), "duplicate row ids"
    assert len(ids) >= 161
