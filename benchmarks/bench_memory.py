"""Peak memory of ``napari-medinst segment`` on big plain images (issue #9).

Target: a 12,000 x 12,000 RGB H&E image (412 MiB) segmented under 2 GB peak RSS, and a
peak that does not grow with the image beyond the image and its labels (4 bytes a
pixel). Builds H&E mosaics from MoNuSeg *training* tiles (../shared/data/monuseg, when
present) or from the bundled sample tile, writes them as TIFFs to a temporary folder
and runs the command line on each in a subprocess, exactly as a user would; the peak
RSS of each run comes from ``os.wait4`` (that process alone).

    .venv/bin/python benchmarks/bench_memory.py [--sizes 4000 12000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from napari_medinst._io import read_image
from napari_medinst.samples import load_sample

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg"
TARGET_BYTES = 2 * 10**9


def source_tiles() -> tuple[list[np.ndarray], str]:
    """MoNuSeg training tiles (never the test split), else the bundled sample."""
    index = SHARED / "index.csv"
    if index.exists():
        with open(index, newline="") as fh:
            ids = [r["id"] for r in csv.DictReader(fh) if r["split"] == "MoNuSeg2018-train"]
        tiles = [read_image(SHARED / "images" / f"{i}.tif")[..., :3] for i in ids]
        return tiles, f"{len(tiles)} MoNuSeg 2018 training tiles"
    return [load_sample("he")[0]], "the bundled 512 px sample tile"


def mosaic(size: int, tiles: list[np.ndarray]) -> np.ndarray:
    """A ``size`` px RGB mosaic of the tiles, mirrored in turn so seams stay smooth."""
    out = np.empty((size, size, 3), np.uint8)
    t = min(min(a.shape[:2]) for a in tiles)
    k = 0
    for r in range(0, size, t):
        for c in range(0, size, t):
            tile = tiles[k % len(tiles)][:t, :t]
            if (r // t) % 2:
                tile = tile[::-1]
            if (c // t) % 2:
                tile = tile[:, ::-1]
            h, w = min(t, size - r), min(t, size - c)
            out[r : r + h, c : c + w] = tile[:h, :w]
            k += 1
    return out


def _command() -> list[str]:
    """The installed ``napari-medinst`` command beside this interpreter, else ``-m``."""
    exe = Path(sys.executable).parent / "napari-medinst"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "napari_medinst.cli"]


def run_cli(image: Path, out: Path, extra: list[str]) -> tuple[float, float, str]:
    """Peak RSS (bytes), wall time (s) and stdout of one ``segment`` run."""
    cmd = [*_command(), "segment", str(image), "-o", str(out), *extra]
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=so, stderr=se)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the others'
        wall = time.perf_counter() - t0
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        so.seek(0), se.seek(0)
        stdout, stderr = so.read().decode(), se.read().decode()
    if code != 0:
        raise SystemExit(f"segment failed ({code}) on {image}:\n{stderr}")
    return usage.ru_maxrss * 1024, wall, stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4000, 12000])
    ap.add_argument("--keep", default=None, help="keep images and outputs in this folder")
    args = ap.parse_args()
    tiles, what = source_tiles()
    print(f"H&E mosaics from {what}; {os.cpu_count()} CPUs; target < {TARGET_BYTES / 1e9:.0f} GB")
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench_memory_"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for size in args.sizes:
            image = root / f"he_{size}.tif"
            tifffile.imwrite(image, mosaic(size, tiles), photometric="rgb")
            runs = [("default", [])]
            if size * size <= 16_000_000:  # below the automatic threshold: also force blocks
                runs.append(("--block-size 2048", ["--block-size", "2048"]))
            for label, extra in runs:
                out = root / f"out_{size}_{len(rows)}"
                peak, wall, text = run_cli(image, out, extra)
                nuclei = text.split(": ")[-1].split(" nuclei")[0]
                mib = size * size * 3 / 2**20
                rows.append((size, label, mib, peak, wall, nuclei))
                print(
                    f"{size:>6}^2 RGB ({mib:6.0f} MiB)  {label:<18} peak RSS "
                    f"{peak / 1e9:5.2f} GB ({peak / (size * size * 3):4.1f}x input)  "
                    f"{wall:6.1f} s  {nuclei} nuclei",
                    flush=True,
                )
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    big = [r for r in rows if r[1] == "default" and r[0] * r[0] > 16_000_000]
    for size, _, _, peak, _, _ in big:
        verdict = "PASS" if peak < TARGET_BYTES else "FAIL"
        print(f"{verdict}: {size}^2 peaks at {peak / 1e9:.2f} GB (target < 2 GB)")


if __name__ == "__main__":
    main()
