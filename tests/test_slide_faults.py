"""Whole-slide runs that lose a worker process or their client get the uninterrupted result.

A ``LocalCluster`` of 2 worker processes segments a small generated slide. Blocks (or
chunks) are slowed down inside the workers (``client.run`` patches the engine module in
each worker process), so that the progress callback, called on the client as tasks
finish, can act while other tasks are still running: it kills a busy worker process with
SIGKILL (its nanny starts a new one and ``distributed`` runs the lost tasks again), or
raises KeyboardInterrupt as Ctrl-C would, after which ``--resume`` finishes the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import bundled_tile_slide, load_script
from napari_medinst import slide_engine as se
from napari_medinst.cli import main

zarr = pytest.importorskip("zarr")
pytest.importorskip("imagecodecs")
distributed = pytest.importorskip("distributed")
mts = load_script("make_test_slide")

SIZE = 3000  # working level 1: 1500 px, 9 blocks of 512 px
BLOCK = 512
DELAY_S = 1.0


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    return bundled_tile_slide(tmp_path_factory.mktemp("slide"), SIZE)


@pytest.fixture(scope="module")
def plan(slide_path):
    return se.plan_slide(slide_path, "classical", block=BLOCK, min_tissue=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, plan, client):
    """An uninterrupted run: every pyramid level and the table's bytes."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run = se.run_slide(plan, out, client)
    assert run.complete and run.segmented == len(plan.specs) == 9
    return _result(out)


def _result(out: Path) -> tuple[list[np.ndarray], bytes]:
    image = se.labels_path(out)
    n = json.loads((out / ".zattrs").read_text())[se.STORE_KEY]["label_levels"]
    levels = [zarr.open_array(str(image / str(i)), mode="r")[:] for i in range(n)]
    return levels, (out / "nuclei.csv").read_bytes()


def _same(out: Path, reference) -> None:
    levels, table = _result(out)
    assert len(levels) == len(reference[0]) > 1
    for ours, ref in zip(levels, reference[0], strict=True):
        np.testing.assert_array_equal(ours, ref)
    assert table == reference[1]


@contextlib.contextmanager
def _slowed(client, name: str, delay: float):
    """Within: each worker process sleeps ``delay`` s before ``slide_engine.<name>``."""

    def patch(name=name, delay=delay):
        import time

        from napari_medinst import slide_engine as engine

        originals = engine.__dict__.setdefault("_test_originals", {})
        original = originals.setdefault(name, getattr(engine, name))

        def slow(*args, **kwargs):
            time.sleep(delay)
            return original(*args, **kwargs)

        setattr(engine, name, slow if delay else original)

    client.run(patch)
    try:
        yield
    finally:
        client.run(patch, delay=0)


def _status(out: Path) -> str:
    return json.loads((out / ".zattrs").read_text())[se.STORE_KEY]["status"]


@pytest.mark.slow
@pytest.mark.parametrize(("phase", "slowed"), [("blocks", "segment_block"),
                                               ("chunks", "_write_levels")])  # fmt: skip
def test_a_worker_killed_mid_run_changes_nothing(tmp_path, client, plan, reference, phase,
                                                 slowed):  # fmt: skip
    client.wait_for_workers(2)
    pids = client.run(os.getpid)
    killed: dict[str, int] = {}

    def kill_a_busy_worker(what, done, total, elapsed):
        if what != phase or done != 2 or killed:
            return
        busy = [addr for addr, keys in client.processing().items() if keys and addr in pids]
        assert busy, "no task was running: the slow-down is too short"
        killed[busy[0]] = pids[busy[0]]
        os.kill(pids[busy[0]], signal.SIGKILL)

    out = tmp_path / "k.zarr"
    with _slowed(client, slowed, DELAY_S):
        run = se.run_slide(plan, out, client, progress=kill_a_busy_worker)
    assert killed, f"the {phase} phase finished before 2 of its tasks did"
    assert run.complete and not run.failed and run.segmented == 9
    assert _status(out) == "complete"
    _same(out, reference)
    client.wait_for_workers(2)
    assert not set(killed.values()) & set(client.run(os.getpid).values())  # it was replaced
    assert not [p.name for p in out.rglob("*.part")]


