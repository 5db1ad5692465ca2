"""Tests of napari_medinst.editing on small hand-made label images."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medinst import editing as E
from napari_medinst import metrics as M
from napari_medinst._io import InputError


def squares() -> np.ndarray:
    """12 x 12: nucleus 1 rows 1-4 cols 1-4, nucleus 2 rows 1-4 cols 6-9, nucleus 5 rows 7-10."""
    lab = np.zeros((12, 12), np.int32)
    lab[1:5, 1:5] = 1
    lab[1:5, 6:10] = 2
    lab[7:11, 2:8] = 5
    return lab


def dumbbell() -> np.ndarray:
    """Two disks of radius 8 joined by a 3-pixel-wide neck, all one nucleus (id 4)."""
    rr, cc = np.mgrid[:30, :50]
    lab = np.zeros((30, 50), np.uint16)
    lab[(rr - 15) ** 2 + (cc - 12) ** 2 <= 64] = 4
    lab[(rr - 15) ** 2 + (cc - 37) ** 2 <= 64] = 4
    lab[14:17, 12:38] = 4
    return lab


def check_edit(old: np.ndarray, edit: E.Edit) -> None:
    """The edit's pixel list turns ``old`` into ``edit.labels``; the region bounds it."""
    rebuilt = old.copy()
    rebuilt[edit.indices] = edit.values
    np.testing.assert_array_equal(rebuilt, edit.labels)
    assert edit.labels.dtype == old.dtype
    if edit.changed:
        outside = np.ones(old.shape, bool)
        outside[edit.region] = False
        assert np.array_equal(old[outside], edit.labels[outside])
    else:
        assert edit.n_pixels == 0


# ------------------------------------------------------------------------------ basics


def test_next_free_id_and_label_at():
    lab = squares()
    assert E.next_free_id(lab) == 6
    assert E.next_free_id(np.zeros((3, 3), np.uint8)) == 1
    assert E.label_at(lab, (2.4, 7.6)) == 2
    assert E.label_at(lab, (0, 0)) == 0
    with pytest.raises(ValueError, match="outside"):
        E.label_at(lab, (12, 0))


def test_delete_at_removes_one_nucleus_and_leaves_the_input_alone():
    lab = squares()
    before = lab.copy()
    edit = E.delete_at(lab, (2, 7))
    np.testing.assert_array_equal(lab, before)
    check_edit(lab, edit)
    assert edit.removed_ids == (2,) and edit.changed_ids == (2,) and edit.new_ids == ()
    assert not (edit.labels == 2).any()
    assert (edit.labels == 1).sum() == 16 and (edit.labels == 5).sum() == 24
    assert edit.region == (slice(1, 5), slice(6, 10))
    nothing = E.delete_at(lab, (0, 0))
    assert not nothing.changed and nothing.changed_ids == ()
    check_edit(lab, nothing)


def test_merge_gives_the_smallest_id():
    lab = squares()
    edit = E.merge(lab, [5, 2])
    check_edit(lab, edit)
    assert (edit.labels == 2).sum() == 16 + 24
    assert edit.removed_ids == (5,) and edit.changed_ids == (2, 5)
    edit = E.merge(lab, [1, 2], target=9)
    assert edit.new_ids == (9,) and set(edit.removed_ids) == {1, 2}
    with pytest.raises(ValueError, match="at least two"):
        E.merge(lab, [1, 3])  # 3 is not in the image
    with pytest.raises(ValueError, match="at least two"):
        E.merge(lab, [2])


