import json

import numpy as np
import pytest

from conftest import disk_labels
from napari_medinst.metrics import evaluate
from napari_medinst.postprocess import (
    Postprocessor,
    PostprocessParams,
    marker_points,
    postprocess,
)
from napari_medinst.targets import make_targets


def ideal_maps(labels):
    t = make_targets(labels)
    return t.foreground.astype(np.float32), t.hv, t.contour.astype(np.float32)


def test_touching_disks_are_separated():
    lab = disk_labels(centres=((40, 30), (40, 48), (40, 66)), shape=(80, 100))
    prob, hv, _contour = ideal_maps(lab)
    res = postprocess(prob, hv, None, pixel_size=0.5)
    assert res.labels.dtype == np.uint32
    assert res.n_instances == 3
    assert evaluate(lab, res.labels).aji > 0.95
    np.testing.assert_array_equal(np.unique(res.labels), [0, 1, 2, 3])


def test_ideal_maps_recover_real_annotations(monuseg_train_labels):
    for lab in monuseg_train_labels:
        prob, hv, contour = ideal_maps(lab)
        res = postprocess(prob, hv, contour, pixel_size=0.25)
        assert evaluate(lab, res.labels).aji >= 0.95


def test_stage_cache_only_reruns_dependent_stages():
    prob, hv, contour = ideal_maps(disk_labels())
    pp = Postprocessor(prob, hv, contour, pixel_size=0.5)
    base = PostprocessParams()
    pp.run(base)
    pp.run(PostprocessParams(min_nucleus_size=50))
    assert pp.stage_runs == {
        "foreground": 1,
        "energy": 1,
        "markers": 1,
        "watershed": 1,
        "stats": 1,
        "filter": 2,
    }
    pp.run(PostprocessParams(min_nucleus_size=50, marker_threshold=0.2))
    assert pp.stage_runs["energy"] == 1 and pp.stage_runs["markers"] == 2
    pp.run(PostprocessParams(min_nucleus_size=50, marker_threshold=0.2, fg_threshold=0.4))
    assert pp.stage_runs["energy"] == 1 and pp.stage_runs["foreground"] == 2


def test_small_instances_removed_and_scores_are_mean_probability():
    lab = disk_labels(centres=((30, 30), (70, 70)), radius=10)
    lab[5:7, 90:92] = 9  # 4-pixel speck
    prob, hv, _ = ideal_maps(lab)
    prob = prob * np.where(lab == 1, 0.9, 0.7)
    res = postprocess(
        prob, hv, params=PostprocessParams(min_nucleus_size=10, smoothing=0), pixel_size=0.5
    )
    assert res.n_instances == 2
    np.testing.assert_allclose(sorted(res.scores), [0.7, 0.9], atol=0.02)


def test_user_seeds_split_and_replace():
    lab = np.zeros((40, 80), np.int32)
    lab[10:30, 10:70] = 1  # one long nucleus
    prob, hv, _ = ideal_maps(lab)
    one = postprocess(prob, hv, pixel_size=0.5)
    assert one.n_instances == 1
    pp = Postprocessor(prob, hv, pixel_size=0.5)
    two = pp.run(seed_points=np.array([[20, 20], [20, 60]]), seed_mode="replace")
    assert two.n_instances == 2
    seeds = np.zeros_like(lab)
    seeds[20, 15], seeds[20, 40], seeds[20, 65] = 1, 2, 3
    assert pp.run(seed_labels=seeds, seed_mode="replace").n_instances == 3
    with pytest.raises(ValueError, match="seed_mode"):
        pp.run(seed_mode="bogus")


def test_crop_equals_whole_away_from_the_border(monuseg_train_labels):
    lab = monuseg_train_labels[0]
    prob, hv, contour = ideal_maps(lab)
    rng = np.random.default_rng(0)
    prob = np.clip(prob + rng.normal(0, 0.1, prob.shape).astype(np.float32), 0, 1)
    whole = postprocess(prob, hv, contour, pixel_size=0.25).labels
    r0, c0, size, margin = 200, 300, 400, 40
    sl = (slice(r0, r0 + size), slice(c0, c0 + size))
    crop = postprocess(prob[sl], hv[(slice(None), *sl)], contour[sl], pixel_size=0.25).labels
    w, c = whole[sl][margin:-margin, margin:-margin], crop[margin:-margin, margin:-margin]
    # same partition: every instance of one maps to exactly one of the other
    pairs = {(int(a), int(b)) for a, b in zip(w.ravel(), c.ravel(), strict=True)}
    assert len({a for a, _ in pairs}) == len(pairs) == len({b for _, b in pairs})


