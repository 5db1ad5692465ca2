"""Timing of QuPath GeoJSON export and import of 10,000 nuclei (4096 x 4096 labels).

Not a test: run ``python benchmarks/bench_geojson.py [--repeat N]``; it prints the median
seconds of export (labels -> FeatureCollection, without and with measurements, and
serialised to a file) and of import (FeatureCollection -> labels, and from the file), checks
that the round trip is pixel-identical, and prints the 1 s target.

The labels are the ground truth of ``bench_metrics.py``: a jittered grid of disks,
neighbours may touch.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from bench_metrics import _median_time as _median
from bench_metrics import make_pair
from napari_medinst.geojson import (
    features_to_labels,
    labels_to_features,
    measurements_from_columns,
    read_geojson,
    write_geojson,
)
from napari_medinst.measure import measure_nuclei

TARGET_S = 1.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--n-side", type=int, default=100)
    args = parser.parse_args(argv)
    labels = make_pair(args.size, args.n_side)[0]
    n = int(np.unique(labels).size - 1)
    print(f"labels {labels.shape} {labels.dtype}, {n} nuclei")
    rep = args.repeat

    t_exp, fc = _median(lambda: labels_to_features(labels), rep)
    t_meas, cols = _median(lambda: measure_nuclei(labels, pixel_size=0.25), rep)
    meas = measurements_from_columns(cols)
    t_exp_m, _ = _median(lambda: labels_to_features(labels, measurements=meas), rep)
    t_imp, res = _median(lambda: features_to_labels(fc, labels.shape), rep)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nuclei.geojson"
        t_write, _ = _median(lambda: write_geojson(path, labels, overwrite=True), rep)
        size_mb = path.stat().st_size / 1e6
        t_read, res_file = _median(lambda: read_geojson(path, labels.shape), rep)
    same = np.array_equal(res.labels, labels) and np.array_equal(res_file.labels, labels)
    rows = [
        ("export: labels -> features", t_exp),
        ("measure_nuclei (regionprops)", t_meas),
        ("export with measurements", t_exp_m),
        ("  measure + export", t_meas + t_exp_m),
        (f"export to file ({size_mb:.1f} MB)", t_write),
        ("import: features -> labels", t_imp),
        ("import from file", t_read),
    ]
    for name, t in rows:
        print(f"  {name:<34} {t:6.3f} s")
    print(f"round trip pixel-identical: {same}; problems: {len(res.problems)}")
    verdict = "PASS" if max(t_exp, t_imp) <= TARGET_S else "FAIL"
    print(f"target: export and import of {n} nuclei <= {TARGET_S:.0f} s each: {verdict}")


if __name__ == "__main__":
    main()
