"""Block-by-block segmentation of big images (napari_medinst.blockwise)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from napari_medinst import blockwise
from napari_medinst import segment as seg_mod
from napari_medinst.blockwise import Normalisation, plan_blocks, segment_blockwise
from napari_medinst.cli import main
from napari_medinst.metrics import evaluate
from napari_medinst.model.inference import CancelledError
from napari_medinst.preprocess import to_network_input
from napari_medinst.samples import DATA, load_sample


def _disks(shape=(400, 400), radius=7, spacing=24, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A dark 16-bit fluorescence image of jittered bright disks, and their labels."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    truth = np.zeros(shape, np.int32)
    k = 0
    for r in range(spacing // 2, shape[0] - radius, spacing):
        for c in range(spacing // 2, shape[1] - radius, spacing):
            r1, c1 = r + rng.integers(-3, 4), c + rng.integers(-3, 4)
            k += 1
            truth[(rr - r1) ** 2 + (cc - c1) ** 2 <= radius**2] = k
    img = (200 + 3000 * (truth > 0) + rng.normal(0, 40, shape)).clip(0, 65535)
    return img.astype(np.uint16), truth


def _he_mosaic(size=1500) -> np.ndarray:
    """The 512 px H&E sample mirrored into a seamless ``size`` px mosaic."""
    img = load_sample("he")[0]
    row = np.concatenate([img, img[:, ::-1], img], axis=1)
    return np.ascontiguousarray(np.concatenate([row, row[::-1], row], axis=0)[:size, :size])


def _one_piece_each(labels: np.ndarray) -> bool:
    boxes = ndi.find_objects(labels)
    for i, box in enumerate(boxes, start=1):
        if box is not None and ndi.label(labels[box] == i)[1] != 1:
            return False
    return True


def _centroid_rows_cols(labels: np.ndarray) -> np.ndarray:
    ids = np.arange(1, int(labels.max()) + 1)
    return np.array(ndi.center_of_mass(np.ones(labels.shape), labels, ids))


def test_blocks_partition_the_image_and_windows_hold_the_halo():
    specs = plan_blocks((1000, 700), block=256, halo=40, align=32)
    owner = np.zeros((1000, 700), np.int32)
    for s in specs:
        r0, r1, c0, c1 = s.core
        w0, w1, v0, v1 = s.window
        owner[r0:r1, c0:c1] += 1
        assert max(r1 - r0, c1 - c0) <= 256
        assert w0 % 32 == 0 and v0 % 32 == 0  # on the network's grid
        assert w0 <= max(0, r0 - 40) and v0 <= max(0, c0 - 40)
        assert w1 == min(1000, r1 + 40) and v1 == min(700, c1 + 40)
    assert np.all(owner == 1)  # every pixel in exactly one core
    assert len(specs) == 4 * 3


def test_normalisation_is_the_whole_images_and_the_same_in_every_block():
    fluo, _ = _disks((200, 300))
    he = load_sample("he")[0]
    cases = [
        (fluo, "fluorescence"),
        (he, "he"),
        (he.astype(np.uint16) * 200, "he"),  # 16-bit: scaled by its maximum
        (he.astype(np.float32), "he"),  # 0-255 floats
    ]
    for img, modality in cases:
        norm = Normalisation.of_image(img, modality)
        whole = to_network_input(img, modality)
        np.testing.assert_allclose(norm.apply(img), whole, atol=1e-5)
        # a dark corner block is not stretched to its own range
        np.testing.assert_allclose(norm.apply(img[:40, :50]), whole[:, :40, :50], atol=1e-5)


def test_classical_blocks_unique_whole_nuclei_and_every_block_covered():
    img, truth = _disks()
    done = []
    res = segment_blockwise(
        img,
        "classical",
        pixel_size=0.5,
        block=64,
        halo=20.0,
        progress=lambda i, n: done.append((i, n)),
    )
    lab = res.labels
    n = int(lab.max())
    assert lab.dtype == np.uint32 and lab.shape == img.shape
    assert res.n_blocks == 49 and done[-1] == (49, 49) and len(done) == 49
    assert np.array_equal(np.unique(lab), np.arange(n + 1))  # ids 1..n, unique
    assert res.scores.shape == (n,) and res.n_instances == n
    assert _one_piece_each(lab)  # no nucleus split at a block border
    for s in plan_blocks(img.shape, 64, 40):  # nuclei in every block
        r0, r1, c0, c1 = s.core
        assert lab[r0:r1, c0:c1].any()
    score = evaluate(truth, lab)  # nothing lost, nothing counted twice
    assert score.recall[0.5] == 1.0 and score.precision[0.5] == 1.0
    assert score.aji > 0.9


def test_cancel_stops_between_blocks():
    img, _ = _disks((200, 200))
    done = []
    with pytest.raises(CancelledError):
        segment_blockwise(
            img,
            "classical",
            pixel_size=0.5,
            block=64,
            halo=10.0,
            progress=lambda i, n: done.append(i),
            should_stop=lambda: len(done) >= 2,
        )
    assert done == [1, 2]


def test_pixel_size_is_estimated_once_on_a_central_crop(monkeypatch):
    img, _ = _disks((300, 300))
    calls = []
    real = blockwise.compute_maps

    def spy(image, *args, **kwargs):
        calls.append(image.shape)
        return real(image, *args, **kwargs)

    monkeypatch.setattr(blockwise, "compute_maps", spy)
    monkeypatch.setattr(blockwise, "ESTIMATE_CROP", 128)
    res = segment_blockwise(img, "classical", block=100)
    crop = img[86:214, 86:214]
    assert calls == [(128, 128)]
    assert res.pixel_size_estimated and res.modality == "fluorescence"
    assert res.pixel_size == pytest.approx(real(crop, "classical").pixel_size)


@pytest.fixture(scope="module")
def mosaic_results():
    """Block path (512 px blocks) and the whole-image path on a 1500 px H&E mosaic."""
    image = _he_mosaic()
    kw = {"pixel_size": 0.25, "tta": False}
    blocks = segment_blockwise(image, "default", block=512, **kw)
    tiled = seg_mod.segment(image, "default", **kw).labels
    return blocks, tiled


def _identical_share(ref: np.ndarray, other: np.ndarray) -> float:
    """Share of ``ref``'s nuclei whose pixel set is one nucleus of ``other``, exactly."""
    n = int(ref.max())
    pairs = np.unique(np.stack([ref.ravel(), other.ravel()]), axis=1)
    pairs = pairs[:, pairs[0] > 0]
    ids, counts = np.unique(pairs[0], return_counts=True)
    single = ids[counts == 1]  # one value of ``other`` over the whole nucleus
    partner = {int(r): int(o) for r, o in pairs.T if r in set(single.tolist())}
    area_ref = np.bincount(ref.ravel(), minlength=n + 1)
    area_other = np.bincount(other.ravel())
    same = [r for r, o in partner.items() if o > 0 and area_other[o] == area_ref[r]]
    return len(same) / max(1, np.count_nonzero(area_ref[1:]))