def test_params_scale_with_pixel_size_and_round_trip_json():
    p = PostprocessParams(sobel_size=5, min_nucleus_size=10, smoothing=1.0, pixel_size=0.5)
    q = p.scaled_to(0.25)
    assert q.sobel_size == 9 and q.min_nucleus_size == 40 and q.smoothing == 2.0
    assert PostprocessParams.from_json(p.to_json()) == p


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"fg_threshold": "high"}', "must be a number"),
        ('{"fg_threshold": 2}', "fg_threshold"),
        ('{"sobel_size": 4}', "odd"),
        ('{"min_nucleus_size": 1.5}', "whole number"),
        ('{"bogus": 1}', "unknown"),
    ],
)
def test_bad_params_json_is_rejected_clearly(text, match):
    with pytest.raises(ValueError, match=match):
        PostprocessParams.from_json(text)


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="HV maps"):
        Postprocessor(np.zeros((10, 10)), np.zeros((2, 10, 11)))
    assert json.loads(PostprocessParams().to_json())["napari_medinst_postprocess"] == 1


def test_scaling_to_a_fine_pixel_size_stays_valid():
    q = PostprocessParams(marker_opening=5).scaled_to(0.1)  # a 100x objective
    assert q.marker_opening == 25


def _octagon_footprint(radius: int) -> np.ndarray:
    """Sum of alternating 3x3 squares and crosses: |x|, |y| <= r and |x| + |y| <= 2 x
    (number of squares) + (number of crosses)."""
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (np.abs(x) + np.abs(y)) <= 2 * ((radius + 1) // 2) + radius // 2


@pytest.mark.parametrize("radius", [1, 2, 3, 4])
def test_marker_opening_octagon_matches_rank_filters(radius):
    from scipy import ndimage as ndi

    from napari_medinst.postprocess import _octagon

    rng = np.random.default_rng(radius)
    mask = ndi.gaussian_filter(rng.random((67, 53)), 1.5) > 0.5
    fp = _octagon_footprint(radius)
    as_u8 = mask.astype(np.uint8)
    eroded = ndi.minimum_filter(as_u8, footprint=fp, mode="nearest").astype(bool)
    dilated = ndi.maximum_filter(as_u8, footprint=fp, mode="nearest").astype(bool)
    assert np.array_equal(_octagon(mask, radius, erode=True), eroded)
    assert np.array_equal(_octagon(mask, radius, erode=False), dilated)


@pytest.mark.parametrize("seed_mode", [None, "add"])
def test_watershed_shortcuts_equal_one_plain_flood(monuseg_train_labels, seed_mode):
    """Single-marker components, marker-less components and skipped marker interiors
    give exactly what one skimage watershed over the whole foreground gives."""
    from skimage.segmentation import watershed

    lab = monuseg_train_labels[0][:400, :400]
    prob, hv, contour = ideal_maps(lab)
    rng = np.random.default_rng(1)
    noisy = np.clip(prob * 0.8 + 0.3 * rng.random(prob.shape), 0, 1).astype(np.float32)
    pp = Postprocessor(noisy, hv + 0.2 * rng.standard_normal(hv.shape), contour, pixel_size=0.25)
    seeds = {} if seed_mode is None else {"seed_points": rng.uniform(0, 400, (40, 2))}
    res = pp.run(PostprocessParams(min_nucleus_size=1, fg_threshold=0.55), **seeds)
    raw = pp._cache["watershed"][1]
    # reference: every marker-less component gets a marker of its own (numbered after the
    # markers, in component order), then one flood of everything
    comps, n = pp._cache["foreground"][1][1:]
    markers = res.markers.copy()
    has = np.zeros(n + 1, bool)
    has[comps[markers > 0]] = True
    extra = np.flatnonzero(~has[1:]) + 1
    ids = np.zeros(n + 1, np.int64)
    ids[extra] = markers.max() + np.arange(1, extra.size + 1)
    markers = np.where((markers == 0) & (comps > 0), ids[comps], markers)
    ref = watershed(res.energy, markers, mask=comps > 0)
    assert extra.size > 0 and np.unique(raw).size > 50
    # identical up to ties: a pixel two basins reach at exactly the same energy may go to
    # either (skimage's order among equal energies depends on what else is queued)
    assert (raw != ref).sum() <= 1e-3 * raw.size
    np.testing.assert_array_equal(np.unique(raw), np.unique(ref))


# ----------------------------------------------------- issue 17, bug 5: markers, user seeds


def test_a_seed_near_the_edge_never_punches_a_background_hole():
    """A user seed that would cut a sliver below the minimum area off a nucleus leaves
    the nucleus whole (before: the sliver was removed, leaving a hole in the nucleus)."""
    lab = disk_labels(shape=(60, 60), centres=((30, 30),), radius=12)
    t = make_targets(lab)
    pp = Postprocessor(t.foreground.astype(np.float32), t.hv, t.contour.astype(np.float32))
    params = PostprocessParams(min_nucleus_size=30)
    alone = pp.run(params, seed_points=np.array([[30.0, 30.0]]), seed_mode="replace")
    edge = pp.run(params, seed_points=np.array([[30.0, 30.0], [19.0, 30.0]]), seed_mode="replace")
    assert not (edge.foreground & (edge.labels == 0)).any()
    np.testing.assert_array_equal(edge.labels, alone.labels)
    assert edge.scores == pytest.approx(alone.scores)
    # a seed far enough inside still splits
    inside = pp.run(params, seed_points=np.array([[30.0, 30.0], [22.0, 30.0]]), seed_mode="replace")
    assert inside.n_instances == 2 and not (inside.foreground & (inside.labels == 0)).any()


def test_small_isolated_instances_are_still_removed():
    lab = disk_labels(centres=((30, 30),), radius=10)
    lab[80:83, 80:83] = 2  # an isolated 9-pixel speck touches nothing
    prob, hv, _ = ideal_maps(lab)
    res = postprocess(prob, hv, params=PostprocessParams(min_nucleus_size=20, smoothing=0))
    assert res.n_instances == 1 and res.labels[81, 81] == 0


def test_marker_points_lie_on_their_marker_and_skip_removed_nuclei():
    markers = np.zeros((30, 30), np.int32)
    markers[5:25, 5] = 1  # an L-shaped marker: its centre of mass is off the marker
    markers[24, 5:25] = 1
    markers[10:13, 15:18] = 2
    markers[2, 27] = 3  # its nucleus was removed
    labels = np.where(markers > 0, 1, 0)
    labels[2, 27] = 0
    pts = marker_points(markers, labels)
    assert len(pts) == 2
    rc = np.round(pts).astype(int)
    np.testing.assert_array_equal(markers[rc[:, 0], rc[:, 1]], [1, 2])
    np.testing.assert_allclose(pts[1], [11, 16])
    assert len(marker_points(markers)) == 3
    assert marker_points(np.zeros((4, 4), np.int32)).shape == (0, 2)


def test_no_marker_is_drawn_on_background_on_the_he_sample():
    """With the default model, 4 of the 94 automatic markers of the H&E sample belonged
    to nuclei removed as too small and were drawn on background."""
    from napari_medinst.samples import load_sample
    from napari_medinst.segment import compute_maps

    image, _, sample = load_sample("he")
    mr = compute_maps(image, "default", pixel_size=sample.pixel_size, modality="he")
    m = mr.maps
    res = Postprocessor(m.prob, m.hv, m.contour, m.type_prob, mr.pixel_size).run(mr.default_params)
    pts = marker_points(res.markers, res.labels)
    rc = np.round(pts).astype(int)
    assert len(pts) > 50
    assert (res.labels[rc[:, 0], rc[:, 1]] > 0).all()
    assert (res.foreground[rc[:, 0], rc[:, 1]]).all()


# ------------------------------------------------------- re-run keeping corrected nuclei


def _crowd(seed: int = 3):
    """Noisy maps of a crowd of touching disks (a real-looking, imperfect prediction)."""
    rng = np.random.default_rng(seed)
    centres = [(r, c) for r in range(18, 150, 22) for c in range(18, 190, 22)]
    centres = [(r + rng.integers(-4, 5), c + rng.integers(-4, 5)) for r, c in centres]
    lab = disk_labels(shape=(160, 200), centres=centres, radius=11)
    prob, hv, contour = ideal_maps(lab)
    prob = np.clip(prob * 0.8 + rng.normal(0, 0.15, prob.shape), 0, 1).astype(np.float32)
    hv = (hv + rng.normal(0, 0.2, hv.shape)).astype(np.float32)
    return lab, Postprocessor(prob, hv, contour, pixel_size=0.5)


def _corrections(labels):
    """A user's corrections of ``labels``: a re-drawn nucleus with a new id, a painted
    one on background, an untouched kept one with a huge id; one nucleus deleted."""
    rr, cc = np.mgrid[: labels.shape[0], : labels.shape[1]]
    fixed = np.zeros(labels.shape, np.uint32)
    a, b, gone = labels[40, 40], labels[84, 106], labels[106, 150]
    assert 0 not in (a, b, gone) and len({a, b, gone}) == 3
    fixed[(rr - 41) ** 2 + (cc - 43) ** 2 <= 90] = 5  # re-drawn, shifted
    fixed[labels == b] = 4_000_000_000
    fixed[2:8, 2:12] = 77  # painted where nothing was found
    return fixed, labels == gone


_VERY_DIFFERENT = [
    PostprocessParams(),
    PostprocessParams(fg_threshold=0.3, marker_threshold=0.7, min_nucleus_size=2, smoothing=0),
    PostprocessParams(fg_threshold=0.7, marker_threshold=0.15, sobel_size=11, smoothing=2.5),
    PostprocessParams(marker_opening=4, min_marker_size=60, min_nucleus_size=300),
]


@pytest.mark.parametrize("params", _VERY_DIFFERENT)
def test_kept_nuclei_are_identical_and_new_ones_never_overlap_them(params):
    _lab, pp = _crowd()
    fixed, cleared = _corrections(pp.run().labels)
    res = pp.run(params, fixed=fixed, cleared=cleared)
    for i in (5, 77, 4_000_000_000):  # pixel for pixel, same id, nowhere else
        np.testing.assert_array_equal(res.labels == i, fixed == i)
    assert not res.labels[cleared].any(), "a deleted nucleus stays deleted"
    present = np.unique(res.labels[res.labels > 0])
    np.testing.assert_array_equal(res.instance_ids, present)  # ids unique, one per nucleus
    np.testing.assert_array_equal(res.instance_ids[res.kept], [5, 77, 4_000_000_000])
    assert res.n_kept == 3 and res.scores.shape == res.kept.shape
    new = res.instance_ids[~res.kept]
    assert new.size > 10 and not np.isin(new, [5, 77, 4_000_000_000]).any()
    assert set(new.tolist()) == set(range(1, new.size + 2)) - {5}  # smallest free ids
    assert res.scores_by_id[77] == pytest.approx(float(pp.prob[2:8, 2:12].mean()), abs=1e-5)


def test_without_fixed_nuclei_the_result_is_unchanged():
    _lab, pp = _crowd()
    plain = pp.run(PostprocessParams(fg_threshold=0.4))
    again = pp.run(
        PostprocessParams(fg_threshold=0.4),
        fixed=np.zeros(pp.prob.shape, np.int32),
        cleared=np.zeros(pp.prob.shape, bool),
    )
    assert again.ids is None and again.kept is None
    np.testing.assert_array_equal(again.labels, plain.labels)


def test_a_new_nucleus_mostly_under_a_kept_one_is_dropped():
    lab = disk_labels(shape=(100, 120), centres=((30, 30), (30, 50), (70, 60), (70, 90)))
    prob, hv, contour = ideal_maps(lab)
    pp = Postprocessor(prob, hv, contour, pixel_size=0.5)
    rr, cc = np.mgrid[:100, :120]
    fixed = np.zeros(lab.shape, np.uint32)
    fixed[(rr - 70) ** 2 + (cc - 67) ** 2 <= 100] = 9  # nucleus 3 redrawn 7 px to the right
    assert 2 * np.count_nonzero(fixed[lab == 3]) > np.count_nonzero(lab == 3)
    res = pp.run(fixed=fixed)
    # nucleus 3's crescent outside the redrawn one is not a nucleus of its own
    assert res.n_instances == 4
    assert not (res.labels[(lab == 3) & (fixed == 0)] > 0).any()
    assert res.n_kept == 1


def test_slivers_beside_a_kept_nucleus_are_dropped_not_added_to_it():
    lab = disk_labels(shape=(80, 80), centres=((40, 40),), radius=14)
    prob, hv, contour = ideal_maps(lab)
    pp = Postprocessor(prob, hv, contour, pixel_size=0.5)
    inner = ndi_erode(lab == 1, 2)  # the user shrank the nucleus by two pixels
    res = pp.run(PostprocessParams(min_nucleus_size=10), fixed=inner.astype(np.uint8) * 3)
    np.testing.assert_array_equal(res.labels, inner * 3)  # the ring is no new nucleus


def ndi_erode(mask, iterations):
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=iterations)


def test_fixed_nuclei_rerun_only_their_stages():
    _lab, pp = _crowd()
    fixed, cleared = _corrections(pp.run().labels)
    pp.run(fixed=fixed, cleared=cleared)
    runs = dict(pp.stage_runs)
    pp.run(PostprocessParams(min_nucleus_size=40), fixed=fixed, cleared=cleared)
    assert pp.stage_runs["held filter"] == runs["held filter"] + 1
    assert pp.stage_runs["held watershed"] == runs["held watershed"]
    assert pp.stage_runs["watershed"] == runs["watershed"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fixed": np.zeros((5, 5), np.int32)}, "fixed labels shape"),
        ({"fixed": np.zeros((160, 200), np.float32)}, "integer label image"),
        ({"fixed": np.full((160, 200), -1, np.int64)}, r"ids in \[0"),
        ({"cleared": np.zeros((160, 200), np.uint8)}, "must be boolean"),
        ({"cleared": np.zeros((4, 4), bool)}, "cleared mask shape"),
    ],
)
def test_bad_fixed_input_is_a_one_line_error(kwargs, match):
    _lab, pp = _crowd()
    with pytest.raises(ValueError, match=match) as info:
        pp.run(**kwargs)
    assert "\n" not in str(info.value)