def test_split_by_seeds_splits_a_dumbbell_into_two():
    lab = dumbbell()
    edit = E.split_by_seeds(lab, [(15, 12), (15, 37)])
    check_edit(lab, edit)
    new = edit.labels
    assert edit.new_ids == (5,) and edit.changed_ids == (4, 5)
    assert set(np.unique(new)) == {0, 4, 5}
    np.testing.assert_array_equal(new > 0, lab > 0)  # no pixel lost or gained
    assert new[15, 12] == 4 and new[15, 37] == 5
    # each disk is (almost) entirely one piece and the cut lies on the neck
    left = (lab > 0) & (np.arange(50)[None, :] < 20)
    right = (lab > 0) & (np.arange(50)[None, :] > 30)
    assert (new[left] == 4).all() and (new[right] == 5).all()
    assert 20 <= np.flatnonzero((new == 5).any(0)).min() <= 30
    # both pieces are connected
    from scipy import ndimage as ndi

    assert ndi.label(new == 4)[1] == 1 and ndi.label(new == 5)[1] == 1


def test_split_by_seeds_rejects_bad_seeds():
    lab = squares()
    with pytest.raises(ValueError, match="different nuclei"):
        E.split_by_seeds(lab, [(2, 2), (2, 7)])
    with pytest.raises(ValueError, match="background"):
        E.split_by_seeds(lab, [(2, 2), (0, 0)])
    with pytest.raises(ValueError, match="two different"):
        E.split_by_seeds(lab, [(2, 2), (2.2, 2.1)])


def test_split_by_seeds_three_pieces():
    lab = np.zeros((10, 30), np.int32)
    lab[2:8, 1:29] = 3
    edit = E.split_by_seeds(lab, [(5, 3), (5, 15), (5, 26)])
    assert edit.new_ids == (4, 5)
    assert edit.labels[5, 3] == 3 and edit.labels[5, 15] == 4 and edit.labels[5, 26] == 5


def test_split_by_line_cuts_the_crossed_nucleus():
    lab = squares()
    # a vertical cut through nucleus 5 (rows 7-10, cols 2-7), from above to below it
    edit = E.split_by_line(lab, [(6, 4.2), (11.4, 4.2)])
    check_edit(lab, edit)
    new = edit.labels
    np.testing.assert_array_equal(new > 0, lab > 0)
    assert edit.new_ids == (6,) and edit.changed_ids == (5, 6)
    # the larger piece keeps the id; the cut column joins a neighbouring piece
    assert (new[7:11, 2:4] != new[7:11, 5:8][:, :1]).all()
    sizes = {i: int((new == i).sum()) for i in (5, 6)}
    assert sizes[5] >= sizes[6] > 0 and sizes[5] + sizes[6] == 24
    # nuclei 1 and 2 are untouched
    np.testing.assert_array_equal(new[:6], lab[:6])


def test_split_by_line_diagonal_and_grazing():
    lab = np.zeros((20, 20), np.int32)
    lab[3:17, 3:17] = 7
    edit = E.split_by_line(lab, [(0, 0), (19, 19)])
    assert edit.new_ids == (8,)
    new = edit.labels
    assert new[4, 15] != new[15, 4]
    assert (new[3:17, 3:17] > 0).all()
    # a line that only enters the nucleus does not split it
    assert not E.split_by_line(lab, [(0, 10), (8, 10)]).changed
    # a polyline with a bend, cutting a corner off
    edit = E.split_by_line(lab, [(0, 12), (10, 12), (10, 19)])
    assert edit.changed and len(edit.new_ids) == 1
    with pytest.raises(ValueError, match="two points"):
        E.split_by_line(lab, [(1, 1)])


def test_fill_holes_per_nucleus():
    lab = np.zeros((14, 20), np.int32)
    lab[1:8, 1:8] = 1
    lab[3:5, 3:5] = 0  # hole of nucleus 1 -> filled
    lab[1:8, 10:19] = 2
    lab[3:5, 13:16] = 3  # a nucleus inside nucleus 2: not a hole, untouched
    lab[9:13, 1:6] = 4
    lab[9:13, 6:11] = 5
    lab[10:12, 5:7] = 0  # a gap enclosed by 4 and 5 together: not a hole of either
    lab[12, 14] = 6  # background touching the border stays background
    edit = E.fill_holes(lab)
    check_edit(lab, edit)
    assert edit.changed_ids == (1,)
    assert (edit.labels[3:5, 3:5] == 1).all()
    assert (edit.labels[3:5, 13:16] == 3).all()
    assert (edit.labels[10:12, 5:7] == 0).all()
    assert not E.fill_holes(edit.labels).changed
    assert not E.fill_holes(lab, max_size=3).changed  # the hole has 4 pixels