def test_default_model_blocks_match_the_whole_image(mosaic_results):
    blocks, tiled = mosaic_results
    lab = blocks.labels
    assert blocks.n_blocks == 9 and blocks.n_truncated == 0
    assert np.array_equal(np.unique(lab), np.arange(int(lab.max()) + 1))
    assert _one_piece_each(lab)
    # Each block runs the whole image's model tiles over its window (plan_blocks' grid),
    # so its nuclei are the whole-image path's, pixel for pixel, wherever the seams fall
    # (before the grid, 512 px blocks agreed on about half of the outlines, AJI 0.92).
    assert _identical_share(tiled, lab) >= 0.995
    assert evaluate(tiled, lab).aji >= 0.995


def test_seam_nuclei_are_kept_once(mosaic_results):
    blocks, tiled = mosaic_results
    cm = _centroid_rows_cols(tiled)
    seams = np.array([500, 1000])
    near = (np.abs(cm[:, :1] - seams).min(1) < 15) | (np.abs(cm[:, 1:] - seams).min(1) < 15)
    assert near.sum() > 50
    ids = np.flatnonzero(near) + 1
    found = [np.bincount(blocks.labels[tiled == i]).argmax() for i in ids]
    assert np.count_nonzero(found) >= 0.98 * len(ids)  # not lost at a seam
    assert len(set(found) - {0}) == np.count_nonzero(found)  # and not merged


