from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_script(name: str):
    """A module of the repository's ``scripts/`` folder (e.g. ``make_test_slide``)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def client():
    """A dask.distributed client of a local cluster of two one-thread worker processes."""
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def disk_labels(shape=(96, 96), centres=((30, 30), (30, 52), (70, 60)), radius=10) -> np.ndarray:
    """Small label image of (possibly touching) disks."""
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.int32)
    for i, (r, c) in enumerate(centres, start=1):
        out[((rr - r) ** 2 + (cc - c) ** 2 <= radius**2) & (out == 0)] = i
    return out


@pytest.fixture(autouse=True)
def user_models(tmp_path, monkeypatch) -> Path:
    """Registered models go to a temporary folder: tests never touch the user's own."""
    from napari_medinst.model import registry

    root = tmp_path / "user-models"
    monkeypatch.setenv(registry.ENV_VAR, str(root))
    return root


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "monuseg" / "index.csv").exists():
        pytest.skip("shared data folder not available")
    return SHARED_DATA


@pytest.fixture
def monuseg_train_labels(shared_data):
    """Labels of two MoNuSeg *training* images (never the benchmark split)."""
    import csv

    import tifffile

    with open(shared_data / "monuseg" / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    ids = [r["id"] for r in rows if r["split"] == "MoNuSeg2018-train"][:2]
    return [tifffile.imread(shared_data / "monuseg" / "labels" / f"{i}.tif") for i in ids]


def bundled_tile_slide(folder: Path, size: int) -> Path:
    """An OME-TIFF pyramid of ``size`` px at 40x made of the bundled H&E tile."""
    mts = load_script("make_test_slide")
    tiles = [mts.read_image(mts.BUNDLED_TILE)[..., :3]]
    path, _ = mts.make_slide(folder / "s.ome.tif", size, "ome-tiff", tiles=tiles)
    return path


def classical_store(folder: Path, size: int, block: int) -> Path:
    """A complete ``segment-slide`` store (classical model, every block segmented) of
    :func:`bundled_tile_slide`, run on one in-process dask worker: ``folder/made.zarr``."""
    import distributed

    from napari_medinst import slide_engine as se

    plan = se.plan_slide(bundled_tile_slide(folder, size), "classical", block=block, tta=False,
                         min_tissue=0)  # fmt: skip
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                       dashboard_address=None)  # fmt: skip
    with distributed.Client(cluster) as client:
        assert se.run_slide(plan, folder / "made.zarr", client).complete
    cluster.close()
    return folder / "made.zarr"


@pytest.fixture
def level_reads(monkeypatch):
    """Pyramid levels decoded from now on (every slide read goes through ``_read_block``)."""
    from napari_medinst import slide as sl

    calls: list[int] = []
    real = sl._read_block
    monkeypatch.setattr(sl, "_read_block", lambda *a: calls.append(a[1]) or real(*a))
    return calls
