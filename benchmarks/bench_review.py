"""Does the ground-truth-free review queue find the errors? (issue #15, part 2)

Runs the default model (with mirror averaging and its disagreement map) on the MoNuSeg
*training* tiles only (split ``MoNuSeg2018-train``; the benchmark split is never read),
builds each tile's review queue and labels each predicted nucleus as an error when it
is a false positive, a merge, a split piece, or matched with IoU < 0.7
(:func:`~napari_medinst.metrics.instance_outcomes` at IoU 0.5). Prints, pooled over
the tiles (each tile's queue cut at the same share):

* the fraction of errors in the top 10 % of the queue against the base rate (chance);
* the precision at 5 / 10 / 20 %;
* the same for each cue alone and for the queue without each cue (ablation);
* the time to build a queue, on the tiles and on a synthetic 1000-nucleus 1000² tile.

    .venv/bin/python benchmarks/bench_review.py [--data ../shared/data] [--limit N]
        [--cache DIR]

Note: the default model was trained on MoNuSeg training tiles, so its errors there are
fewer (and may be of other kinds) than on unseen images.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).parent))

from _synthetic import network_like_maps, synthetic_labels
from napari_medinst.metrics import instance_outcomes, overlap_table
from napari_medinst.model.inference import Maps
from napari_medinst.postprocess import Postprocessor
from napari_medinst.review import FEATURES, combine, review_scores
from napari_medinst.segment import compute_maps

SPLIT = "MoNuSeg2018-train"
SHARES = (0.05, 0.10, 0.20)
IOU_OK = 0.7


def training_ids(folder: Path) -> list[str]:
    """Ids of the MoNuSeg training tiles (the test split is skipped here, by its split)."""
    with open(folder / "index.csv", newline="") as fh:
        return [r["id"] for r in csv.DictReader(fh) if r["split"] == SPLIT]


def tile_maps(folder: Path, name: str, cache: Path | None):
    """Maps (with the TTA disagreement), labels and energy of one tile; cached on request."""
    hit = cache / f"{name}.npz" if cache else None
    if hit is not None and hit.exists():
        z = np.load(hit)
        maps = Maps(z["prob"], z["hv"], z["contour"], tta_std=z["tta_std"])
        return maps, float(z["px"])
    image = tifffile.imread(folder / "images" / f"{name}.tif")
    mr = compute_maps(image, "default", pixel_size=0.25, tta=True, tta_std=True)
    if hit is not None:
        hit.parent.mkdir(parents=True, exist_ok=True)
        m = mr.maps
        np.savez(hit, prob=m.prob, hv=m.hv, contour=m.contour, tta_std=m.tta_std, px=mr.pixel_size)
    return mr.maps, mr.pixel_size


def error_flags(gt: np.ndarray, pred: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per id of ``ids``: FP, merge, split piece, or matched with IoU < 0.7."""
    out = instance_outcomes(overlap_table(gt, pred), 0.5)
    bad = (out.pred_category != "tp") | (out.pred_iou < IOU_OK)
    return bad[np.searchsorted(out.pred_ids, ids)]


