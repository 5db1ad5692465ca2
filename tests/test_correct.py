"""Tests of napari_medinst.correct: one-click corrections on synthetic nuclei."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_medinst import correct as C
from napari_medinst import editing as E
from napari_medinst.postprocess import Postprocessor
from napari_medinst.targets import make_targets

# ----------------------------------------------------------------------------- helpers


def discs(shape=(120, 120), centres=((40, 40), (40, 64), (80, 60)), radius=11) -> np.ndarray:
    """Disks (ids 1..n); where two overlap, each pixel goes to the nearer centre."""
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    d = np.stack([(rr - r) ** 2 + (cc - c) ** 2 for r, c in centres])
    out = np.where(d.min(0) <= radius**2, d.argmin(0) + 1, 0)
    return out.astype(np.int32)


def model_maps(truth: np.ndarray) -> dict[str, np.ndarray]:
    """Perfect model maps of ``truth``: probability, HV maps and contour."""
    t = make_targets(truth)
    return {
        "prob": t.foreground.astype(np.float32),
        "hv": t.hv,
        "contour": t.contour.astype(np.float32),
    }


def grey_image(truth: np.ndarray, seed: int = 0) -> np.ndarray:
    """Fluorescence-like: bright nuclei on a dark, noisy background."""
    rng = np.random.default_rng(seed)
    img = np.where(truth > 0, 0.8, 0.2) + rng.normal(0, 0.08, truth.shape)
    return (np.clip(img, 0, 1) * 65535).astype(np.uint16)


def he_image(truth: np.ndarray, seed: int = 0) -> np.ndarray:
    """H&E-like RGB: purple nuclei on pink, with noise."""
    rng = np.random.default_rng(seed)
    pink, purple = np.array([0.93, 0.75, 0.85]), np.array([0.35, 0.25, 0.55])
    rgb = np.where(truth[..., None] > 0, purple, pink) + rng.normal(0, 0.03, (*truth.shape, 3))
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def check_edit(old: np.ndarray, edit: E.Edit) -> None:
    """The edit's pixel list turns ``old`` into ``edit.labels``; the region bounds it."""
    rebuilt = old.copy()
    rebuilt[edit.indices] = edit.values
    np.testing.assert_array_equal(rebuilt, edit.labels)
    assert edit.labels.dtype == old.dtype
    outside = np.ones(old.shape, bool)
    outside[edit.region] = False
    np.testing.assert_array_equal(old[outside], edit.labels[outside])


def touching_pair(r: int = 13):
    """Two disks whose overlap is cut by a straight contact line, as one nucleus (id 3)."""
    truth = discs((60, 80), ((30, 28), (30, 50)), r)
    merged = np.where(truth > 0, 3, 0).astype(np.int32)
    return truth, merged


# ------------------------------------------------------------------------------- split

# one seed at the centre of the left nucleus, one near the far edge of the right one
SEEDS = [(30, 28), (30, 60)]


def test_split_by_seeds_floods_one_side_of_touching_nuclei():
    """The failure the new split fixes: the deeper seed takes almost everything."""
    _, merged = touching_pair()
    new = E.split_by_seeds(merged, SEEDS).labels
    small = min((new == 3).sum(), (new != 3).sum() - (new == 0).sum())
    assert small < 0.05 * (merged > 0).sum()


@pytest.mark.parametrize("with_maps", [False, True])
def test_split_two_seeds_gives_both_nuclei_their_share(with_maps):
    truth, merged = touching_pair()
    edit = C.split_two_seeds(merged, SEEDS, model_maps(truth) if with_maps else None)
    check_edit(merged, edit)
    new = edit.labels
    np.testing.assert_array_equal(new > 0, merged > 0)  # no pixel lost or gained
    assert edit.new_ids == (4,) and new[SEEDS[0]] == 3 and new[SEEDS[1]] == 4
    area = (merged > 0).sum()
    assert (new == 3).sum() >= 0.35 * area and (new == 4).sum() >= 0.35 * area
    # the cut falls on the contact line
    assert iou(new == 3, truth == 1) >= 0.9 and iou(new == 4, truth == 2) >= 0.9
    assert ndi.label(new == 3)[1] == 1 and ndi.label(new == 4)[1] == 1


