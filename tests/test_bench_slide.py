"""benchmarks/bench_slide.py --tile-work counts the network work of exact seams."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_slide.py"


def test_tile_work_per_block_falls_with_the_block_size_and_regions_run_each_tile_once(capsys):
    spec = importlib.util.spec_from_file_location("bench_slide", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        module.tile_work([1024, 2048, 8192], side=12_000)
    finally:
        sys.modules.pop(spec.name, None)
    rows = re.findall(r"^\s+(\d+)\s+(\d+\.\d+)x\s+(\d+\.\d+)x$", capsys.readouterr().out, re.M)
    assert [int(r[0]) for r in rows] == [1024, 2048, 8192]
    own = [float(r[1]) for r in rows]
    assert own[0] > own[1] > own[2] >= 1.0  # each block running the tiles over its window
    assert [float(r[2]) for r in rows] == [1.0, 1.0, 1.0]  # map regions: every tile once
