"""The ground-truth-free review queue (issue #15, part 2) and the TTA disagreement map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medinst._io import InputError
from napari_medinst.model.inference import Maps, predict_maps
from napari_medinst.model.network import NetConfig, NucleusNet
from napari_medinst.review import REASONS, Coverage, ReviewQueue, combine, review_scores
from napari_medinst.targets import contour_map, hv_maps

# ------------------------------------------------------------------------ fixtures


def draw(shape, discs) -> np.ndarray:
    """Label image of discs ``(row, col, radius)``, ids 1..n (earlier on top)."""
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.int32)
    for i, (r, c, rad) in enumerate(discs, start=1):
        out[((rr - r) ** 2 + (cc - c) ** 2 <= rad**2) & (out == 0)] = i
    return out


def clean_grid(n_side=5, step=40, seed=0) -> list[tuple[float, float, float]]:
    rng = np.random.default_rng(seed)
    return [
        (30 + step * i, 30 + step * j, float(rng.uniform(9, 12)))
        for i in range(n_side)
        for j in range(n_side)
    ]


def maps_of(truth: np.ndarray, prob_inside: float = 0.95) -> Maps:
    """Maps a good network would give for the *true* nuclei ``truth``."""
    prob = np.where(truth > 0, prob_inside, 0.02).astype(np.float32)
    contour = contour_map(truth, 1).astype(np.float32)
    return Maps(prob=prob, hv=hv_maps(truth), contour=contour)


SHAPE = (260, 260)


def scene():
    """25 clean nuclei, then a low-probability one, a merged pair, a split one, a blob.

    Returns the truth, the prediction and the predicted ids of each planted error.
    """
    discs = clean_grid()
    truth = draw(SHAPE, discs)
    pred = truth.copy()
    n = len(discs)
    # a merged pair: two true nuclei (ids 7, 8 touch after growing 8) predicted as one
    r7, c7, _ = discs[6]
    extra = draw(SHAPE, [(r7, c7 + 19, 10)])
    truth[(extra > 0) & (truth == 0)] = n + 1
    pred[truth == n + 1] = 7
    # a split: true nucleus 13 predicted as two halves
    r13 = discs[12][0]
    rows = np.arange(SHAPE[0])[:, None] * np.ones(SHAPE[1], int)
    half = (pred == 13) & (rows > r13)
    pred[half] = n + 2
    # a huge blob in a corner of its own
    blob = draw(SHAPE, [(225, 225, 30)]) > 0
    blob &= truth == 0
    truth[blob], pred[blob] = n + 3, n + 3
    m = maps_of(truth)
    m.prob[truth == 19] = 0.55  # a low-probability nucleus
    return truth, pred, m, {"merge": [7], "split": [13, n + 2], "prob": [19], "blob": [n + 3]}


# --------------------------------------------------------------------------- queue


def test_planted_errors_rank_above_every_clean_nucleus():
    _, pred, maps, planted = scene()
    q = review_scores(pred, maps)
    assert isinstance(q, ReviewQueue) and len(q) == len(np.unique(pred)) - 1
    bad = {i for ids in planted.values() for i in ids}
    top = set(q.ids[: len(bad)].tolist())
    assert top == bad, (q.ids[:8], q.risk[:8])
    clean_max = max(q.risk[k] for k in range(len(q)) if int(q.ids[k]) not in bad)
    assert all(q.risk[q.position(i)] > clean_max for i in bad)
    assert np.all(np.diff(q.risk) <= 0) and q.risk.min() >= 0 and q.risk.max() <= 1


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("merge", "merge"), ("split", "split"), ("prob", "prob"), ("blob", "shape")],
)
def test_each_planted_error_names_its_reason(kind, reason):
    _, pred, maps, planted = scene()
    q = review_scores(pred, maps)
    for i in planted[kind]:
        assert REASONS[reason] in q.reasons[q.position(i)], (kind, q.row_text(q.position(i)))


def test_clean_nuclei_have_no_reason():
    discs = clean_grid()
    truth = draw(SHAPE, discs)
    q = review_scores(truth, maps_of(truth))
    assert all(r == () for r in q.reasons), [q.row_text(k) for k in range(3)]
    assert q.risk.max() < 0.3


def test_tta_disagreement_is_a_cue():
    truth = draw(SHAPE, clean_grid())
    maps = maps_of(truth)
    std = np.full(SHAPE, 0.01, np.float32)
    std[truth == 4] = 0.2
    plain = review_scores(truth, maps)
    maps.tta_std = std
    q = review_scores(truth, maps)
    assert q.ids[0] == 4 and q.reasons[0][0] == REASONS["tta"]
    assert q.features["tta"][0] == 1.0
    assert q.risk[0] > plain.risk[plain.position(4)] + 0.15  # the map raised it


def test_given_energy_is_used_and_ids_may_have_gaps():
    truth = draw(SHAPE, clean_grid())
    pred = np.where(truth > 0, truth * 10 + 5, 0).astype(np.uint16)
    maps = maps_of(truth)
    energy = np.zeros(SHAPE, np.float32)
    q = review_scores(pred, maps, energy=energy)
    assert sorted(q.ids.tolist()) == sorted(set(pred[pred > 0].tolist()))
    assert q.boxes.shape == (len(q), 4) and q.centroids.shape == (len(q), 2)
    k = q.position(15)
    r0, r1, c0, c1 = q.boxes[k]
    assert np.all(pred[r0:r1, c0:c1].max() == 15) and np.all(pred[:r0] != 15)
    assert abs(q.centroids[k][0] - (r0 + r1 - 1) / 2) < 1


def test_weights_and_combination():
    s = {"prob": np.array([0.0, 0.5, 1.0]), "tta": np.array([0.5, 0.5, 0.0])}
    np.testing.assert_allclose(combine(s, {"prob": 1.0, "tta": 1.0}), [0.25, 0.5, 0.5])
    np.testing.assert_allclose(combine(s, {"prob": 3.0, "tta": 1.0}), [0.125, 0.5, 0.75])
    np.testing.assert_allclose(combine(s, {"prob": 1.0}), [0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="weights must be >= 0"):
        combine(s, {"prob": -1.0, "tta": 1.0})
    with pytest.raises(ValueError, match="not all 0"):
        combine(s, {"shape": 1.0})
    _, pred, maps, planted = scene()
    q = review_scores(pred, maps, weights={"prob": 1.0})
    assert q.ids[0] == planted["prob"][0]


def test_empty_prediction_gives_an_empty_queue_with_a_message():
    maps = maps_of(np.zeros(SHAPE, np.int32))
    labels = np.zeros(SHAPE, np.uint32)
    q = review_scores(labels, maps)
    assert len(q) == 0 and q.message == "No predicted nuclei: nothing to review."
    assert not labels.any()  # nothing changed


def test_bad_input_is_a_one_line_error():
    truth = draw(SHAPE, clean_grid())
    with pytest.raises(ValueError, match=r"labels of shape \(100, 100\) do not match maps"):
        review_scores(truth[:100, :100], maps_of(truth))
    with pytest.raises(InputError, match="labels: labels must be integers"):
        review_scores(truth + 0.5, maps_of(truth))


def test_speed_1000_nuclei():
    """<= 100 ms for ~1000 nuclei on 1000^2 (measured ~30 ms; generous bound here)."""
    import time

    rng = np.random.default_rng(0)
    discs = [
        (15 + 32 * i + rng.uniform(-2, 2), 15 + 32 * j, 12) for i in range(31) for j in range(31)
    ]
    truth = draw((1000, 1000), discs)
    maps = maps_of(truth)
    maps.tta_std = np.zeros((1000, 1000), np.float32)
    review_scores(truth, maps)
    t0 = time.perf_counter()
    q = review_scores(truth, maps)
    assert len(q) == 961 and time.perf_counter() - t0 < 1.0


# ------------------------------------------------------------------------ coverage


def test_coverage_fractions():
    labels = draw((100, 100), [(20, 20, 8), (70, 70, 8)])
    cov = Coverage(labels)
    assert cov.area_fraction == 0.0 and cov.nucleus_fraction == 0.0
    assert cov.add_box(0, 40, 0, 40)
    assert cov.nucleus_fraction == 0.5 and cov.seen_ids().tolist() == [1]
    assert cov.area_fraction == pytest.approx(0.5)
    assert not cov.add_box(5, 30, 5, 30)  # nothing new
    assert not cov.add_box(-50, -10, 0, 100)  # outside: clipped to nothing
    assert cov.add_box(60.4, 200, 55.5, 200)  # clipped to the image
    assert cov.nucleus_fraction == 1.0 and cov.area_fraction == 1.0
    assert cov.boxes[-1] == (60, 100, 55, 100)


def test_coverage_counts_a_nucleus_once_half_seen():
    labels = draw((100, 100), [(50, 50, 10)])
    cov = Coverage(labels)
    cov.add_box(0, 100, 0, 45)  # under half of it
    assert cov.nucleus_fraction == 0.0 and 0 < cov.area_fraction < 0.5
    cov.add_box(0, 100, 45, 51)
    assert cov.nucleus_fraction == 1.0


def test_coverage_of_an_empty_prediction_is_complete():
    cov = Coverage(np.zeros((10, 10), np.uint8))
    assert cov.area_fraction == 1.0 and cov.nucleus_fraction == 1.0


# -------------------------------------------------------------- TTA disagreement map


TINY = NetConfig(widths=(8, 16, 16))


def test_tta_std_leaves_the_maps_unchanged_and_is_the_std_of_the_passes():
    torch.manual_seed(0)
    net = NucleusNet(TINY).eval()
    x = np.random.default_rng(3).random((3, 64, 96), dtype=np.float32)
    tta = predict_maps(net, x, tta=True)
    both = predict_maps(net, x, tta=True, tta_std=True)
    assert tta.tta_std is None
    for name in ("prob", "hv", "contour"):
        np.testing.assert_array_equal(getattr(both, name), getattr(tta, name))
    passes = []
    for rows, cols in ((False, False), (False, True), (True, False), (True, True)):
        xf = x[:, ::-1] if rows else x
        xf = xf[:, :, ::-1] if cols else xf
        p = predict_maps(net, np.ascontiguousarray(xf)).prob
        p = p[::-1] if rows else p
        passes.append(p[:, ::-1] if cols else p)
    np.testing.assert_allclose(both.tta_std, np.std(passes, axis=0), atol=2e-4)
    assert both.tta_std.max() > 1e-3  # an untrained network disagrees with itself


def test_tta_std_needs_tta_and_survives_resizing():
    net = NucleusNet(TINY).eval()
    x = np.random.default_rng(1).random((3, 40, 40), dtype=np.float32)
    assert predict_maps(net, x, tta_std=True).tta_std is None
    m = predict_maps(net, x, tta=True, tta_std=True)
    big = m.resized((80, 80))
    assert big.tta_std.shape == (80, 80) and big.prob.shape == (80, 80)
    np.testing.assert_allclose(big.tta_std.mean(), m.tta_std.mean(), rtol=0.05)