def test_remove_small_nuclei_and_fragments():
    lab = squares()
    lab[11, 11] = 8  # a one-pixel nucleus
    lab[6, 0] = 1  # a stray fragment of nucleus 1 (not touching it)
    edit = E.remove_small(lab, 3)
    check_edit(lab, edit)
    assert edit.removed_ids == (8,) and edit.changed_ids == (1, 8)
    assert edit.labels[6, 0] == 0 and (edit.labels == 1).sum() == 16
    assert not E.remove_small(lab, 1).changed
    edit = E.remove_small(lab, 20)  # the 16-pixel squares go too
    assert set(edit.removed_ids) == {1, 2, 8} and (edit.labels == 5).sum() == 24
    with pytest.raises(ValueError):
        E.remove_small(lab, -1)


def test_relabel_sequential_keeps_dtype_and_reports_mapping():
    lab = squares().astype(np.uint16)
    lab[lab == 2] = 40
    edit = E.relabel_sequential(lab)
    check_edit(lab, edit)
    assert edit.labels.dtype == np.uint16
    assert edit.mapping == {1: 1, 5: 2, 40: 3}
    assert set(np.unique(edit.labels)) == {0, 1, 2, 3}
    assert (edit.labels == 3).sum() == (lab == 40).sum()


def test_edits_accept_bool_and_reject_bad_labels():
    with pytest.raises(InputError):
        E.delete_at(np.full((4, 4), -1, np.int32), (0, 0))
    with pytest.raises(InputError):
        E.fill_holes(np.full((4, 4), 0.5))


# ------------------------------------------------------------------------------ status


def test_update_status_and_csv_roundtrip():
    status = {1: "verified", 2: "predicted", 9: "edited"}
    out = E.update_status(status, [1, 2, 3], edited=[2])
    assert out == {1: "verified", 2: "edited", 3: "predicted"}
    out = E.update_status(out, [1, 2, 3, 4], edited=[1], default="edited")
    assert out == {1: "edited", 2: "edited", 3: "predicted", 4: "edited"}
    cols = E.status_columns({3: "verified", 1: "edited"})
    assert cols["index"].tolist() == [1, 3] and cols["status"].tolist() == ["edited", "verified"]
    text = E.status_to_csv(out)
    assert text.splitlines()[0] == "label,status"
    assert E.status_from_csv(text) == out
    with pytest.raises(InputError, match="unknown status"):
        E.status_from_csv("label,status\n1,done\n")
    with pytest.raises(InputError, match="columns"):
        E.status_from_csv("id,state\n1,edited\n")
    with pytest.raises(InputError, match="line 3"):
        E.status_from_csv("label,status\n1,edited\nx,edited\n")
    with pytest.raises(ValueError):
        E.update_status({}, [1], default="done")


# ---------------------------------------------------------------------------- outcomes


def outcome_case() -> tuple[np.ndarray, np.ndarray]:
    """gt 1 matched; gt 2 missed (FN); pred 3 alone (FP); gt 4 split in three; pred 8 merges gt 5, 6."""
    gt = np.zeros((20, 40), np.int32)
    pred = np.zeros_like(gt)
    gt[1:5, 1:5] = 1
    pred[1:5, 1:5] = 1
    gt[1:5, 8:12] = 2  # FN, 16 px
    pred[1:7, 15:21] = 3  # FP, 36 px
    gt[10:16, 1:9] = 4
    pred[10:16, 1:4] = 4
    pred[10:16, 4:7] = 5
    pred[10:16, 7:9] = 6
    gt[10:16, 20:24] = 5
    gt[10:16, 25:29] = 6
    pred[10:16, 20:29] = 8
    return gt, pred