@pytest.mark.slow
def test_interrupted_client_then_resume_gives_the_same_result(tmp_path, client, slide_path,
                                                              reference, monkeypatch, capsys):  # fmt: skip
    seen = []

    def interrupting(stream=None):
        def show(what, done, total, elapsed):
            seen.append((what, done))
            if what == "blocks" and done == 3:
                raise KeyboardInterrupt

        return show

    out = tmp_path / "i.zarr"
    args = ["segment-slide", str(slide_path), "-o", str(out), "--scheduler",
            client.scheduler.address, "--model", "classical", "--block-size", str(BLOCK),
            "--min-tissue", "0"]  # fmt: skip
    monkeypatch.setattr(se, "text_progress", interrupting)
    with _slowed(client, "segment_block", DELAY_S):
        assert main(args) == 130
    assert capsys.readouterr().err.strip().endswith("segment-slide: interrupted")
    assert seen[-1] == ("blocks", 3) and _status(out) == "incomplete"
    assert not (out / "nuclei.csv").exists() and not list((out / "chunks").glob("*.npy"))
    assert len(list((out / "records").glob("*.json"))) < 9
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    assert _status(out) == "complete"
    _same(out, reference)


@pytest.mark.slow
def test_an_interrupt_starts_no_further_block(tmp_path, client, plan):
    """The client's futures outlive the interrupt (its traceback holds them): the
    queued blocks must be cancelled, not left to run for nobody."""

    def interrupt(what, done, total, elapsed):
        if what == "blocks" and done == 2:
            raise KeyboardInterrupt

    out = tmp_path / "c.zarr"
    with _slowed(client, "segment_block", DELAY_S), pytest.raises(KeyboardInterrupt) as info:
        se.run_slide(plan, out, client, progress=interrupt)
    # the blocks running at the interrupt finish (a thread cannot be stopped), no other
    # starts: at most 2 done + 2 running; uncancelled, the 5 queued ones would run in
    # this time too
    time.sleep(6 * DELAY_S)
    assert isinstance(info.value, KeyboardInterrupt) and _status(out) == "incomplete"
    assert len(list((out / "records").glob("*.json"))) <= 4


@pytest.mark.slow
def test_a_worker_killed_while_map_regions_run_changes_nothing(tmp_path, client):
    """The default model: a region task lost with its worker is run again, and a block
    whose region files it needs are not there yet waits for them."""
    path = bundled_tile_slide(tmp_path, 4000)  # working level 1: 2000 px, 8 regions
    model_plan = se.plan_slide(path, "default", block=512, tta=False, min_tissue=0)
    assert len(model_plan.regions) == 8 and len(model_plan.specs) == 16
    want = _result_of(se.run_slide(model_plan, tmp_path / "ref.zarr", client))
    client.wait_for_workers(2)
    pids = client.run(os.getpid)
    killed: dict[str, int] = {}

    def kill_a_busy_worker(what, done, total, elapsed):
        if what != "blocks" or done != 1 or killed:
            return
        busy = [addr for addr, keys in client.processing().items()
                if any("maps-region" in str(k) for k in keys) and addr in pids]  # fmt: skip
        assert busy, "no region was being computed: the slow-down is too short"
        killed[busy[0]] = pids[busy[0]]
        os.kill(pids[busy[0]], signal.SIGKILL)

    out = tmp_path / "k.zarr"
    with _slowed(client, "_compute_region", DELAY_S):
        run = se.run_slide(model_plan, out, client, progress=kill_a_busy_worker)
    assert killed and run.complete and not run.failed
    _same(out, want)
    assert not (out / "maps").exists() and not [p.name for p in out.rglob("*.part")]
    client.wait_for_workers(2)


def _result_of(run) -> tuple[list[np.ndarray], bytes]:
    assert run.complete
    return _result(run.out)
