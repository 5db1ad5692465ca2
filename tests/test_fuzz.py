"""Fuzzing of the two inputs a user hands over as files: images and parameter JSON.

Whatever the bytes, the array or the JSON value, the only outcomes allowed are a result,
or an :class:`~napari_medinst._io.InputError` / ``ValueError`` with a message; through
the command line exit 0, or exit 2 with exactly one line on stderr. No other exception
and no traceback ever reaches the user.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_medinst._io import InputError, read_image
from napari_medinst.cli import main
from napari_medinst.postprocess import PostprocessParams

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run (CI), new ones when code changes
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SUFFIXES = [".tif", ".tiff", ".TIF", ".png", ".jpg", ".jpeg", ".npy", ".txt", ".bmp", ""]
DTYPES = [
    np.uint8,
    np.uint16,
    np.int8,
    np.int16,
    np.int32,
    np.uint32,
    np.int64,
    np.float16,
    np.float32,
    np.float64,
    np.bool_,
]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured (argparse exits become codes)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = int(exc.code or 0)
    return rc, out.getvalue(), err.getvalue()


def assert_clean_outcome(rc: int, err: str, name: str) -> None:
    """Exit 0, or exit 2 with one line on stderr naming ``name``."""
    assert "Traceback" not in err, err
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert name in lines[0], lines[0]


def _write_array(path: Path, arr: np.ndarray, fmt: str) -> bool:
    """Write ``arr`` in ``fmt`` (tif/png/jpg) to ``path``; False if that format cannot hold it."""
    if fmt == "tif":
        try:
            tifffile.imwrite(path, arr)
        except Exception:  # tifffile cannot write it (e.g. a 1-element bool): not a reader question
            return False
        return True
    import imageio.v3 as iio

    try:
        data = iio.imwrite("<bytes>", arr, extension=f".{fmt}")
    except Exception:  # the format cannot hold this dtype/shape: not a reader question
        return False
    path.write_bytes(data)
    return True


def _check_read(path: Path) -> None:
    try:
        arr = read_image(path)
    except InputError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip(), message
        assert path.name in message, message
        return
    assert isinstance(arr, np.ndarray) and arr.size > 0


def _check_segment(path: Path, root: Path) -> None:
    out = root / "out"
    rc, _, err = run_cli(["segment", str(path), "-o", str(out), "--model", "classical"])
    assert_clean_outcome(rc, err, path.name)
    made = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    if rc == 2:
        assert made == [], made  # nothing half-written
    else:
        assert f"{path.stem}_instances.tif" in made


@FUZZ
@given(data=st.binary(max_size=600), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_never_escape(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"fuzz{suffix}"
        path.write_bytes(data)
        _check_read(path)
        _check_segment(path, Path(d))


@FUZZ
@given(data=st.binary(min_size=1, max_size=200), cut=st.floats(0.0, 1.0))
def test_damaged_tiff_never_escapes(data: bytes, cut: float) -> None:
    """A valid TIFF header followed by damage, or a valid TIFF cut short."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.arange(48 * 48, dtype=np.uint16).reshape(48, 48))
    valid = buf.getvalue()
    damaged = valid[: max(8, int(len(valid) * cut))] + data
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "damaged.tif"
        path.write_bytes(damaged)
        _check_read(path)
        _check_segment(path, Path(d))


shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=40)


@st.composite
def arrays(draw) -> np.ndarray:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes)
    if np.prod(shape) > 20_000:  # keep each example quick
        shape = shape[-2:]
    elements = None
    if np.issubdtype(dtype, np.floating):
        elements = st.floats(
            width=np.dtype(dtype).itemsize * 8, allow_nan=True, allow_infinity=True
        )
    return draw(hnp.arrays(dtype, shape, elements=elements))


@FUZZ
@given(
    arr=arrays(),
    fmt=st.sampled_from(["tif", "tif", "png", "jpg"]),
    suffix=st.sampled_from(SUFFIXES),
)
def test_random_arrays_never_escape(arr: np.ndarray, fmt: str, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"arr{suffix}"
        if not _write_array(path, arr, fmt):
            return
        _check_read(path)
        _check_segment(path, Path(d))


# ------------------------------------------------------------------------ params JSON

FIELDS = [
    "fg_threshold",
    "marker_threshold",
    "sobel_size",
    "contour_weight",
    "smoothing",
    "marker_opening",
    "min_marker_size",
    "min_nucleus_size",
    "pixel_size",
    "napari_medinst_postprocess",
]

numbers = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.sampled_from([10**400, -(10**400), 0, 1, 3, 5, 0.5, 1e308, 5e-324])
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.sampled_from(FIELDS), inner, max_size=4)
    ),
    max_leaves=12,
)
param_dicts = st.dictionaries(st.sampled_from(FIELDS), numbers | json_values, max_size=5)
params_json = (param_dicts | json_values).map(lambda v: json.dumps(v, allow_nan=True))
params_text = (
    params_json | st.text(max_size=40) | st.sampled_from(["", "{", "[" * 5000 + "]" * 5000])
)


def _check_params(text: str) -> PostprocessParams | None:
    try:
        params = PostprocessParams.from_json(text)
    except ValueError as exc:  # InputError is a ValueError
        assert str(exc).strip(), "an empty error message"
        assert "\n" not in str(exc).strip(), str(exc)
        return None
    for name, value in params.to_dict().items():
        assert math.isfinite(value), (name, value)
    assert PostprocessParams.from_json(params.to_json()) == params  # round trip
    return params


@FUZZ
@given(text=params_text)
def test_params_json_is_parsed_or_refused(text: str) -> None:
    _check_params(text)


@pytest.fixture(scope="module")
def good_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "good.tif"
    rng = np.random.default_rng(0)
    img = np.full((48, 48), 20, np.uint8)
    img[10:20, 10:20] = 200
    img[30:40, 25:38] = 200
    tifffile.imwrite(path, img + rng.integers(0, 5, img.shape, dtype=np.uint8))
    return path


@settings(FUZZ, max_examples=40)
@given(content=params_text | param_dicts.map(json.dumps))
def test_params_file_through_cli(good_image: Path, content: str) -> None:
    expected = _check_params(content)
    with tempfile.TemporaryDirectory() as d:
        params = Path(d) / "p.json"
        params.write_text(content, encoding="utf-8")
        out = Path(d) / "out"
        argv = ["segment", str(good_image), "-o", str(out), "--model", "classical"]
        rc, _, err = run_cli([*argv, "--params", str(params)])
        assert_clean_outcome(rc, err, "p.json")
        assert rc == (2 if expected is None else 0), err
        assert (out / "good_instances.tif").exists() == (rc == 0)


@settings(FUZZ, max_examples=30)
@given(data=st.binary(max_size=200))
def test_params_bytes_through_cli(good_image: Path, data: bytes) -> None:
    """Any bytes (not UTF-8, BOMs, NULs) as a parameters file: rc 0 or one line."""
    with tempfile.TemporaryDirectory() as d:
        params = Path(d) / "p.json"
        params.write_bytes(data)
        argv = ["segment", str(good_image), "-o", str(Path(d) / "out"), "--model", "classical"]
        rc, _, err = run_cli([*argv, "--params", str(params)])
        assert_clean_outcome(rc, err, "p.json")
