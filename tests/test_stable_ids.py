"""Stable instance ids across re-runs (issue 17): matched nuclei keep id, hence colour."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_medinst import stable_ids
from napari_medinst.postprocess import Postprocessor, PostprocessParams
from napari_medinst.stable_ids import carry_ids, relabel
from napari_medinst.targets import make_targets


def _reference(old: np.ndarray, new: np.ndarray) -> dict[int, int]:
    """new id -> old id for every pair with IoU > 0.5, by brute force over the masks."""
    out = {}
    for n in np.unique(new[new > 0]):
        a = new == n
        for o in np.unique(old[a & (old > 0)]):
            b = old == o
            if np.count_nonzero(a & b) / np.count_nonzero(a | b) > 0.5:
                out[int(n)] = int(o)
    return out


def _disks(centres, shape=(64, 64), radius=5) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.uint32)
    for k, (r, c) in enumerate(centres, 1):
        out[(rr - r) ** 2 + (cc - c) ** 2 <= radius**2] = k
    return out


def test_unchanged_labels_keep_every_id():
    old = _disks([(10, 10), (30, 30), (50, 12)])
    src, dst = carry_ids(old, old.copy())
    np.testing.assert_array_equal(src, [1, 2, 3])
    np.testing.assert_array_equal(dst, src)


def test_renumbered_nuclei_take_back_their_ids():
    old = _disks([(10, 10), (30, 30), (50, 12)])
    new = _disks([(50, 12), (10, 11), (30, 30)])  # same nuclei, numbered afresh, one moved
    src, dst = carry_ids(old, new)
    np.testing.assert_array_equal(relabel(new, src, dst), _disks([(10, 11), (30, 30), (50, 12)]))


def test_new_nuclei_take_ids_no_old_nucleus_had():
    old = _disks([(10, 10), (30, 30), (50, 50)])
    old[old == 1] = 0  # ids 2 and 3 on screen; 1 is free again
    new = _disks([(50, 50), (10, 50), (30, 30), (50, 10)])
    src, dst = carry_ids(old, new)
    ids = dict(zip(src.tolist(), dst.tolist(), strict=True))
    assert ids[1] == 3 and ids[3] == 2  # survivors
    assert {ids[2], ids[4]} == {1, 4}  # the smallest ids that no old nucleus uses


def test_a_split_nucleus_keeps_its_id_on_the_larger_part_only_when_iou_above_half():
    old = np.zeros((20, 40), np.uint32)
    old[5:15, 5:35] = 7
    new = np.zeros_like(old)
    new[5:15, 5:28] = 1  # 23/30 of it: IoU 0.77
    new[5:15, 28:35] = 2
    _, dst = carry_ids(old, new)
    assert dst.tolist() == [7, 1]
    new[5:15, 5:20], new[5:15, 20:35] = 1, 2  # halves: IoU 0.5, not above
    _, dst = carry_ids(old, new)
    assert 7 not in dst.tolist() and sorted(dst.tolist()) == [1, 2]


def test_fixed_ids_are_never_changed_nor_given():
    old = _disks([(10, 10), (30, 30)])
    new = _disks([(30, 30), (10, 10)])  # new 1 sits on old 2, new 2 on old 1
    src, dst = carry_ids(old, new, fixed=[2])
    ids = dict(zip(src.tolist(), dst.tolist(), strict=True))
    assert ids[2] == 2  # fixed: keeps its id although it sits on old nucleus 1
    assert ids[1] not in (1, 2)  # old 2's id is the fixed nucleus': not given away


def test_ids_match_a_brute_force_iou_on_a_real_re_run():
    """Two thresholds of the real post-processing; dense and sorted counting agree."""
    rng = np.random.default_rng(3)
    truth = np.zeros((128, 128), np.int32)
    for k in range(1, 40):
        r, c = rng.integers(6, 122, 2)
        rad = rng.integers(3, 7)
        rr, cc = np.ogrid[:128, :128]
        truth[(rr - r) ** 2 + (cc - c) ** 2 <= rad * rad] = k
    t = make_targets(truth)
    prob = ndi.gaussian_filter(t.foreground.astype(np.float32), 1.5)
    pp = Postprocessor(prob, t.hv, t.contour.astype(np.float32))
    base = PostprocessParams(fg_threshold=0.3, min_nucleus_size=10)
    first = pp.run(base).labels
    second = pp.run(replace(base, fg_threshold=0.45, min_nucleus_size=30)).labels
    src, dst = carry_ids(first, second)
    ref = _reference(first, second)
    assert len(ref) > 10 and any(n != o for n, o in ref.items())  # renumbered survivors
    for n, o in zip(src.tolist(), dst.tolist(), strict=True):
        if n in ref:
            assert o == ref[n]
        else:
            assert o not in np.unique(first)
    assert len(set(dst.tolist())) == dst.size
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stable_ids, "_DENSE_PAIRS", 0)
        np.testing.assert_array_equal(carry_ids(first, second)[1], dst)


def test_empty_labels_and_bad_input():
    empty = np.zeros((8, 8), np.uint32)
    src, dst = carry_ids(empty, empty)
    assert src.size == dst.size == 0
    src, dst = carry_ids(empty, _disks([(4, 4)], (8, 8), 2))
    assert src.tolist() == dst.tolist() == [1]
    with pytest.raises(ValueError, match="cannot be matched"):
        carry_ids(empty, np.zeros((8, 9), np.uint32))
    with pytest.raises(ValueError, match="min_iou"):
        carry_ids(empty, empty, min_iou=0.3)