def test_split_two_seeds_without_a_neck_splits_between_the_seeds():
    lab = np.zeros((20, 40), np.uint16)
    lab[4:16, 4:36] = 9  # a rectangle: no neck, one distance ridge
    edit = C.split_two_seeds(lab, [(10, 10), (10, 30)])
    new = edit.labels
    assert (new == 9).sum() >= 0.35 * (lab > 0).sum() and (new == 10).sum() >= 0.35 * 384
    assert new.dtype == np.uint16


@pytest.mark.parametrize(
    ("seeds", "match"),
    [
        ([(30, 28), (5, 5)], "background"),
        ([(30, 28), (80, 5)], "outside"),
        ([(30, 28), (30, 28.2)], "different pixels"),
        ([(30, 28)], "exactly two"),
    ],
)
def test_split_two_seeds_refusals_leave_labels_unchanged(seeds, match):
    _, merged = touching_pair()
    before = merged.copy()
    with pytest.raises(C.CorrectionRefused, match=match):
        C.split_two_seeds(merged, seeds)
    np.testing.assert_array_equal(merged, before)


def test_split_two_seeds_refuses_seeds_in_two_nuclei_and_a_tiny_nucleus():
    lab = discs()
    lab[100, 100] = 7  # a one-pixel nucleus
    lab[110:112, 100] = 8  # a two-pixel nucleus
    before = lab.copy()
    with pytest.raises(C.CorrectionRefused, match="different nuclei"):
        C.split_two_seeds(lab, [(40, 40), (40, 64)])
    with pytest.raises(C.CorrectionRefused, match="too small to split"):
        C.split_two_seeds(lab, [(100, 100), (100, 100)])
    with pytest.raises(C.CorrectionRefused, match="too small to split"):
        C.split_two_seeds(lab, [(110, 100), (111, 100)])
    assert issubclass(C.CorrectionRefused, ValueError)
    np.testing.assert_array_equal(lab, before)


# --------------------------------------------------------------------------------- add


def missed(truth: np.ndarray, i: int = 2) -> np.ndarray:
    lab = truth.copy()
    lab[lab == i] = 0
    return lab


@pytest.mark.parametrize(
    "source", ["maps", "postprocessor", "grey image", "H&E image", "H&E channels first"]
)
def test_add_nucleus_at_grows_the_missed_nucleus(source):
    truth = discs()
    lab = missed(truth)
    maps = model_maps(truth)
    inputs = {
        "maps": {"maps": maps},
        "postprocessor": {"maps": Postprocessor(maps["prob"], maps["hv"], maps["contour"])},
        "grey image": {"image": grey_image(truth)},
        "H&E image": {"image": he_image(truth)},
        "H&E channels first": {"image": np.moveaxis(he_image(truth), -1, 0)},
    }[source]
    click = (45, 60)  # off-centre, inside the missed nucleus 2 (centre 40, 64)
    edit = C.add_nucleus_at(lab, click, **inputs)
    check_edit(lab, edit)
    assert edit.new_ids == (4,) and edit.changed_ids == (4,)
    assert iou(edit.labels == 4, truth == 2) >= 0.8
    np.testing.assert_array_equal(edit.labels[lab > 0], lab[lab > 0])  # neighbours kept


def test_add_nucleus_at_is_local_on_a_large_image():
    """On a 2000 x 2000 image the result equals the one on a small crop."""
    truth = discs()
    lab = missed(truth)
    big = np.zeros((2000, 2000), np.int32)
    big[1000:1120, 1500:1620] = lab
    maps = model_maps(truth)
    big_maps = {k: np.zeros(v.shape[:-2] + big.shape, np.float32) for k, v in maps.items()}
    for k, v in maps.items():
        big_maps[k][..., 1000:1120, 1500:1620] = v
    small = C.add_nucleus_at(lab, (45, 60), maps).labels
    edit = C.add_nucleus_at(big, (1045, 1560), big_maps)
    np.testing.assert_array_equal(edit.labels[1000:1120, 1500:1620], small)
    assert edit.region[0].stop - edit.region[0].start <= 30