def test_outcome_image_codes():
    gt, pred = outcome_case()
    table = M.overlap_table(gt, pred)
    out = E.outcome_image(gt, pred, M.instance_outcomes(table))
    code = E.OUTCOME_CODES
    assert out.dtype == np.uint8
    assert (out[gt == 1] == code["tp"]).all()
    assert (out[gt == 2] == code["fn"]).all()
    assert (out[pred == 3] == code["fp"]).all()
    assert (out[gt == 4] == code["split"]).all()
    assert (out[pred == 8] == code["merge"]).all()
    assert (out[(gt == 0) & (pred == 0)] == 0).all()


def test_rank_errors_groups_and_orders():
    gt, pred = outcome_case()
    table = M.overlap_table(gt, pred)
    items = E.rank_errors(table, M.instance_outcomes(table), metric="aji")
    kinds = {e.kind: e for e in items}
    assert set(kinds) == {"fp", "fn", "split", "merge"}
    assert kinds["fp"].pred_ids == (3,) and kinds["fp"].gt_ids == ()
    assert kinds["fn"].gt_ids == (2,)
    assert kinds["split"].gt_ids == (4,) and kinds["split"].pred_ids == (4, 5, 6)
    assert kinds["merge"].pred_ids == (8,) and kinds["merge"].gt_ids == (5, 6)
    assert [e.gain for e in items] == sorted((e.gain for e in items), reverse=True)
    assert all(e.gain > 0 for e in items)
    assert kinds["split"].label == "split gt 4 (3 pieces)"
    # the AJI sums behind the estimate are the metrics module's
    scores = M.evaluate_table(table)
    aji = E._Aji(table)
    assert (aji.total_c, aji.total_u) == (scores.aji_c, scores.aji_u)


def _fixed(gt, pred, item):
    """Apply an error's fix: drop its predictions, copy its gt nuclei into the prediction."""
    out = pred.copy()
    out[np.isin(out, item.pred_ids)] = 0
    for k, g in enumerate(item.gt_ids):
        out[gt == g] = 100 + k
    return out


@pytest.mark.parametrize("metric", ["aji", "pq", "accuracy", "f1"])
def test_rank_errors_gain_is_exact_for_isolated_errors(metric):
    gt, pred = outcome_case()
    table = M.overlap_table(gt, pred)
    items = E.rank_errors(table, M.instance_outcomes(table), metric=metric)
    base = M.evaluate(gt, pred)
    key = {"aji": "aji", "pq": "pq"}.get(metric)
    for item in items:
        after = M.evaluate(gt, _fixed(gt, pred, item))
        if key:
            want = getattr(after, key) - getattr(base, key)
        else:
            want = getattr(after, metric)[0.5] - getattr(base, metric)[0.5]
        assert item.gain == pytest.approx(want, abs=1e-12), item


def test_rank_errors_orders_by_area_for_aji():
    gt = np.zeros((20, 20), np.int32)
    pred = np.zeros_like(gt)
    gt[0:5, 0:5] = 1
    pred[0:5, 0:5] = 1
    pred[10:12, 10:12] = 2  # small FP
    pred[14:20, 0:6] = 3  # large FP
    gt[10:12, 0:2] = 2  # small FN
    gt[0:8, 12:20] = 3  # large FN
    table = M.overlap_table(gt, pred)
    items = E.rank_errors(table, M.instance_outcomes(table))
    assert [e.label for e in items] == ["FN gt 3", "FP pred 3", "FN gt 2", "FP pred 2"]
    with pytest.raises(ValueError, match="unknown metric"):
        E.rank_errors(table, M.instance_outcomes(table), metric="dice")


def test_error_bbox():
    gt, pred = outcome_case()
    table = M.overlap_table(gt, pred)
    merge = next(e for e in E.rank_errors(table, M.instance_outcomes(table)) if e.kind == "merge")
    centre, box = E.error_bbox(gt, pred, merge)
    assert box == (slice(10, 16), slice(20, 29))
    assert centre == (12.5, 24.0)
    gone = E.ErrorItem("fp", (), (77,), 0.0, 1)
    assert E.error_bbox(gt, pred, gone) is None
