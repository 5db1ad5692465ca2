"""End-to-end speed and memory: model + post-processing on a 1000x1000 H&E tile.

Target (issue #16): <= 0.5 s on this 2-core CPU with the default settings. The classical
fallback is timed in the same run as the baseline, and so are 1, 2 and 4 mirror passes. Uses a MoNuSeg *training* tile from ../shared/data when
present, else the bundled 512x512 sample tiled to 1000x1000.

    .venv/bin/python benchmarks/bench_model.py [--model default] [--repeat 5]
"""

from __future__ import annotations

import argparse
import csv
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from napari_medinst._io import read_image
from napari_medinst.model.tta import DEFAULT_TTA
from napari_medinst.samples import load_sample
from napari_medinst.segment import get_model, segment

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg"


def tile_1000() -> tuple[np.ndarray, str]:
    index = SHARED / "index.csv"
    if index.exists():
        with open(index, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["split"] == "MoNuSeg2018-train"]
        return read_image(
            SHARED / "images" / f"{rows[0]['id']}.tif"
        ), f"MoNuSeg train {rows[0]['id']}"
    img = load_sample("he")[0]
    return np.tile(img, (2, 2, 1))[:1000, :1000], "bundled sample tiled"


def timed(fn, repeat: int) -> tuple[float, object]:
    fn()  # warm-up (model load, allocations)
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    image, what = tile_1000()
    print(f"image: {what}, {image.shape}, torch threads {torch.get_num_threads()}")
    t_cls, seg_c = timed(lambda: segment(image, "classical", pixel_size=0.25), args.repeat)
    model = get_model(args.model, "cpu")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t_fixed, seg = timed(
        lambda: segment(image, model, pixel_size=0.25, device="cpu", tta=False), args.repeat
    )
    t_auto, seg_a = timed(lambda: segment(image, model, device="cpu"), args.repeat)
    t_tta, seg_t = timed(
        lambda: segment(image, model, pixel_size=0.25, device="cpu", tta=True), args.repeat
    )
    t_two, _ = timed(
        lambda: segment(image, model, pixel_size=0.25, device="cpu", tta=2), args.repeat
    )
    t_default = {1: t_fixed, 2: t_two, 4: t_tta}[DEFAULT_TTA]  # timed above, not again
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"classical fallback          median {t_cls:.3f} s  ({seg_c.result.n_instances} nuclei)")
    print(
        f"model (no TTA), pixel given median {t_fixed:.3f} s  ({seg.result.n_instances} nuclei)"
        f"  ratio to classical {t_fixed / t_cls:.2f}"
    )
    print(
        f"model + TTA, size estimated median {t_auto:.3f} s  (estimated {seg_a.maps.pixel_size:.3f} µm/px)"
    )
    print(
        f"model + 4 mirror passes     median {t_tta:.3f} s  ({seg_t.result.n_instances} nuclei)"
        f"  ratio to no TTA {t_tta / t_fixed:.2f}"
    )
    print(
        f"model + 2 mirror passes     median {t_two:.3f} s  ratio to no TTA {t_two / t_fixed:.2f}"
    )
    print(f"default ({DEFAULT_TTA} passes)          median {t_default:.3f} s  (target <= 0.5 s)")
    print(f"peak RSS of the process     {rss1:.0f} MiB (before the model runs: {rss0:.0f} MiB)")


if __name__ == "__main__":
    main()
