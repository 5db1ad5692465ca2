"""Tests of napari_medinst.metrics: hand-computed cases, edge cases and properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from napari_medinst import metrics as M
from napari_medinst._io import InputError

approx = pytest.approx

# ----------------------------------------------------------------------------- fixtures


def case_a() -> tuple[np.ndarray, np.ndarray]:
    """10 x 10; three gt and three predicted squares.

    gt 1: rows 0-3, cols 0-3 (16 px)      pred 1: same square            -> IoU 16/16 = 1
    gt 2: rows 0-3, cols 6-9 (16 px)      pred 2: rows 0-3, cols 7-9 (12) -> IoU 12/16 = 0.75
    gt 3: rows 6-9, cols 0-1 (8 px)       (no prediction)                -> FN
                                          pred 3: rows 6-9, cols 6-9 (16) -> FP
    """
    gt = np.zeros((10, 10), np.int32)
    gt[0:4, 0:4] = 1
    gt[0:4, 6:10] = 2
    gt[6:10, 0:2] = 3
    pred = np.zeros((10, 10), np.int32)
    pred[0:4, 0:4] = 1
    pred[0:4, 7:10] = 2
    pred[6:10, 6:10] = 3
    return gt, pred


# scores with the FP ranked last / first
GOOD_SCORES = {1: 0.9, 2: 0.8, 3: 0.1}
BAD_SCORES = {1: 0.9, 2: 0.8, 3: 0.95}


def relabel(img: np.ndarray, mapping: dict[int, int], dtype: type) -> np.ndarray:
    out = np.zeros(img.shape, dtype)
    for old, new in mapping.items():
        out[img == old] = new
    return out


# ------------------------------------------------------------------------ overlap table


def test_thresholds_are_the_ten_coco_values():
    assert M.THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_overlap_table_case_a():
    t = M.overlap_table(*case_a())
    assert t.gt_ids.tolist() == [1, 2, 3]
    assert t.pred_ids.tolist() == [1, 2, 3]
    assert t.gt_areas.tolist() == [16, 16, 8]
    assert t.pred_areas.tolist() == [16, 12, 16]
    # only two pairs overlap: (gt1, pred1) 16 px and (gt2, pred2) 12 px
    assert t.pair_gt_index.tolist() == [0, 1]
    assert t.pair_pred_index.tolist() == [0, 1]
    assert t.pair_inter.tolist() == [16, 12]
    assert t.pair_iou.tolist() == approx([1.0, 0.75])
    assert t.pair_union.tolist() == [16, 16]


def test_overlap_table_is_read_only():
    t = M.overlap_table(*case_a())
    with pytest.raises(ValueError):
        t.pair_iou[0] = 0.0
    with pytest.raises(AttributeError):
        t.gt_ids = np.zeros(3)  # frozen dataclass


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(10, 10\).*\(10, 11\)"):
        M.overlap_table(np.zeros((10, 10), int), np.zeros((10, 11), int))


def test_non_integer_labels_raise_input_error():
    gt = np.zeros((4, 4), float)
    gt[0, 0] = 1.5
    with pytest.raises(InputError, match="integers"):
        M.evaluate(gt, np.zeros((4, 4), int))
    with pytest.raises(InputError, match="negative"):
        M.evaluate(np.full((4, 4), -1), np.zeros((4, 4), int))
    with pytest.raises(InputError, match="2-D"):
        M.evaluate(np.zeros((2, 4, 4), int), np.zeros((2, 4, 4), int))


def test_whole_number_float_labels_are_accepted():
    gt, pred = case_a()
    a = M.evaluate(gt.astype(np.float32), pred.astype(np.float64)).to_dict()
    assert a == M.evaluate(gt, pred).to_dict()


@pytest.mark.parametrize(
    ("gt_dtype", "gt_map", "pred_dtype", "pred_map"),
    [
        (np.uint8, {1: 9, 2: 200, 3: 255}, np.uint8, {1: 254, 2: 3, 3: 77}),
        (np.uint16, {1: 65535, 2: 2, 3: 1000}, np.uint16, {1: 40000, 2: 5, 3: 6}),
        (np.int32, {1: 2**31 - 1, 2: 17, 3: 123456}, np.uint8, {1: 8, 2: 1, 3: 255}),
        (np.uint64, {1: 2**63 + 5, 2: 2**40, 3: 3}, np.int64, {1: 2**62, 2: 9, 3: 2**33}),
    ],
)
def test_dtypes_and_non_sequential_ids(gt_dtype, gt_map, pred_dtype, pred_map):
    gt, pred = case_a()
    gt2, pred2 = relabel(gt, gt_map, gt_dtype), relabel(pred, pred_map, pred_dtype)
    t = M.overlap_table(gt2, pred2)
    assert sorted(int(i) for i in t.gt_ids) == sorted(gt_map.values())
    assert sorted(int(i) for i in t.pred_ids) == sorted(pred_map.values())
    m = M.match(t, 0.5)
    assert sorted(m.pairs()) == sorted(
        [(gt_map[1], pred_map[1], 1.0), (gt_map[2], pred_map[2], 0.75)]
    )
    scores = {pred_map[k]: v for k, v in GOOD_SCORES.items()}
    assert M.evaluate(gt2, pred2, scores=scores).to_dict() == (
        M.evaluate(gt, pred, scores=GOOD_SCORES).to_dict()
    )


# ----------------------------------------------------------------------------- matching


def test_match_case_a_hand_computed():
    t = M.overlap_table(*case_a())
    m = M.match(t, 0.5)
    # TP: (1,1) IoU 1 and (2,2) IoU 0.75; FP: pred 3; FN: gt 3
    assert (m.tp, m.fp, m.fn) == (2, 1, 1)
    assert m.precision == approx(2 / 3)
    assert m.recall == approx(2 / 3)
    assert m.f1 == approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m.accuracy == approx(2 / (2 + 1 + 1))
    assert m.mean_matched_iou == approx(0.875)
    # IoU 0.75 is exactly at the threshold 0.75: still a match; at 0.8 only one pair
    assert M.match(t, 0.75).tp == 2
    m8 = M.match(t, 0.8)
    assert (m8.tp, m8.fp, m8.fn) == (1, 2, 2)
    assert m8.accuracy == approx(1 / 5)
    assert m8.pairs() == [(1, 1, 1.0)]


def test_exact_half_tie_is_matched_one_to_one():
    # gt 1: 2 x 4 = 8 px; preds 1 and 2 each cover exactly one half (4 px):
    # IoU = 4 / 8 = 0.5 for both -> both are candidates at 0.5 but only one may match.
    gt = np.zeros((2, 8), np.uint8)
    gt[:, 0:4] = 1
    gt[:, 4:8] = 2  # gt 2 matched perfectly by pred 3
    pred = np.zeros((2, 8), np.uint8)
    pred[:, 0:2] = 1
    pred[:, 2:4] = 2
    pred[:, 4:8] = 3
    t = M.overlap_table(gt, pred)
    assert sorted(t.pair_iou.tolist()) == approx([0.5, 0.5, 1.0])
    m = M.match(t, 0.5)
    assert (m.tp, m.fp, m.fn) == (2, 1, 0)
    got = dict((g, p) for g, p, _ in m.pairs())
    assert got[2] == 3 and got[1] in (1, 2)
    assert m.accuracy == approx(2 / 3)
    # strict IoU > 0.5 (PQ) does not match the halves at all
    s = M.evaluate(gt, pred)
    assert (s.pq_tp, s.pq_fp, s.pq_fn) == (1, 2, 1)


def test_low_threshold_maximises_cardinality_then_iou():
    # one row.  gt A: cols 0-3 (4 px), gt B: cols 4-5 (2 px)
    #           pred X: cols 1-4 (4 px), pred Y: col 0 (1 px)
    # IoU(A,X) = 3/5 = 0.6, IoU(B,X) = 1/5 = 0.2, IoU(A,Y) = 1/4 = 0.25
    gt = np.array([[1, 1, 1, 1, 2, 2]])
    pred = np.array([[20, 10, 10, 10, 10, 0]])
    t = M.overlap_table(gt, pred)
    # at 0.2, greedy "best IoU first" would take A-X (0.6) and stop at 1 match;
    # the maximum matching is A-Y + B-X (2 matches)
    m = M.match(t, 0.2)
    assert sorted(m.pairs()) == [(1, 20, 0.25), (2, 10, 0.2)]
    assert M.match(t, 0.5).pairs() == [(1, 10, 0.6)]
    # AJI: A takes X (C 3, U 5), B takes X again (C 1, U 5), Y unused (U 1) -> 4/11
    # AJI+: max total IoU is the single pair A-X (0.6 > 0.45): C 3, U 5 + |B| 2 + |Y| 1
    aji, aji_plus = M.aggregated_jaccard(t)
    assert aji == approx(4 / 11)
    assert aji_plus == approx(3 / 8)
    # Dice: foreground gt cols 0-5 (6 px), pred cols 0-4 (5 px), overlap 5 px
    assert M.foreground_dice(t) == approx(10 / 11)


def test_threshold_validation():
    t = M.overlap_table(*case_a())
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            M.match(t, bad)
    with pytest.raises(ValueError, match="distinct"):
        M.evaluate(*case_a(), thresholds=(0.5, 0.5))


# ------------------------------------------------------------------ PQ, AJI, Dice


def test_pq_aji_dice_case_a():
    t = M.overlap_table(*case_a())
    pq, dq, sq = M.panoptic_quality(t)
    # matches at IoU > 0.5: IoU 1 and 0.75 -> SQ 0.875; DQ = 2 / (2 + 1/2 + 1/2)
    assert dq == approx(2 / 3)
    assert sq == approx(0.875)
    assert pq == approx(2 / 3 * 0.875)
    # AJI: C = 16 + 12 = 28; U = 16 + 16 + |gt3| 8 + |pred3| 16 = 56
    assert M.aggregated_jaccard(t) == approx((0.5, 0.5))
    # Dice: 2 * 28 / (40 + 44)
    assert M.foreground_dice(t) == approx(56 / 84)


def test_aji_reuses_prediction_and_aji_plus_does_not():
    # gt 1, 2: 2 x 2 squares side by side; one prediction covers both (merge).
    # AJI: both gts take pred 1: C = 4 + 4, U = 8 + 8 -> 0.5
    # AJI+: pred 1 pairs with one gt only: C = 4, U = 8 + |other gt| 4 -> 1/3
    gt = np.zeros((2, 4), int)
    gt[:, :2], gt[:, 2:] = 1, 2
    pred = np.ones((2, 4), int)
    aji, aji_plus = M.aggregated_jaccard(M.overlap_table(gt, pred))
    assert aji == approx(0.5)
    assert aji_plus == approx(1 / 3)


# ---------------------------------------------------------------------------- outcomes


def outcomes_image() -> tuple[np.ndarray, np.ndarray]:
    """8 x 20 image with one of each outcome.

    tp:    gt 1 rows 0-1 cols 0-3 = pred 1                    (IoU 1)
    split: gt 2 rows 0-1 cols 6-13 (16 px); pred 2 cols 6-8 (6 px), pred 3 cols 11-13
           (6 px): IoU 0.375 each, both lie wholly in gt 2
    merge: gt 3 rows 4-5 cols 0-2, gt 4 rows 4-5 cols 4-6; pred 4 rows 4-5 cols 0-6
           (14 px): IoU 6/14 with each, covers both wholly
    fn:    gt 5 rows 4-5 cols 10-11
    fp:    pred 5 rows 6-7 cols 16-19
    """
    gt = np.zeros((8, 20), np.uint16)
    pred = np.zeros((8, 20), np.uint16)
    gt[0:2, 0:4] = 1
    pred[0:2, 0:4] = 1
    gt[0:2, 6:14] = 2
    pred[0:2, 6:9] = 2
    pred[0:2, 11:14] = 3
    gt[4:6, 0:3] = 3
    gt[4:6, 4:7] = 4
    pred[4:6, 0:7] = 4
    gt[4:6, 10:12] = 5
    pred[6:8, 16:20] = 5
    return gt, pred


def test_instance_outcomes_each_category():
    o = M.instance_outcomes(M.overlap_table(*outcomes_image()), 0.5)
    assert o.gt_ids.tolist() == [1, 2, 3, 4, 5]
    assert o.gt_category.tolist() == ["tp", "split", "merge", "merge", "fn"]
    assert o.gt_partner.tolist() == [1, 0, 0, 0, 0]
    assert o.gt_iou.tolist() == approx([1, 0, 0, 0, 0])
    assert o.pred_ids.tolist() == [1, 2, 3, 4, 5]
    assert o.pred_category.tolist() == ["tp", "split", "split", "merge", "fp"]
    assert o.pred_partner.tolist() == [1, 0, 0, 0, 0]
    assert o.counts == {
        "tp": 1,
        "fp": 1,
        "fn": 1,
        "split_gt": 1,
        "split_pred": 2,
        "merge_gt": 2,
        "merge_pred": 1,
    }
    # every category name is one of the documented ones
    assert set(o.gt_category) | set(o.pred_category) <= set(M.CATEGORIES)


def test_outcomes_at_low_threshold_match_instead():
    # at IoU 0.35 the split halves (0.375) and the merge (6/14) are matches
    o = M.instance_outcomes(M.overlap_table(*outcomes_image()), 0.35)
    assert o.counts["tp"] == 3
    assert o.counts["split_gt"] == 0 and o.counts["merge_pred"] == 0


# ---------------------------------------------------------------------------------- AP


def test_pr_curve_and_101_point_ap_hand_computed():
    t = M.overlap_table(*case_a())
    recall, precision, thr = M.pr_curve(t, GOOD_SCORES, 0.5)
    # ranked: pred1 (TP), pred2 (TP), pred3 (FP); 3 gt nuclei
    assert recall.tolist() == approx([1 / 3, 2 / 3, 2 / 3])
    assert precision.tolist() == approx([1, 1, 2 / 3])
    assert thr.tolist() == approx([0.9, 0.8, 0.1])
    # envelope 1 up to recall 2/3: recall points 0..0.66 (67 of 101) score 1, the rest 0
    assert M.average_precision(t, GOOD_SCORES, 0.5) == approx(67 / 101)


def test_low_score_false_positive_ranks_below_all_tps_gives_higher_ap():
    t = M.overlap_table(*case_a())
    good = M.average_precision(t, GOOD_SCORES, 0.5)
    bad = M.average_precision(t, BAD_SCORES, 0.5)
    # FP first: precision 0, 1/2, 2/3 -> envelope 2/3 at all 67 reached points
    assert bad == approx(67 / 101 * 2 / 3)
    assert good > bad


def test_ap_with_tied_scores_uses_one_point_per_distinct_score():
    t = M.overlap_table(*case_a())
    recall, precision, thr = M.pr_curve(t, {1: 0.5, 2: 0.5, 3: 0.5}, 0.5)
    assert recall.tolist() == approx([2 / 3])
    assert precision.tolist() == approx([2 / 3])
    assert thr.tolist() == [0.5]


def test_map_with_scores_hand_computed():
    s = M.evaluate(*case_a(), scores=GOOD_SCORES)
    # tau <= 0.75: AP 67/101 (above); tau >= 0.8: only pred1 is a TP, ranked first:
    # recall 1/3 reached with precision 1 -> 34 of 101 points
    for tau in M.THRESHOLDS:
        assert s.ap[tau] == approx(67 / 101 if tau <= 0.75 else 34 / 101)
    assert s.map == approx((6 * 67 + 4 * 34) / 1010)
    assert s.has_scores is True


def test_ap_without_scores_is_precision_times_recall():
    s = M.evaluate(*case_a())
    assert s.has_scores is False
    assert "precision x recall" in s.ap_note
    assert s.ap[0.5] == approx((2 / 3) * (2 / 3))
    assert s.ap[0.8] == approx((1 / 3) * (1 / 3))
    assert s.map == approx((6 * 4 / 9 + 4 / 9) / 10)


def test_scores_as_array_indexed_by_id():
    arr = np.array([np.nan, 0.9, 0.8, 0.1])  # index 0 (background) is never read
    t = M.overlap_table(*case_a())
    assert M.average_precision(t, arr, 0.5) == approx(67 / 101)


def test_bad_scores_raise_value_error():
    t = M.overlap_table(*case_a())
    with pytest.raises(ValueError, match="no value for ids 3"):
        M.average_precision(t, {1: 0.9, 2: 0.8})
    with pytest.raises(ValueError, match="not finite"):
        M.average_precision(t, {1: 0.9, 2: float("nan"), 3: 0.1})
    with pytest.raises(ValueError, match="length 3"):
        M.average_precision(t, np.array([0.0, 0.9, 0.8]))


def test_typed_map_matches_within_class():
    gt, pred = case_a()
    gt_types = {1: 1, 2: 2, 3: 1}
    pred_types = {1: 1, 2: 1, 3: 2}  # pred 2 overlaps gt 2 but has the wrong class
    s = M.evaluate(gt, pred, gt_types=gt_types, pred_types=pred_types)
    # class 1: gts {1, 3}, preds {1, 2}: one TP -> P = R = 1/2 -> AP 1/4 at every tau
    # class 2: gt {2}, pred {3}: no TP -> 0
    assert s.class_map == approx({1: 0.25, 2: 0.0})
    assert s.map == approx(0.125)
    assert s.ap[0.5] == approx(0.125)
    # types do not change the class-agnostic scores
    assert s.accuracy == approx(M.evaluate(gt, pred).accuracy)
    with pytest.raises(ValueError, match="both"):
        M.evaluate(gt, pred, gt_types=gt_types)
    with pytest.raises(ValueError, match="pred_types: no value for ids 3"):
        M.evaluate(gt, pred, gt_types=gt_types, pred_types={1: 1, 2: 1})


def test_typed_map_with_scores():
    gt, pred = case_a()
    s = M.evaluate(
        gt, pred, scores=GOOD_SCORES, gt_types={1: 1, 2: 1, 3: 1}, pred_types={1: 1, 2: 1, 3: 1}
    )
    # a single class equals the untyped result
    assert s.map == approx(M.evaluate(gt, pred, scores=GOOD_SCORES).map)


# ---------------------------------------------------------------------------- evaluate


def test_evaluate_case_a_all_fields():
    s = M.evaluate(*case_a())
    assert (s.n_gt, s.n_pred) == (3, 3)
    for tau in M.THRESHOLDS:
        assert s.accuracy[tau] == approx(0.5 if tau <= 0.75 else 0.2)
        assert s.tp[tau] + s.fn[tau] == 3
    assert (s.pq, s.dq, s.sq) == approx((2 / 3 * 0.875, 2 / 3, 0.875))
    assert (s.aji, s.aji_plus, s.dice) == approx((0.5, 0.5, 2 / 3))
    assert (s.aji_c, s.aji_u, s.dice_inter, s.dice_sum) == (28, 56, 28, 84)
    d = s.to_dict()
    assert list(d) == [
        "n_gt", "n_pred", "accuracy", "ap", "precision", "recall", "f1",
        "map", "pq", "dq", "sq", "aji", "aji_plus", "dice",
    ]  # fmt: skip
    assert list(d["accuracy"]) == [f"{t:.2f}" for t in M.THRESHOLDS]
    assert all(type(v) is float for v in d["f1"].values())


def test_ignore_mask_sets_pixels_to_background_in_both():
    gt, pred = case_a()
    mask = np.zeros(gt.shape, bool)
    mask[5:, :] = True  # hides gt 3 (FN) and pred 3 (FP)
    s = M.evaluate(gt, pred, ignore_mask=mask)
    assert (s.n_gt, s.n_pred) == (2, 2)
    assert s.accuracy[0.5] == 1.0
    with pytest.raises(ValueError, match="ignore_mask"):
        M.evaluate(gt, pred, ignore_mask=np.zeros((3, 3), bool))


ALL_SCALARS = ("map", "pq", "dq", "sq", "aji", "aji_plus", "dice")
PER_TAU = ("accuracy", "ap", "precision", "recall", "f1")


def test_both_empty_scores_one_everywhere():
    z = np.zeros((5, 5), np.uint8)
    s = M.evaluate(z, z, scores={})
    d = s.to_dict()
    assert all(d[k] == 1.0 for k in ALL_SCALARS)
    assert all(v == 1.0 for k in PER_TAU for v in d[k].values())


def test_gt_empty_predictions_present():
    gt = np.zeros((5, 5), np.uint8)
    pred = gt.copy()
    pred[0:2, 0:2] = 4
    s = M.evaluate(gt, pred, scores={4: 0.7})
    d = s.to_dict()
    for tau in d["accuracy"]:
        assert (d["precision"][tau], d["recall"][tau]) == (0.0, 1.0)
        assert d["accuracy"][tau] == d["f1"][tau] == d["ap"][tau] == 0.0
    assert all(d[k] == 0.0 for k in ALL_SCALARS)


def test_predictions_empty_gt_present():
    gt = np.zeros((5, 5), np.uint8)
    gt[0:2, 0:2] = 4
    s = M.evaluate(gt, np.zeros_like(gt), scores={})
    d = s.to_dict()
    for tau in d["accuracy"]:
        assert (d["precision"][tau], d["recall"][tau]) == (1.0, 0.0)
        assert d["accuracy"][tau] == d["f1"][tau] == d["ap"][tau] == 0.0
    assert all(d[k] == 0.0 for k in ALL_SCALARS)


def test_zero_size_image_is_both_empty():
    z = np.zeros((0, 4), np.uint8)
    assert M.evaluate(z, z).map == 1.0


# ----------------------------------------------------------------------------- dataset


def small_perfect() -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((4, 4), np.uint8)
    gt[0:2, 0:2] = 1
    return gt, gt.copy()


def test_dataset_mean_and_pooled_hand_computed():
    a = M.evaluate(*case_a(), scores=GOOD_SCORES)
    b = M.evaluate(*small_perfect(), scores={1: 0.5})
    ds = M.evaluate_dataset([a, b])
    # mean of per-image scores
    assert ds.mean["accuracy"]["0.50"] == approx((0.5 + 1.0) / 2)
    assert ds.mean["aji"] == approx(0.75)
    assert ds.mean["n_gt"] == approx(2.0)
    # pooled counts at 0.5: TP 3, FP 1, FN 1
    p = ds.pooled
    assert (p["tp"]["0.50"], p["fp"]["0.50"], p["fn"]["0.50"]) == (3, 1, 1)
    assert p["accuracy"]["0.50"] == approx(3 / 5)
    assert p["precision"]["0.50"] == approx(3 / 4)
    assert p["aji"] == approx((28 + 4) / (56 + 4))
    assert p["dice"] == approx(2 * 32 / (84 + 8))
    assert (p["pq"], p["dq"], p["sq"]) == approx((0.75 * 2.75 / 3, 0.75, 2.75 / 3))
    # pooled AP ranks 0.9 TP, 0.8 TP, 0.5 TP, 0.1 FP over 4 gt: recall 3/4 at precision 1
    assert p["ap"]["0.50"] == approx(76 / 101)
    assert (p["n_gt"], p["n_pred"]) == (4, 4)


def test_dataset_pooled_ap_without_scores_is_pooled_precision_times_recall():
    ds = M.evaluate_dataset([case_a(), {"gt": small_perfect()[0], "pred": small_perfect()[1]}])
    assert ds.pooled["ap"]["0.50"] == approx(3 / 4 * 3 / 4)
    assert len(ds.images) == 2
    assert ds.to_dict()["images"][1]["map"] == 1.0


def test_combine_scores_errors():
    with pytest.raises(ValueError, match="no images"):
        M.combine_scores([])
    a = M.evaluate(*case_a())
    b = M.evaluate(*case_a(), thresholds=(0.5,))
    with pytest.raises(ValueError, match="thresholds"):
        M.combine_scores([a, b])


# ------------------------------------------------------------------ property tests


@st.composite
def label_images(draw, shape=None):
    """A small label image painted with random rectangles and random ids."""
    if shape is None:
        shape = (draw(st.integers(6, 20)), draw(st.integers(6, 20)))
    h, w = shape
    img = np.zeros(shape, np.int64)
    n = draw(st.integers(0, 7))
    for _ in range(n):
        y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        y1 = draw(st.integers(y0 + 1, min(h, y0 + 8)))
        x1 = draw(st.integers(x0 + 1, min(w, x0 + 8)))
        img[y0:y1, x0:x1] = draw(st.integers(1, 1000))
    return img


@st.composite
def image_pairs(draw):
    gt = draw(label_images())
    pred = draw(label_images(shape=gt.shape))
    return gt, pred


PROPS = settings(max_examples=40, deadline=None)


def _flat_scores(d: dict) -> list[float]:
    out = []
    for key in (*PER_TAU, *ALL_SCALARS):
        v = d[key]
        out += list(v.values()) if isinstance(v, dict) else [v]
    return out


@PROPS
@given(gt=label_images(), seed=st.integers(0, 2**16))
def test_perfect_prediction_scores_one(gt, seed):
    rng = np.random.default_rng(seed)
    scores = {int(i): float(rng.random()) for i in np.unique(gt) if i}
    d = M.evaluate(gt, gt.copy(), scores=scores).to_dict()
    assert all(v == approx(1.0) for v in _flat_scores(d))


@PROPS
@given(pair=image_pairs(), seed=st.integers(0, 2**16))
def test_relabelling_ids_changes_nothing(pair, seed):
    gt, pred = pair
    rng = np.random.default_rng(seed)

    def permute(img, dtype):
        ids = np.unique(img)
        ids = ids[ids > 0]
        new = rng.choice(np.arange(1, 60000), size=ids.size, replace=False)
        return relabel(img, dict(zip(ids.tolist(), new.tolist(), strict=True)), dtype), dict(
            zip(ids.tolist(), new.tolist(), strict=True)
        )

    gt2, _ = permute(gt, np.uint16)
    pred2, pmap = permute(pred, np.int32)
    scores = {int(i): float(rng.random()) for i in pmap}
    scores2 = {pmap[k]: v for k, v in scores.items()}
    a = M.evaluate(gt, pred, scores=scores).to_dict()
    b = M.evaluate(gt2, pred2, scores=scores2).to_dict()
    assert _flat_scores(a) == approx(_flat_scores(b))


@PROPS
@given(pair=image_pairs())
def test_swapping_gt_and_prediction(pair):
    gt, pred = pair
    a = M.evaluate(gt, pred)
    b = M.evaluate(pred, gt)
    assert (a.n_gt, a.n_pred) == (b.n_pred, b.n_gt)
    for t in M.THRESHOLDS:
        assert a.precision[t] == approx(b.recall[t])
        assert a.recall[t] == approx(b.precision[t])
        assert a.accuracy[t] == approx(b.accuracy[t])
        assert a.f1[t] == approx(b.f1[t])
    assert (a.pq, a.dq, a.sq) == approx((b.pq, b.dq, b.sq))
    assert a.dice == approx(b.dice)
    assert a.aji_plus == approx(b.aji_plus)


@PROPS
@given(pair=image_pairs(), seed=st.integers(0, 2**16))
def test_scores_bounded_and_counts_consistent(pair, seed):
    gt, pred = pair
    rng = np.random.default_rng(seed)
    scores = {int(i): float(rng.random()) for i in np.unique(pred) if i}
    s = M.evaluate(gt, pred, scores=scores)
    values = _flat_scores(s.to_dict())
    assert all(0.0 <= v <= 1.0 and np.isfinite(v) for v in values)
    tps = [s.tp[t] for t in M.THRESHOLDS]
    assert tps == sorted(tps, reverse=True)  # stricter threshold, no more matches
    for t in M.THRESHOLDS:
        assert s.tp[t] + s.fp[t] == s.n_pred
        assert s.tp[t] + s.fn[t] == s.n_gt
    o = M.instance_outcomes(M.overlap_table(gt, pred))
    assert o.counts["tp"] == s.tp[0.5] == int(np.count_nonzero(o.pred_category == "tp"))


def _dense_iou(gt, pred):
    g_ids = [i for i in np.unique(gt) if i]
    p_ids = [i for i in np.unique(pred) if i]
    iou = np.zeros((len(g_ids), len(p_ids)))
    inter = np.zeros_like(iou)
    union = np.zeros_like(iou)
    for a, g in enumerate(g_ids):
        for b, p in enumerate(p_ids):
            i = np.sum((gt == g) & (pred == p))
            u = np.sum((gt == g) | (pred == p))
            inter[a, b], union[a, b], iou[a, b] = i, u, i / u
    return g_ids, p_ids, iou, inter, union


# two gt nuclei tie for one prediction (IoU 1/8 each, intersections 1 and 2 px): found by
# hypothesis in CI
_AJI_PLUS_TIE = (
    np.array([[2, 0, 0, 3, 3, 3, 3, 3], [0] + [1] * 7, [0] + [1] * 7] + [[0] * 8] * 3),
    np.array([[0] * 7 + [1]] * 4 + [[0] * 8] * 2),
)


def _aji_iou_tie():
    """A gt nucleus of 5 px whose two predictions tie at IoU 0.2: one of 1 px inside it
    (id 1, IoU 1 / 5), one of 19 px covering 4 of its pixels (id 3, IoU 4 / 20). Kumar AJI
    takes the larger intersection (aji_picks), whatever the ids. (Found by hypothesis.)"""
    gt = np.zeros((6, 9), np.int32)
    gt[1:6, 8] = 1
    pred = np.zeros((6, 9), np.int32)
    pred[0:4, 4:8] = 3  # 16 px beside the nucleus, less one
    pred[0, 4] = 0
    pred[1:3, 8] = pred[4:6, 8] = 3  # and 4 of its pixels
    pred[3, 8] = 1
    return gt, pred


_AJI_IOU_TIE = _aji_iou_tie()


@PROPS
@given(pair=image_pairs())
@example(pair=_AJI_PLUS_TIE)
@example(pair=_AJI_IOU_TIE)
def test_against_brute_force_masks(pair):
    """Table, matching size, AJI and AJI+ equal a per-pair-mask reference."""
    gt, pred = pair
    t = M.overlap_table(gt, pred)
    g_ids, p_ids, iou, inter, union = _dense_iou(gt, pred)
    assert t.gt_ids.tolist() == g_ids and t.pred_ids.tolist() == p_ids
    dense = np.zeros_like(iou)
    dense[t.pair_gt_index, t.pair_pred_index] = t.pair_iou
    assert dense == approx(iou)
    # maximum matching size at 0.5 and total IoU of the AJI+ assignment
    if iou.size:
        r, c = linear_sum_assignment(iou >= 0.5, maximize=True)
        assert M.match(t, 0.5).tp == int(np.sum(iou[r, c] >= 0.5))
        r, c = linear_sum_assignment(iou, maximize=True)
        keep = iou[r, c] > 0
        r, c = r[keep], c[keep]
        u_ref = union[r, c].sum()
        u_ref += sum(np.sum(gt == g_ids[a]) for a in set(range(len(g_ids))) - set(r))
        u_ref += sum(np.sum(pred == p_ids[b]) for b in set(range(len(p_ids))) - set(c))
        # the optimum may be tied between assignments; compare the optimum value
        ajip = M._aji_plus_sums(t)
        sel = M._max_weight_matching(
            t.pair_gt_index, t.pair_pred_index, t.pair_iou, cardinality_first=False
        )
        assert t.pair_iou[sel].sum() == approx(iou[r, c].sum())
        # AJI+ breaks ties in total IoU towards the larger total intersection (so the
        # score does not depend on ids): the reference does the same, with the dense solver
        r2, c2 = linear_sum_assignment(iou + 1e-9 * inter / max(1.0, inter.max()), maximize=True)
        keep2 = iou[r2, c2] > 0
        assert ajip[0] == int(inter[r2[keep2], c2[keep2]].sum())
    # Kumar AJI, straight from the definition
    c_sum, u_sum, used = 0, 0, set()
    for a, g in enumerate(g_ids):
        if iou.shape[1] == 0 or iou[a].max() == 0:
            u_sum += np.sum(gt == g)
            continue
        best = np.flatnonzero(iou[a] == iou[a].max())  # ties: the larger intersection
        b = int(best[np.argmax(inter[a, best])])
        c_sum += inter[a, b]
        u_sum += union[a, b]
        used.add(b)
    u_sum += sum(np.sum(pred == p) for b, p in enumerate(p_ids) if b not in used)
    assert M._aji_sums(t) == (c_sum, u_sum)