@pytest.mark.parametrize("inputs", ["maps", "grey image", "H&E image"])
def test_add_nucleus_at_refuses_background_and_bad_clicks(inputs):
    truth = discs()
    lab = missed(truth)
    kw = {
        "maps": {"maps": model_maps(truth)},
        "grey image": {"image": grey_image(truth)},
        "H&E image": {"image": he_image(truth)},
    }[inputs]
    before = lab.copy()
    with pytest.raises(C.CorrectionRefused, match="no nucleus under the click"):
        C.add_nucleus_at(lab, (110, 10), **kw)
    with pytest.raises(C.CorrectionRefused, match="outside"):
        C.add_nucleus_at(lab, (-3, 10), **kw)
    with pytest.raises(C.CorrectionRefused, match="already here"):
        C.add_nucleus_at(lab, (40, 40), **kw)
    np.testing.assert_array_equal(lab, before)


def test_add_nucleus_at_refuses_without_inputs_or_with_mismatched_ones():
    truth = discs()
    lab = missed(truth)
    with pytest.raises(C.CorrectionRefused, match="no model maps and no image"):
        C.add_nucleus_at(lab, (40, 64))
    with pytest.raises(C.CorrectionRefused, match="labels are"):
        C.add_nucleus_at(lab, (40, 64), image=grey_image(truth)[:100])
    with pytest.raises(C.CorrectionRefused, match="run the model"):
        C.add_nucleus_at(lab, (40, 64), model_maps(truth[:, :100]))
    with pytest.raises(C.CorrectionRefused, match="flat"):
        C.add_nucleus_at(lab, (40, 64), image=np.full(lab.shape, 7, np.uint8))
    with pytest.raises(C.CorrectionRefused, match="unknown stain"):
        C.add_nucleus_at(lab, (40, 64), image=grey_image(truth), stain="eosin")


# ------------------------------------------------------------------------------ refine


def loose(truth: np.ndarray, i: int = 1, px: int = 3) -> np.ndarray:
    """``truth`` with nucleus ``i`` dilated by ``px`` into the background."""
    lab = truth.copy()
    lab[(ndi.distance_transform_edt(truth != i) <= px) & (truth == 0)] = i
    return lab


@pytest.mark.parametrize("source", ["maps", "grey image", "H&E image"])
def test_refine_outline_fits_a_loose_outline(source):
    truth = discs()
    lab = loose(truth)
    kw = {
        "maps": {"maps": model_maps(truth)},
        "grey image": {"image": grey_image(truth)},
        "H&E image": {"image": he_image(truth)},
    }[source]
    edit = C.refine_outline(lab, 1, **kw)
    check_edit(lab, edit)
    before, after = iou(lab == 1, truth == 1), iou(edit.labels == 1, truth == 1)
    assert before < 0.7 and after >= 0.9
    # the neighbour it touches is never changed
    np.testing.assert_array_equal(edit.labels == 2, lab == 2)
    assert edit.changed_ids == (1,)


def test_refine_outline_refusals():
    truth = discs()
    lab = loose(truth)
    before = lab.copy()
    with pytest.raises(C.CorrectionRefused, match="no nucleus 9"):
        C.refine_outline(lab, 9, image=grey_image(truth))
    with pytest.raises(C.CorrectionRefused, match="no model maps and no image"):
        C.refine_outline(lab, 1)
    blank = {"prob": np.zeros(lab.shape, np.float32), "hv": np.zeros((2, *lab.shape))}
    with pytest.raises(C.CorrectionRefused, match="keep only 0"):
        C.refine_outline(lab, 1, blank)
    np.testing.assert_array_equal(lab, before)


# ------------------------------------------------------------- refine: image evidence


