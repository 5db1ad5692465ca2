"""Timing of the evaluation metrics on two 4096 x 4096 label images (~10,000 nuclei each).

Not a test: run ``python benchmarks/bench_metrics.py [--repeat N] [--size S]``; it
prints the median seconds of every stage and of the whole evaluation, and the target.

The ground truth is a jittered grid of disks (neighbours may touch); the prediction
is the same grid jittered, shrunk and shifted by (2, -3) pixels, with some nuclei missed, some merged with their
right neighbour, some split in two and some small false positives, and with ids
permuted and spread out (uint32 with gaps).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from napari_medinst import metrics

TARGET_S = 0.5


def _paint(
    size: int, n_side: int, cy: np.ndarray, cx: np.ndarray, r: np.ndarray, ids: np.ndarray
) -> np.ndarray:
    """Label image where each pixel may belong only to the disk of its own grid cell."""
    cell = size / n_side
    out = np.zeros((size, size), ids.dtype)
    xs = np.arange(size)
    ix = np.minimum((xs / cell).astype(np.int64), n_side - 1)
    for y0 in range(0, size, 256):
        ys = np.arange(y0, min(y0 + 256, size))
        iy = np.minimum((ys / cell).astype(np.int64), n_side - 1)
        k = iy[:, None] * n_side + ix[None, :]
        d2 = (ys[:, None] - cy[k]) ** 2 + (xs[None, :] - cx[k]) ** 2
        out[ys[0] : ys[-1] + 1] = np.where(d2 < r[k] ** 2, ids[k], 0)
    return out


def make_pair(
    size: int = 4096, n_side: int = 100, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
    """Return ``(gt, pred, scores)`` with about ``n_side**2`` nuclei in each image."""
    rng = np.random.default_rng(seed)
    n = n_side * n_side
    cell = size / n_side
    grid = (np.arange(n_side) + 0.5) * cell
    cy = np.repeat(grid, n_side) + rng.uniform(-4, 4, n)
    cx = np.tile(grid, n_side) + rng.uniform(-4, 4, n)
    r = rng.uniform(0.3, 0.6, n) * cell
    gt = _paint(size, n_side, cy, cx, r, np.arange(1, n + 1, dtype=np.uint16))

    pred_ids = (rng.permutation(n) * 3 + 7).astype(np.uint32)
    shift_y, shift_x = rng.normal(0, 0.7, n), rng.normal(0, 0.7, n)
    r_pred = r - 1.0 + rng.normal(0, 0.6, n)
    r_pred[rng.random(n) < 0.03] = 0  # missed nuclei
    merged = np.flatnonzero(rng.random(n) < 0.02)
    merged = merged[(merged % n_side) < n_side - 1]
    pred_ids[merged + 1] = pred_ids[merged]  # right neighbour takes the same id
    pred = _paint(size, n_side, cy + shift_y, cx + shift_x, r_pred, pred_ids)
    pred = np.roll(pred, (2, -3), axis=(0, 1))  # so predictions also overlap neighbours

    split = np.flatnonzero(rng.random(n) < 0.02)
    new_ids = np.uint32(3 * n + 11) + 2 * np.arange(split.size, dtype=np.uint32)
    for k, new in zip(split, new_ids, strict=True):
        y, x = int(cy[k]), int(cx[k])
        h = int(cell / 2)
        block = pred[max(y - h, 0) : y + h, x : x + h]
        block[block == pred_ids[k]] = new
    fp = np.flatnonzero(rng.random(n) < 0.02)
    fp_ids = new_ids[-1] + 2 + 2 * np.arange(fp.size, dtype=np.uint32)
    for k, new in zip(fp, fp_ids, strict=True):
        y, x = int((k // n_side) * cell), int((k % n_side) * cell)
        corner = pred[y : y + 5, x : x + 5]
        corner[corner == 0] = new

    present = np.unique(pred)
    present = present[present > 0]
    scores = {int(i): float(s) for i, s in zip(present, rng.random(present.size), strict=True)}
    return gt, pred, scores


def _median_time(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--n-side", type=int, default=100)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    gt, pred, scores = make_pair(args.size, args.n_side)
    print(
        f"data: {gt.shape} gt {gt.dtype}, pred {pred.dtype}, built in {time.perf_counter() - t0:.1f} s"
    )

    rep = args.repeat
    t_table, table = _median_time(lambda: metrics.overlap_table(gt, pred), rep)
    print(f"nuclei: gt {table.n_gt}, pred {table.n_pred}, overlapping pairs {table.n_pairs}")
    stages = {
        "overlap_table": t_table,
        "match x10 thresholds": _median_time(
            lambda: [metrics.match(table, t) for t in metrics.THRESHOLDS], rep
        )[0],
        "AP (one threshold, scores)": _median_time(
            lambda: metrics.average_precision(table, scores, 0.5), rep
        )[0],
        "PQ": _median_time(lambda: metrics.panoptic_quality(table), rep)[0],
        "AJI + AJI+": _median_time(lambda: metrics.aggregated_jaccard(table), rep)[0],
        "Dice": _median_time(lambda: metrics.foreground_dice(table), rep)[0],
        "instance_outcomes": _median_time(lambda: metrics.instance_outcomes(table), rep)[0],
        "evaluate_table (all scores, with AP scores)": _median_time(
            lambda: metrics.evaluate_table(table, scores=scores), rep
        )[0],
    }
    for name, t in stages.items():
        print(f"  {name:<45s} {t * 1000:8.1f} ms")

    t_eval, result = _median_time(lambda: metrics.evaluate(gt, pred, scores=scores), rep)

    def all_metrics() -> object:
        tab = metrics.overlap_table(gt, pred)
        metrics.instance_outcomes(tab)
        return metrics.evaluate_table(tab, scores=scores)

    t_all, _ = _median_time(all_metrics, rep)
    print(f"evaluate(gt, pred, scores) total:                  {t_eval:.3f} s")
    print(f"all metrics incl. instance_outcomes (one table):  {t_all:.3f} s  (target {TARGET_S} s)")
    print(
        f"acc@0.5 {result.accuracy[0.5]:.3f}  mAP {result.map:.3f}  PQ {result.pq:.3f}  "
        f"AJI {result.aji:.3f}  AJI+ {result.aji_plus:.3f}  Dice {result.dice:.3f}"
    )


if __name__ == "__main__":
    main()
