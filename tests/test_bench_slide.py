"""benchmarks/bench_slide.py --tile-work counts the network work exact seams cost."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_slide.py"


def test_tile_work_falls_with_the_block_size_towards_one(capsys):
    spec = importlib.util.spec_from_file_location("bench_slide", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        module.tile_work([1024, 2048, 8192], side=12_000)
    finally:
        sys.modules.pop(spec.name, None)
    ratios = [
        float(x) for x in re.findall(r": (\d+\.\d+)x the whole-image path", capsys.readouterr().out)
    ]
    assert len(ratios) == 3
    assert ratios[0] > ratios[1] > ratios[2] >= 1.0