def top_hits(order_scores: np.ndarray, errors: np.ndarray, rng) -> dict[float, tuple[int, int]]:
    """(errors, size) of the top share of a ranking by score, ties in random order."""
    order = np.lexsort((rng.permutation(errors.size), -order_scores))
    res = {}
    for share in SHARES:
        k = max(1, round(share * errors.size))
        res[share] = (int(errors[order[:k]].sum()), k)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    ap.add_argument("--limit", type=int, default=0, help="first N training tiles only")
    ap.add_argument("--cache", type=Path, default=None, help="keep the maps here (re-runs)")
    args = ap.parse_args()
    folder = args.data / "monuseg"
    names = training_ids(folder)[: args.limit or None]
    rankings = ["queue"] + [f"{k} alone" for k in FEATURES] + [f"without {k}" for k in FEATURES]
    pooled = {r: {s: [0, 0] for s in SHARES} for r in rankings}
    n_err = n_all = 0
    times, t_model = [], 0.0
    rng = np.random.default_rng(0)
    for name in names:
        t0 = time.perf_counter()
        maps, px = tile_maps(folder, name, args.cache)
        t_model += time.perf_counter() - t0
        res = Postprocessor(maps.prob, maps.hv, maps.contour, pixel_size=px).run(_default_params())
        t0 = time.perf_counter()
        queue = review_scores(res.labels, maps, energy=res.energy)
        times.append(time.perf_counter() - t0)
        gt = tifffile.imread(folder / "labels" / f"{name}.tif")
        errors = error_flags(gt, res.labels, queue.ids)
        n_err, n_all = n_err + int(errors.sum()), n_all + errors.size
        f = queue.features
        scores = {"queue": queue.risk}
        scores.update({f"{k} alone": f[k] for k in FEATURES})
        for k in FEATURES:
            scores[f"without {k}"] = combine({j: f[j] for j in FEATURES if j != k})
        for r, s in scores.items():
            for share, (hit, size) in top_hits(s, errors, rng).items():
                pooled[r][share][0] += hit
                pooled[r][share][1] += size
        print(f"  {name}: {errors.size} nuclei, {int(errors.sum())} errors, "
              f"top-10 % {pooled['queue'][0.10]}", flush=True)  # fmt: skip
    report(names, pooled, n_err, n_all, times, t_model)


def _default_params():
    from napari_medinst.segment import default_params

    return default_params("default", "he")


def report(names, pooled, n_err, n_all, times, t_model) -> None:
    base = n_err / max(n_all, 1)
    print(f"\n{len(names)} MoNuSeg training tiles ({SPLIT}), {n_all} predicted nuclei, "
          f"{n_err} errors (FP, merge, split piece or IoU < {IOU_OK})")  # fmt: skip
    print(f"base rate (chance) {base:.3f}")
    head = "".join(f"  prec@{int(100 * s)}%" for s in SHARES)
    print(f"{'ranking':<18}{head}   lift@10%")
    best = None
    for r, per in pooled.items():
        prec = {s: hit / max(size, 1) for s, (hit, size) in per.items()}
        cells = "".join(f"  {prec[s]:8.3f}" for s in SHARES)
        print(f"{r:<18}{cells}   {prec[0.10] / max(base, 1e-9):6.2f}x")
        if r.endswith("alone") and (best is None or prec[0.10] > best[1]):
            best = (r, prec[0.10])
    q = pooled["queue"][0.10]
    print(f"\nerrors in the top 10 % of the queue: {q[0] / max(q[1], 1):.3f} "
          f"({q[0]} of {q[1]}) against {base:.3f} by chance")  # fmt: skip
    if best is not None:
        print(f"best single cue: {best[0]} (precision@10% {best[1]:.3f})")
    ms = [1000 * t for t in times]
    print(f"queue build time on the tiles: median {statistics.median(ms):.1f} ms, "
          f"max {max(ms):.1f} ms; model (maps) {t_model:.0f} s in all")  # fmt: skip
    synthetic_timing()


def synthetic_timing(repeat: int = 7) -> None:
    """Queue build time for 1000 nuclei on a 1000 x 1000 tile (target <= 100 ms)."""
    labels = synthetic_labels(n=1000)
    prob, hv, contour = network_like_maps(labels)
    std = np.abs(np.random.default_rng(1).normal(0, 0.02, prob.shape)).astype(np.float32)
    maps = Maps(prob, hv, contour, tta_std=std)
    res = Postprocessor(prob, hv, contour).run()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        q = review_scores(res.labels, maps, energy=res.energy)
        ts.append(1000 * (time.perf_counter() - t0))
    print(f"synthetic 1000x1000, {len(q)} nuclei: queue build median {statistics.median(ts):.1f} ms "
          f"(target <= 100 ms)")  # fmt: skip


if __name__ == "__main__":
    main()
