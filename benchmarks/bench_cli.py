"""Seconds per tile of one ``napari-medinst segment`` call, start-up included (issue #16).

Times exactly what a user runs: one CLI process segmenting every given tile (default: the
14 MoNuSeg 2018 test tiles at 40x, ``--pixel-size 0.25``), from process start to exit,
outputs written. The classical fallback runs in the same session as the yardstick, so
the ratio survives a noisy machine. Only the time is read; nothing is scored or tuned.

    .venv/bin/python benchmarks/bench_cli.py [--repeat 5] [--model default]
        [--data ../shared/data] [--images A.tif B.tif ...]

Pause other jobs (a training run: ``kill -STOP``) while it runs.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def test_tiles(data: Path) -> list[Path]:
    folder = data / "monuseg"
    with open(folder / "index.csv", newline="") as fh:
        ids = [r["id"] for r in csv.DictReader(fh) if r["split"] == "MoNuSeg2018-test"]
    return [folder / "images" / f"{i}.tif" for i in ids]


def one_call(images: list[Path], model: str, pixel_size: str, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "napari_medinst.cli", "segment", *map(str, images),
           "-o", str(out), "--model", model, "--pixel-size", pixel_size]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    ap.add_argument("--images", type=Path, nargs="+", help="tiles (default: MoNuSeg test)")
    ap.add_argument("--pixel-size", default="0.25")
    ap.add_argument("--model", default="default")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    images = args.images or test_tiles(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        times: dict[str, list[float]] = {args.model: [], "classical": []}
        for _ in range(args.repeat):  # alternating: drift hits both alike
            for model in times:
                times[model].append(one_call(images, model, args.pixel_size, Path(tmp) / "o"))
    n = len(images)
    print(f"one segment call on {n} tiles (--pixel-size {args.pixel_size}), "
          f"{args.repeat} runs, start-up and writing included")  # fmt: skip
    for model, t in times.items():
        med = statistics.median(t)
        print(f"  {model:<12} median {med:6.2f} s = {med / n:.3f} s per tile "
              f"(runs: {', '.join(f'{x:.2f}' for x in t)})")  # fmt: skip
    ratio = statistics.median(times[args.model]) / statistics.median(times["classical"])
    print(f"  {args.model} / classical: {ratio:.2f}x")


if __name__ == "__main__":
    main()
