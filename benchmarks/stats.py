"""Summary statistics of latency samples, shared by the benchmark scripts.

    summarize([0.8, 1.1, 0.9])
    # {"count": 3, "avg": 0.933.., "min": 0.8, "max": 1.1, "p50": 0.9, "p95": 1.08, "p99": 1.096}

Percentiles are ``numpy.percentile``'s default "linear" method (Hyndman & Fan type 7: with
the samples sorted ascending as ``x[0] .. x[n-1]``, the q-th percentile sits at rank
``(n - 1) * q / 100``, interpolated between its two neighbours), the method every figure in
the README was computed with. ``plot_cdf`` imports matplotlib only when a plot is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

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
    """Items per second; None when nothing was timed."""
    if seconds <= 0.0:
        return None
    return items / seconds


def cdf_points(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """The empirical CDF as (sorted samples, fraction of samples <= each): for plotting."""
    ordered = sorted(_checked(values))
    count = len(ordered)
    return ordered, [(index + 1) / count for index in range(count)]


def plot_cdf(curves: dict[str, Sequence[float]], path: Path, xlabel: str, title: str) -> None:
    """One step curve per name: the fraction of samples at or below x, as a PNG."""
    import matplotlib  # only when a plot is asked for

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, values in curves.items():
        if values:
            xs, ys = cdf_points(values)
            # start each curve at 0 so that a single sample still draws a visible step
            axes.step([xs[0], *xs], [0.0, *ys], where="post", marker=".", label=f"{name} (n={len(xs)})")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("fraction of samples")
    axes.set_xlim(left=0.0)
    axes.set_ylim(0.0, 1.02)
    axes.grid(True, alpha=0.3)
    axes.legend()
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
