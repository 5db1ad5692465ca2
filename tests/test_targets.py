import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import disk_labels
from napari_medinst._io import InputError
from napari_medinst.targets import (
    contour_map,
    hv_energy,
    hv_gradient_magnitude,
    hv_gradients,
    hv_maps,
    make_targets,
    relabel_sequential,
    type_map,
)


def test_hv_of_a_rectangle_is_a_linear_ramp():
    lab = np.zeros((20, 30), np.uint16)
    lab[5:10, 4:15] = 7  # 5 rows x 11 cols, centre (7, 9)
    hv = hv_maps(lab)
    np.testing.assert_allclose(hv[0, 7, 4:15], np.linspace(-1, 1, 11), atol=1e-6)
    np.testing.assert_allclose(hv[1, 5:10, 9], np.linspace(-1, 1, 5), atol=1e-6)
    assert np.all(hv[:, lab == 0] == 0)


def test_hv_is_per_nucleus_and_id_independent():
    lab = disk_labels()
    relab = np.where(lab > 0, lab * 1000 + 5, 0).astype(np.uint64)
    np.testing.assert_array_equal(hv_maps(lab), hv_maps(relab))
    alone = np.where(lab == 2, 2, 0)
    np.testing.assert_allclose(hv_maps(lab)[:, lab == 2], hv_maps(alone)[:, lab == 2])


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(5, 60), st.integers(5, 60), st.integers(2, 9)), min_size=1, max_size=6
    )
)
def test_hv_range_and_sign(disks):
    lab = disk_labels((64, 64), [(r, c) for r, c, _ in disks], radius=4)
    hv = hv_maps(lab)
    assert hv.min() >= -1 and hv.max() <= 1
    for i in np.unique(lab)[1:]:
        rr, cc = np.nonzero(lab == i)
        h = hv[0, rr, cc]
        # H rises with the column inside each nucleus
        assert np.corrcoef(cc, h)[0, 1] > 0.9 if np.ptp(cc) > 1 and np.ptp(h) > 0 else True


def test_contour_width_and_touching_nuclei():
    lab = np.zeros((10, 12), np.int32)
    lab[2:8, 1:6] = 1
    lab[2:8, 6:11] = 2
    c1 = contour_map(lab, 1)
    assert c1[4, 5] == 1 and c1[4, 6] == 1  # the shared border belongs to both
    assert c1[4, 3] == 0
    c2 = contour_map(lab, 2)
    assert c2[4, 4] == 1 and c2.sum() > c1.sum()
    with pytest.raises(ValueError, match="width"):
        contour_map(lab, 0)


def test_type_map_and_relabel():
    lab = np.array([[0, 5, 5], [9, 9, 0]], np.uint32)
    np.testing.assert_array_equal(type_map(lab, {5: 2, 9: 1}), [[0, 2, 2], [1, 1, 0]])
    seq, old = relabel_sequential(lab)
    np.testing.assert_array_equal(seq, [[0, 1, 1], [2, 2, 0]])
    np.testing.assert_array_equal(old, [5, 9])


def test_energy_is_high_between_touching_nuclei_and_low_inside():
    lab = np.zeros((40, 60), np.int32)
    lab[10:30, 5:30] = 1
    lab[10:30, 30:55] = 2
    e = hv_energy(hv_maps(lab), 5)
    assert e[20, 29:31].min() > 0.5
    assert e[20, 15] < 0.05 and e[20, 42] < 0.05


def test_gradient_magnitude_is_brightest_where_nuclei_touch():
    lab = np.zeros((40, 60), np.int32)
    lab[10:30, 5:30] = 1
    lab[10:30, 30:55] = 2
    hv = hv_maps(lab)
    g = hv_gradient_magnitude(hv, 5)
    gh, gv = hv_gradients(hv, 5)
    np.testing.assert_allclose(g, np.hypot(gh, gv), rtol=1e-6)
    touching, outer_edge, inside = g[20, 29:31].max(), g[20, 4:6].max(), g[20, 15]
    assert touching > outer_edge > inside
    assert touching > 0.85 and inside < 0.3


def test_bad_labels_are_rejected():
    with pytest.raises(InputError, match="integers"):
        make_targets(np.full((4, 4), 0.5))
    with pytest.raises(InputError, match="negative"):
        make_targets(np.array([[-1, 0]], np.int32))
    with pytest.raises(InputError, match="2-D"):
        make_targets(np.zeros((2, 3, 3), np.int32))


@pytest.mark.parametrize("background", [True, False])
def test_relabel_sparse_huge_ids_keeps_background(background):
    lab = np.zeros((64, 64), np.int64)
    lab[:, 10:20], lab[:, 30:40] = 20000, 30000
    if not background:
        lab[lab == 0] = 5_000_000
    seq, old = relabel_sequential(lab)
    if background:
        np.testing.assert_array_equal(np.unique(seq), [0, 1, 2])
        assert seq[0, 0] == 0 and seq[0, 15] == 1 and seq[0, 35] == 2
        np.testing.assert_array_equal(old, [20000, 30000])
    else:
        np.testing.assert_array_equal(np.unique(seq), [1, 2, 3])
