import numpy as np
import pytest
from skimage.segmentation import watershed

from napari_medinst import _flood


def _problem(rng, shape, n_seeds, mask_fraction=0.8):
    energy = rng.random(shape).astype(np.float32)
    mask = rng.random(shape) < mask_fraction
    seeds = np.zeros(shape, np.int32)
    n_seeds = min(n_seeds, energy.size)
    seeds.flat[rng.choice(energy.size, n_seeds, replace=False)] = rng.integers(1, 50, n_seeds)
    return energy, seeds, mask


def test_the_compiled_kernel_is_used_with_the_installed_scikit_image():
    # if this fails after a scikit-image upgrade, flood() still gives right results
    # through the public function, only slower: update _flood_kernel to the new kernel
    assert _flood._kernel() is not None


@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 17), (17, 1), (2, 2), (40, 33), (128, 300), (301, 77)]
)
def test_flood_equals_skimage_watershed(shape):
    rng = np.random.default_rng(sum(shape))
    for n_seeds in (0, 1, 5, 60):
        energy, seeds, mask = _problem(rng, shape, n_seeds)
        got = _flood.flood(energy, seeds, mask).copy()
        np.testing.assert_array_equal(got, watershed(energy, seeds, mask=mask))


def test_buffers_reused_across_shapes_leave_no_stale_values():
    rng = np.random.default_rng(3)
    for shape in [(200, 200), (50, 120), (120, 50), (7, 300), (200, 200), (3, 3)]:
        energy, seeds, mask = _problem(rng, shape, 20, mask_fraction=0.6)
        got = _flood.flood(energy, seeds, mask).copy()
        np.testing.assert_array_equal(got, watershed(energy, seeds, mask=mask))
        assert not got[~mask].any()


def test_large_boxes_use_fresh_buffers(monkeypatch):
    monkeypatch.setattr(_flood, "SCRATCH_MAX_PIXELS", 0)
    rng = np.random.default_rng(4)
    energy, seeds, mask = _problem(rng, (64, 64), 10)
    got = _flood.flood(energy, seeds, mask)
    np.testing.assert_array_equal(got, watershed(energy, seeds, mask=mask))


def test_a_kernel_that_disagrees_or_fails_is_not_used():
    def wrong(image, at, nb, mask, strides, compactness, out, lines):
        out[:] = 0

    def other_signature(image, at):
        raise AssertionError("not reached")

    assert not _flood._agrees(wrong)
    assert not _flood._agrees(other_signature)


def test_without_the_kernel_the_public_function_is_used(monkeypatch):
    monkeypatch.setattr(_flood, "_kernel", lambda: None)
    rng = np.random.default_rng(5)
    energy, seeds, mask = _problem(rng, (30, 40), 8)
    np.testing.assert_array_equal(
        _flood.flood(energy, seeds, mask), watershed(energy, seeds, mask=mask)
    )


def test_mismatched_shapes_are_reported():
    with pytest.raises(ValueError, match="shapes differ"):
        _flood.flood(np.zeros((4, 4)), np.zeros((4, 5), np.int32), np.ones((4, 4), bool))
