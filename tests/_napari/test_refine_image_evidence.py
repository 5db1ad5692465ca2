"""The editor's O key reads the image even when the model maps are there (issue #15)."""

from __future__ import annotations

import numpy as np
import pytest
from napari.utils.key_bindings import coerce_keybinding
from scipy import ndimage as ndi

from napari_medinst._napari._contract import POSTPROCESSOR_KEY
from napari_medinst._napari._editing import editor_for, start_from_prediction
from napari_medinst._napari._evaluate_widget import RECOVERY_ENV
from napari_medinst.postprocess import Postprocessor
from napari_medinst.targets import make_targets

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def recovery(tmp_path, monkeypatch):
    """Never touch the user's real recovery folder."""
    monkeypatch.setenv(RECOVERY_ENV, str(tmp_path / "recovery"))


def discs(shape=(120, 120), centres=((40, 40), (40, 64), (80, 60)), radius=11) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    d = np.stack([(rr - r) ** 2 + (cc - c) ** 2 for r, c in centres])
    return np.where(d.min(0) <= radius**2, d.argmin(0) + 1, 0).astype(np.int32)


def he_image(truth: np.ndarray) -> np.ndarray:
    """H&E-like RGB whose stain (optical density) is blurred by 1.5 px."""
    rng = np.random.default_rng(0)
    soft = ndi.gaussian_filter((truth > 0).astype(np.float64), 1.5)
    pink, purple = -np.log([0.93, 0.75, 0.85]), -np.log([0.35, 0.25, 0.55])
    rgb = np.exp(-(pink + soft[..., None] * (purple - pink))) + rng.normal(0, 0.02, (120, 120, 3))
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_o_key_moves_the_outline_to_the_image_edge_with_maps(make_napari_viewer):
    """The maps agree with a 2 px too large outline; the image shows the real edge."""
    truth = discs()
    wrong = truth.copy()
    wrong[(ndi.distance_transform_edt(truth != 1) <= 2) & (truth == 0)] = 1
    viewer = make_napari_viewer()
    viewer.add_image(he_image(truth), name="slide", rgb=True)
    pred = viewer.add_labels(wrong, name="instances")
    t = make_targets(wrong)  # the model's opinion is the wrong outline
    pred.metadata[POSTPROCESSOR_KEY] = Postprocessor(
        t.foreground.astype(np.float32), t.hv, t.contour.astype(np.float32)
    )
    gt = start_from_prediction(viewer, pred)
    editor = editor_for(viewer, gt)
    start = np.array(gt.data, copy=True)
    viewer.cursor.position = tuple(gt.data_to_world((40, 40)))
    gt.keymap[coerce_keybinding("O")](gt)
    after = np.asarray(gt.data)
    assert iou(start == 1, truth == 1) < 0.75 and iou(after == 1, truth == 1) >= 0.9
    np.testing.assert_array_equal(after[start > 1], start[start > 1])
    assert editor.status[1] == "edited"
    gt.undo()
    np.testing.assert_array_equal(gt.data, start)
