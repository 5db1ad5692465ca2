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
