"""Post-processing speed on a 1000x1000 tile with ~600 nuclei.

Targets (issue #3): full post-processing <= 40 ms median; a change that only affects the
last stage (min_nucleus_size) <= 10 ms. Prints medians over repeats.

    .venv/bin/python benchmarks/bench_postprocess.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _synthetic import network_like_maps, synthetic_labels
from napari_medinst.metrics import evaluate
from napari_medinst.postprocess import Postprocessor, PostprocessParams


def main(repeat: int = 15) -> None:
    for pixel_size in (0.5, 0.25):
        bench(pixel_size, repeat)


def bench(pixel_size: float, repeat: int) -> None:
    """Maps at ``pixel_size`` (0.25: a 40x tile, where the default sizes double)."""
    labels = synthetic_labels()
    prob, hv, contour = network_like_maps(labels)
    n = int(labels.max())
    full, last, marker = [], [], []
    for i in range(repeat):
        pp = Postprocessor(prob, hv, contour, pixel_size=pixel_size)
        t0 = time.perf_counter()
        res = pp.run(PostprocessParams())
        full.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pp.run(PostprocessParams(min_nucleus_size=12 + i % 5))
        last.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pp.run(PostprocessParams(marker_threshold=0.25 + 0.01 * (i % 5)))
        marker.append(time.perf_counter() - t0)
    aji = evaluate(labels, res.labels).aji
    ms = lambda xs: f"{1000 * statistics.median(xs):.1f} ms"  # noqa: E731
    print(
        f"maps at {pixel_size} µm/px: tile 1000x1000, {n} nuclei, found {res.n_instances}, AJI vs truth {aji:.3f}"
    )
    print(f"full post-processing       median {ms(full)}  (target <= 40 ms)")
    print(f"last stage only (min size) median {ms(last)}  (target <= 10 ms)")
    print(f"marker threshold change    median {ms(marker)}")


if __name__ == "__main__":
    main()
