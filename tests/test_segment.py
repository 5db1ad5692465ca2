import numpy as np
import pytest
from skimage.transform import rescale

from napari_medinst.metrics import evaluate
from napari_medinst.samples import load_sample
from napari_medinst.segment import segment


@pytest.fixture(scope="module")
def he():
    return load_sample("he")


def test_bundled_model_beats_classical_on_the_sample(he):
    image, truth, info = he
    model = evaluate(truth, segment(image, "default", pixel_size=info.pixel_size).labels)
    classical = evaluate(truth, segment(image, "classical", pixel_size=info.pixel_size).labels)
    assert model.aji > classical.aji and model.pq > classical.pq


def test_pixel_size_is_estimated_at_40x_and_20x(he):
    image, truth, _ = he
    at40 = segment(image, "default")
    assert at40.maps.pixel_size_estimated and 0.2 <= at40.maps.pixel_size <= 0.32
    img20 = np.round(rescale(image, 0.5, channel_axis=2, preserve_range=True)).astype(np.uint8)
    at20 = segment(img20, "default")
    assert 0.38 <= at20.maps.pixel_size <= 0.65  # found the 20x scale by itself
    gt20 = rescale(truth, 0.5, order=0, preserve_range=True, anti_aliasing=False).astype(np.int32)
    given = segment(img20, "default", pixel_size=0.5)
    assert evaluate(gt20, at20.labels).aji >= evaluate(gt20, given.labels).aji - 0.05


def test_segment_outputs_are_consistent(he):
    image, _, info = he
    seg = segment(image, "default", pixel_size=info.pixel_size)
    assert seg.labels.dtype == np.uint32 and seg.labels.shape == image.shape[:2]
    assert seg.scores.shape == (int(seg.labels.max()),)
    assert np.all((seg.scores >= 0) & (seg.scores <= 1))
    assert seg.maps.maps.prob.shape == image.shape[:2]


def test_huge_image_is_refused_before_any_work(monkeypatch):
    from napari_medinst import segment as seg_mod
    from napari_medinst._io import InputError

    monkeypatch.setattr(seg_mod, "MAX_PIXELS", 10_000)
    with pytest.raises(InputError, match="crop a region"):
        segment(np.zeros((200, 200), np.uint8), "classical")