def _run(args):
    return main(["segment", *args, "--model", "classical", "--pixel-size", "0.5"])


def test_cli_block_size_gives_unique_whole_nuclei(tmp_path, capsys):
    img, truth = _disks((300, 300))
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, img)
    assert _run([str(path), "-o", str(tmp_path / "o"), "--block-size", "64"]) == 0
    lab = tifffile.imread(tmp_path / "o" / "big_instances.tif")
    rows = (tmp_path / "o" / "big_instances.csv").read_text().splitlines()
    assert lab.dtype == np.uint32 and len(rows) == lab.max() + 1
    assert _one_piece_each(lab) and evaluate(truth, lab).recall[0.5] == 1.0
    assert f"{int(lab.max())} nuclei" in capsys.readouterr().out


def test_cli_uses_blocks_above_the_threshold_only(tmp_path, monkeypatch):
    img, _ = _disks((300, 300))
    path = tmp_path / "im.tif"
    tifffile.imwrite(path, img)
    calls = []
    real = blockwise.segment_blockwise

    def spy(*args, **kwargs):
        calls.append(kwargs["block"])
        return real(*args, **kwargs)

    monkeypatch.setattr(blockwise, "segment_blockwise", spy)
    assert _run([str(path), "-o", str(tmp_path / "small")]) == 0
    assert calls == []  # 0.09 Mpx: the whole-image path, unchanged
    whole = seg_mod.segment(img, "classical", pixel_size=0.5).labels
    assert np.array_equal(tifffile.imread(tmp_path / "small" / "im_instances.tif"), whole)
    monkeypatch.setattr(blockwise, "AUTO_BLOCK_PIXELS", 50_000)
    assert _run([str(path), "-o", str(tmp_path / "big")]) == 0
    assert calls == [blockwise.DEFAULT_BLOCK]
    assert _run([str(path), "-o", str(tmp_path / "off"), "--block-size", "0"]) == 0
    assert calls == [blockwise.DEFAULT_BLOCK]  # 0: never in blocks


def test_cli_refuses_maps_in_blocks_and_bad_block_sizes(tmp_path, capsys):
    path = tmp_path / "tile.tif"
    path.write_bytes((DATA / "he_tile.tif").read_bytes())
    out = tmp_path / "o"
    assert _run([str(path), "-o", str(out), "--block-size", "128", "--save-maps"]) == 2
    err = capsys.readouterr().err.strip()
    assert "tile.tif" in err and "--save-maps" in err and "--block-size 0" in err
    assert len(err.splitlines()) == 1 and not any(out.glob("*.tif"))
    for bad in ("8", "-1", "big"):
        with pytest.raises(SystemExit) as exc:
            _run([str(path), "-o", str(out), "--block-size", bad])
        assert exc.value.code == 2
        assert "--block-size" in capsys.readouterr().err


def test_block_normalisation_keeps_float64_beyond_float32_range():
    """The block path's normalisation is the whole-image path's twin: float64 values
    beyond float32's range (~3e38) used to overflow to inf there, reading as empty."""
    from napari_medinst.blockwise import Normalisation
    from napari_medinst.preprocess import to_network_input

    rng = np.random.default_rng(0)
    base = rng.random((64, 64))
    for modality, img in (("fluorescence", base * 1e300), ("he", np.dstack([base] * 3) * 1e300)):
        with np.errstate(over="raise", invalid="raise"):
            norm = Normalisation.of_image(img, modality)
            block = norm.apply(img)
        assert np.isfinite(block).all() and block.max() > 0.5
        np.testing.assert_allclose(block, to_network_input(img, modality), atol=1e-6)
