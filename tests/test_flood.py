import numpy as np
import pytest
from skimage.segmentation import watershed

from napari_medinst import _flood


def _problem(rng, shape, n_seeds, mask_fraction=0.8, levels=None):
    energy = rng.random(shape).astype(np.float32)
    if levels:  # plateaus: the order among equal energies must match too
        energy = np.floor(energy * levels)
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
        for levels in (None, 3):
            energy, seeds, mask = _problem(rng, shape, n_seeds, levels=levels)
            got = _flood.flood(energy, seeds, mask).copy()
            np.testing.assert_array_equal(got, watershed(energy, seeds, mask=mask))


def test_views_masks_of_other_dtypes_and_wide_labels():
    rng = np.random.default_rng(9)
    energy, seeds, mask = _problem(rng, (90, 70), 15)
    box = (slice(5, 80), slice(3, 61))  # a strided view, as post-processing passes
    want = watershed(energy[box], seeds[box], mask=mask[box])
    np.testing.assert_array_equal(_flood.flood(energy[box], seeds[box], mask[box]), want)
    as_uint8 = mask[box].astype(np.uint8)
    np.testing.assert_array_equal(_flood.flood(energy[box], seeds[box], as_uint8), want)
    wide = seeds[box].astype(np.int64) * 2**33  # not int32: the public function does it
    got = _flood.flood(energy[box], wide, mask[box])
    np.testing.assert_array_equal(got, watershed(energy[box], wide, mask=mask[box]))


def test_threads_each_get_their_own_buffers():
    from concurrent.futures import ThreadPoolExecutor

    problems = [_problem(np.random.default_rng(k), (150, 170), 30) for k in range(8)]

    def run(p):
        return _flood.flood(*p).copy()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, problems * 3))
    for p, got in zip(problems * 3, results, strict=True):
        np.testing.assert_array_equal(got, watershed(p[0], p[1], mask=p[2]))


def test_buffers_reused_across_shapes_leave_no_stale_values():
    rng = np.random.default_rng(3)
    for shape in [(200, 200), (50, 120), (120, 50), (7, 300), (200, 200), (3, 3)]:
        energy, seeds, mask = _problem(rng, shape, 20, mask_fraction=0.6)
        got = _flood.flood(energy, seeds, mask).copy()
        np.testing.assert_array_equal(got, watershed(energy, seeds, mask=mask))
        assert not got[~mask].any()


def test_small_boxes_reuse_buffers_and_large_ones_get_fresh_ones(monkeypatch):
    rng = np.random.default_rng(4)
    energy, seeds, mask = _problem(rng, (64, 64), 10)
    first = _flood.flood(energy, seeds, mask)
    assert np.shares_memory(first, _flood.flood(energy, seeds, mask))
    monkeypatch.setattr(_flood, "SCRATCH_MAX_PIXELS", 0)
    first = _flood.flood(energy, seeds, mask)
    second = _flood.flood(energy, seeds, mask)
    assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(second, watershed(energy, seeds, mask=mask))


def test_a_kernel_that_disagrees_or_fails_is_not_used():
    def wrong(image, at, nb, mask, strides, compactness, out, lines):
        out[:] = 0

    def breadth_first(image, at, nb, mask, strides, compactness, out, lines):
        # floods in seed order, ignoring the energy
        queue = list(at)
        while queue:
            i = queue.pop(0)
            for d in nb:
                if mask[i + d] and not out[i + d]:
                    out[i + d] = out[i]
                    queue.append(i + d)

    def other_signature(image, at):
        raise AssertionError("not reached")

    assert not _flood._agrees(wrong)
    assert not _flood._agrees(breadth_first)
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
