import numpy as np
import pytest

from napari_medinst._io import InputError
from napari_medinst.preprocess import detect_modality, prepare_image, to_network_input
from napari_medinst.samples import load_sample


def test_modality_of_the_samples_and_of_rgb_fluorescence():
    he, _, _ = load_sample("he")
    fl, _, _ = load_sample("fluorescence")
    assert detect_modality(he) == "he"
    assert detect_modality(fl) == "fluorescence"
    blue = np.zeros((*fl.shape, 3), np.uint8)
    blue[..., 2] = fl  # a DAPI channel saved as RGB
    assert detect_modality(blue) == "fluorescence"
    assert detect_modality(np.repeat(fl[..., None], 3, axis=2)) == "fluorescence"


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_network_input_range_for_any_dtype(dtype):
    fl, _, _ = load_sample("fluorescence")
    img = fl.astype(dtype) * (257 if dtype == np.uint16 else 1)
    x = to_network_input(img, "fluorescence")
    assert x.shape == (3, *fl.shape) and x.dtype == np.float32
    assert np.percentile(x, 99) <= 1.01 and np.percentile(x, 1) >= -0.01
    he, _, _ = load_sample("he")
    y = to_network_input(he.astype(dtype) * (257 if dtype == np.uint16 else 1), "he")
    assert y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((3, 64, 64), "channel-first"),
        ((64, 64, 2), "2-channel"),
        ((4, 4), "too small"),
        ((2, 64, 64, 3), "expected a 2-D"),
    ],
)
def test_bad_shapes_are_named(shape, match):
    with pytest.raises(InputError, match=match):
        prepare_image(np.zeros(shape, np.uint8))


def test_nan_and_rgba():
    with pytest.raises(InputError, match="NaN"):
        prepare_image(np.full((16, 16), np.nan, np.float32))
    assert prepare_image(np.zeros((16, 16, 4), np.uint8)).shape == (16, 16, 3)
