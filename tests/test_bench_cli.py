"""benchmarks/bench_cli.py times real CLI calls and prints per-tile seconds and the ratio."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import tifffile

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_cli.py"
TILE = ROOT / "src" / "napari_medinst" / "data" / "he_tile.tif"


def test_bench_cli_times_one_call_per_model(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_cli", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        small = tmp_path / "a.tif"  # a crop: the test times the plumbing, not the model
        tifffile.imwrite(small, tifffile.imread(TILE)[:256, :256])
        module.main(["--images", str(small), "--repeat", "1"])
    finally:
        sys.modules.pop(spec.name, None)
    out = capsys.readouterr().out
    assert "one segment call on 1 tiles" in out
    per_tile = [float(x) for x in re.findall(r"= (\d+\.\d+) s per tile", out)]
    assert len(per_tile) == 2 and all(t > 0 for t in per_tile)
    assert re.search(r"default / classical: \d+\.\d+x", out)
