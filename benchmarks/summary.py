"""Summary statistics of benchmark samples: count, mean, extremes, percentiles, throughput, CDF.

``summarize([4.0, 1.0, 3.0, 2.0])`` is ``{"count": 4, "avg": 2.5, "min": 1.0, "max": 4.0,
"p50": 2.5, "p95": 3.85, "p99": 3.97}``; a NaN sample is refused, not averaged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

# Percentiles are numpy.percentile's default "linear" method (Hyndman & Fan type 7: with the
# samples sorted as x[0] .. x[n-1], the q-th percentile sits at rank (n - 1) * q / 100,
# interpolated between its neighbours), the method every figure in the README was computed with.
SUMMARY_PERCENTILES = (50, 95, 99)
SUMMARY_KEYS = ("count", "avg", "min", "max", "p50", "p95", "p99")


def _checked(values: Iterable[float]) -> list[float]:
    samples = [float(value) for value in values]
    if any(math.isnan(sample) for sample in samples):
        raise ValueError("samples contain NaN; drop failed measurements before summarizing")
    return samples


def summarize(values: Iterable[float]) -> dict[str, float | int | None]:
    """``count``, ``avg``, ``min``, ``max``, ``p50``, ``p95``, ``p99`` of ``values``.

    No samples (every request failed) gives ``count`` 0 and None for the rest, so that a
    report can still be written and read. NaN raises ``ValueError``: a failed measurement
    must be dropped, not averaged.
    """
    samples = _checked(values)
    if not samples:
        return {"count": 0, **{key: None for key in SUMMARY_KEYS[1:]}}
    percentiles = np.percentile(samples, SUMMARY_PERCENTILES, method="linear")
    return {
        "count": len(samples),
        "avg": math.fsum(samples) / len(samples),
        "min": min(samples),
        "max": max(samples),
        **{f"p{q}": float(value) for q, value in zip(SUMMARY_PERCENTILES, percentiles, strict=True)},
    }


def throughput(items: int, seconds: float) -> float | None:
    """Items per second; None when nothing was"""
    if seconds <= 0.0:
        return None
    return items / seconds


def cdf_points(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """The empirical CDF as (sorted samples, fraction of samples <= each): for plotting."""
    ordered = sorted(_checked(values))
    count = len(ordered)
    return ordered, [(index + 1) / count for index in range(count)]
