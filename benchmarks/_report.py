"""Printing latency results the same way in every GUI benchmark."""

from __future__ import annotations

import statistics

import numpy as np


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def print_latencies(
    rows: list[tuple[str, list[float]]],
    per: dict[str, list[float]],
    per_title: str,
    target_ms: float,
    width: int = 28,
) -> None:
    """Median / p90 per row, medians per kind, then the verdict on the first row."""
    for label, xs in rows:
        print(
            f"  {label:<{width}} median {statistics.median(xs):6.1f} ms   p90 {pct(xs, 90):6.1f} ms"
        )
    print(f"  {per_title}:")
    for name, xs in per.items():
        print(f"    {name:<18} {statistics.median(xs):6.1f} ms")
    main = rows[0][1]
    med, p90 = statistics.median(main), pct(main, 90)
    verdict = "meets" if p90 <= target_ms else ("median meets" if med <= target_ms else "misses")
    print(f"target: <= {target_ms:.0f} ms -> {verdict} (median {med:.1f} ms, p90 {p90:.1f} ms)")