def blurred_image(truth: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """``truth``'s nuclei as a blurred (sigma 1.5 px) image: grey, or H&E-like RGB.

    The RGB image blurs the stain (its optical density, Beer-Lambert), not the light.
    """
    rng = np.random.default_rng(seed)
    soft = ndi.gaussian_filter((truth > 0).astype(np.float64), 1.5)
    if kind == "grey":
        img = 0.2 + 0.6 * soft + rng.normal(0, 0.03, truth.shape)
        return (np.clip(img, 0, 1) * 65535).astype(np.uint16)
    pink, purple = -np.log([0.93, 0.75, 0.85]), -np.log([0.35, 0.25, 0.55])
    rgb = np.exp(-(pink + soft[..., None] * (purple - pink)))
    rgb += rng.normal(0, 0.02, rgb.shape)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def moved(truth: np.ndarray, px: int, i: int = 1) -> np.ndarray:
    """``truth`` with nucleus ``i`` grown (px > 0, into the background) or shrunk (px < 0)."""
    lab = truth.copy()
    if px > 0:
        lab[(ndi.distance_transform_edt(truth != i) <= px) & (truth == 0)] = i
    else:
        lab[(truth == i) & (ndi.distance_transform_edt(truth == i) <= -px)] = 0
    return lab


@pytest.mark.parametrize("kind", ["grey", "H&E"])
@pytest.mark.parametrize("px", [-2, 2])
@pytest.mark.parametrize("with_maps", [True, False])
def test_refine_outline_moves_a_wrong_outline_to_the_image_edge(kind, px, with_maps):
    """The outline is 2 px too small / large and the model maps agree with it (the model
    has that opinion): only the image can fix it, and O does, leaving neighbours alone."""
    truth = discs()
    lab = moved(truth, px)
    maps = model_maps(lab) if with_maps else None
    edit = C.refine_outline(lab, 1, maps, blurred_image(truth, kind), near=(40, 40))
    check_edit(lab, edit)
    before, after = iou(lab == 1, truth == 1), iou(edit.labels == 1, truth == 1)
    assert before < 0.75 and after >= 0.9
    np.testing.assert_array_equal(edit.labels[lab > 1], lab[lab > 1])  # neighbours kept
    assert set(np.unique(edit.labels[edit.indices])) <= {0, 1}
    assert edit.changed_ids == (1,) and ndi.label(edit.labels == 1)[1] == 1


def test_refine_outline_without_the_image_keeps_the_maps_opinion():
    """Maps only: the refit follows the maps (here the wrong outline): the image is needed."""
    truth = discs()
    lab = moved(truth, 2)
    edit = C.refine_outline(lab, 1, model_maps(lab))
    assert iou(edit.labels == 1, lab == 1) >= 0.95


def test_refine_outline_refuses_an_outline_already_on_the_edge():
    truth = discs()
    before = truth.copy()
    with pytest.raises(C.CorrectionRefused, match="already lies on the strongest image edge"):
        C.refine_outline(truth, 1, model_maps(truth), blurred_image(truth, "H&E"))
    with pytest.raises(C.CorrectionRefused, match="labels are"):
        C.refine_outline(truth, 1, model_maps(truth), blurred_image(truth, "grey")[:100])
    with pytest.raises(C.CorrectionRefused, match="unknown stain"):
        C.refine_outline(truth, 1, model_maps(truth), blurred_image(truth, "grey"), stain="x")
    np.testing.assert_array_equal(truth, before)


def test_refine_outline_never_takes_a_touching_neighbour():
    """A neighbour touching the nucleus is nuclear signal too: it keeps every pixel."""
    truth = discs(centres=((40, 40), (40, 60)))  # overlapping disks: a shared border
    lab = moved(truth, -2)
    edit = C.refine_outline(lab, 1, None, blurred_image(truth, "H&E"))
    np.testing.assert_array_equal(edit.labels == 2, lab == 2)
    assert iou(edit.labels == 1, truth == 1) > iou(lab == 1, truth == 1)


# ------------------------------------------------------------------------ grow, shrink


def test_grow_and_shrink_by_one_pixel_never_touch_neighbours():
    truth = discs()
    area = (truth == 1).sum()
    g = C.grow(truth, 1)
    check_edit(truth, g)
    assert (g.labels == 1).sum() > area and g.changed_ids == (1,)
    np.testing.assert_array_equal(g.labels[truth > 1], truth[truth > 1])
    assert set(np.unique(truth[g.indices])) == {0}
    s = C.shrink(truth, 1, near=(40, 40))
    check_edit(truth, s)
    assert (s.labels == 1).sum() < area and set(np.unique(s.values)) == {0}
    assert (C.shrink(g.labels, 1).labels == 1).sum() <= area  # shrink undoes grow


def test_shrink_counts_the_image_border_as_outside():
    lab = np.zeros((10, 10), np.int32)
    lab[0:5, 0:5] = 1
    new = C.shrink(lab, 1).labels
    assert (new == 1).sum() == 9 and new[0, 0] == 0 and new[1:4, 1:4].all()


def test_grow_shrink_refusals():
    lab = np.zeros((10, 10), np.int32)
    lab[5, 5] = 4
    before = lab.copy()
    with pytest.raises(C.CorrectionRefused, match="too small to shrink"):
        C.shrink(lab, 4)
    with pytest.raises(C.CorrectionRefused, match="no nucleus 3"):
        C.grow(lab, 3)
    with pytest.raises(C.CorrectionRefused, match="whole number"):
        C.grow(lab, 4, px=0)
    with pytest.raises(C.CorrectionRefused, match="background"):
        C.grow(lab, 0)
    full = np.ones((4, 4), np.int32)
    full[0] = 2
    with pytest.raises(C.CorrectionRefused, match="no background"):
        C.grow(full, 1)
    np.testing.assert_array_equal(lab, before)


# ----------------------------------------------------------------------------- polygon


def test_polygon_nucleus_fills_only_background():
    lab = discs()
    square = [(20, 20), (20, 60), (60, 60), (60, 20)]
    edit = C.polygon_nucleus(lab, square)
    check_edit(lab, edit)
    assert edit.new_ids == (4,)
    new = edit.labels
    np.testing.assert_array_equal(new[lab > 0], lab[lab > 0])
    assert (new == 4).sum() == ((lab[20:61, 20:61] == 0).sum())
    over = C.polygon_nucleus(lab, square, overwrite=True)
    assert (over.labels[20:61, 20:61] == 4).all() and 1 in over.removed_ids


def test_polygon_nucleus_keeps_one_piece_and_clips_to_the_image():
    lab = np.zeros((30, 30), np.int32)
    lab[:, 14:16] = 1  # a wall cutting the outline in two
    edit = C.polygon_nucleus(lab, [(5, 2), (5, 24), (20, 24), (20, 2)])
    new = edit.labels == 2
    assert ndi.label(new)[1] == 1 and new[:, :14].any() and not new[:, 16:].any()  # the larger
    corner = C.polygon_nucleus(np.zeros((30, 30), np.uint8), [(-10, -10), (-10, 5), (5, 5)])
    assert corner.labels[0, 0] == 1 and corner.labels.dtype == np.uint8


def test_polygon_nucleus_refusals():
    lab = discs()
    before = lab.copy()
    with pytest.raises(C.CorrectionRefused, match="three points"):
        C.polygon_nucleus(lab, [(5, 5), (5, 20), (5.2, 20.1)])
    with pytest.raises(C.CorrectionRefused, match="outside"):
        C.polygon_nucleus(lab, [(-50, -50), (-50, -20), (-20, -20)])
    with pytest.raises(C.CorrectionRefused, match="only existing nuclei"):
        C.polygon_nucleus(lab, [(36, 36), (36, 44), (44, 44), (44, 36)])
    with pytest.raises(C.CorrectionRefused, match="not in the image"):
        C.polygon_nucleus(lab, [(5, 5), (5, np.nan), (20, 20)])
    full = np.full((5, 5), 255, np.uint8)
    full[0, 0] = 0
    with pytest.raises(C.CorrectionRefused, match="no free id"):
        C.polygon_nucleus(full, [(0, 0), (0, 2), (2, 0)])
    np.testing.assert_array_equal(lab, before)


def test_refine_outline_with_a_flat_image_falls_back_to_the_maps():
    """A blank image has no edge to choose by: O re-fits to the maps as without an image."""
    truth = discs()
    lab = moved(truth, 3)
    blank = np.zeros((*lab.shape, 3), np.uint8)
    edit = C.refine_outline(lab, 1, model_maps(truth), blank)
    np.testing.assert_array_equal(edit.labels, C.refine_outline(lab, 1, model_maps(truth)).labels)
    assert iou(edit.labels == 1, truth == 1) >= 0.9


# ------------------------------------------------------------ polygon: replace mode (Q)


def circle(centre, radius, n=48) -> np.ndarray:
    """Vertices (row, col) of a lasso drawn around a circle."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([centre[0] + radius * np.sin(t), centre[1] + radius * np.cos(t)], 1)


def disc_mask(shape, centre, radius) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius**2


def test_replace_redraws_the_nucleus_it_covers_keeping_its_id():
    lab = discs()  # 1 at (40, 40), 2 at (40, 64) touching it, 3 at (80, 60)
    lasso = circle((42, 36), 12)  # nucleus 1 drawn again, moved away from nucleus 2
    for keep in ((), (1,)):  # redrawn whatever its status (it becomes edited)
        edit = C.polygon_nucleus(lab, lasso, replace=True, keep=keep)
        check_edit(lab, edit)
        assert edit.redrawn and edit.nucleus == 1 and edit.new_ids == ()
        drawn = C.polygon_nucleus(np.zeros_like(lab), lasso).labels > 0
        np.testing.assert_array_equal(edit.labels == 1, drawn)
        assert edit.taken == {} and edit.removed_ids == ()
        assert not (edit.labels[(lab == 1) & ~drawn] == 1).any()  # the old outline is gone
        np.testing.assert_array_equal(edit.labels == 3, lab == 3)
        assert edit.message.startswith("nucleus 1 redrawn")
    # undoing the edit (old values at its pixels) restores the labels exactly
    undone = edit.labels.copy()
    undone[edit.indices] = lab[edit.indices]
    np.testing.assert_array_equal(undone, lab)


def test_replace_never_takes_pixels_of_a_verified_or_edited_neighbour():
    """A miss hidden under a neighbour's over-large outline, the neighbour verified."""
    shape = (80, 100)
    big = disc_mask(shape, (40, 40), 18).astype(np.int32) * 7  # covers half the miss
    miss = disc_mask(shape, (40, 62), 10)
    edit = C.polygon_nucleus(big, circle((40, 62), 10), replace=True, keep=[7])
    check_edit(big, edit)
    assert not edit.redrawn and edit.new_ids == (8,) and edit.taken == {}
    np.testing.assert_array_equal(edit.labels == 7, big == 7)  # every pixel kept
    assert ((edit.labels == 8) == (miss & (big == 0)) | ((edit.labels == 8) & ~miss)).all()
    assert edit.spared == (7,) and "nucleus 7 kept its pixels" in edit.message


def test_replace_takes_only_the_overlap_from_an_unverified_neighbour():
    shape = (80, 100)
    big = disc_mask(shape, (40, 40), 18).astype(np.int32) * 7
    lasso = circle((40, 62), 10)
    drawn = C.polygon_nucleus(np.zeros_like(big), lasso).labels > 0
    edit = C.polygon_nucleus(big, lasso, replace=True, keep=[3])  # 3: some other nucleus
    check_edit(big, edit)
    assert not edit.redrawn and edit.nucleus == 8
    np.testing.assert_array_equal(edit.labels == 8, drawn)  # the whole drawn shape
    np.testing.assert_array_equal(edit.labels == 7, (big == 7) & ~drawn)  # only the overlap
    assert ndi.label(edit.labels == 7)[1] == 1
    lost = int(((big == 7) & drawn).sum())
    assert edit.taken == {7: lost}
    assert edit.message == f"new nucleus 8; took {lost} px from nucleus 7"
    # a 10 px band across it cuts it in two: it keeps its larger piece, the other goes
    band = [(10, 30), (10, 40), (70, 40), (70, 30)]
    cut = C.polygon_nucleus(big, band, replace=True)
    left, right = (big == 7) & (np.arange(100) < 30), (big == 7) & (np.arange(100) > 40)
    assert not cut.redrawn and cut.nucleus == 8
    np.testing.assert_array_equal(cut.labels == 7, right)  # the larger piece
    assert not cut.labels[left].any()
    assert cut.taken[7] == int((big == 7).sum() - right.sum())


def test_replace_refusals_and_flags():
    lab = discs()
    with pytest.raises(C.CorrectionRefused, match="verified or edited"):
        C.polygon_nucleus(lab, [(36, 36), (36, 44), (44, 44), (44, 36)], replace=True, keep=[1, 2])
    with pytest.raises(ValueError, match="not both"):
        C.polygon_nucleus(lab, circle((40, 40), 5), replace=True, overwrite=True)
    # a small outline inside a kept nucleus does not redraw it: refused, unchanged
    with pytest.raises(C.CorrectionRefused, match="verified or edited"):
        C.polygon_nucleus(lab, circle((80, 60), 4), replace=True, keep=[3])
    # the same inside an unverified nucleus: a new nucleus carved out of it
    carved = C.polygon_nucleus(lab, circle((80, 60), 4), replace=True)
    assert not carved.redrawn and carved.nucleus == 4 and set(carved.taken) == {3}
    # an outline around all of nucleus 3 and much more: redrawn unless it is kept
    wide = circle((80, 60), 20)
    assert C.polygon_nucleus(lab, wide, replace=True).redrawn
    around = C.polygon_nucleus(lab, wide, replace=True, keep=[3])
    assert not around.redrawn and around.nucleus == 4 and around.spared == (3,)
    np.testing.assert_array_equal(around.labels == 3, lab == 3)
