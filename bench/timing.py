"""Repeated timings and their summary: median, p95, p99, and ratios against a baseline.

Every number the suite prints comes from `repeat` (or from latencies collected the same way),
so each table's spread is measured, never assumed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Summary:
    """Order statistics of repeated timings, in seconds."""

    n: int
    median: float
    p95: float
    p99: float

    def ms(self, prefix: str, p99: bool = False) -> dict[str, float]:
        """`{prefix}_p50_ms`, `{prefix}_p95_ms` (and p99) for a table row."""
        row = {f"{prefix}_p50_ms": 1000 * self.median, f"{prefix}_p95_ms": 1000 * self.p95}
        if p99:
            row[f"{prefix}_p99_ms"] = 1000 * self.p99
        return row


def summarize(samples: Sequence[float]) -> Summary:
    """Median, p95 and p99 (linear interpolation, as numpy's default) of timings."""
    if not samples:
        raise ValueError("no samples to summarize")
    values = np.asarray(samples, dtype=np.float64)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return Summary(n=len(values), median=float(p50), p95=float(p95), p99=float(p99))


def repeat(
    fn: Callable[[], object],
    repeats: int,
    *,
    warmup: int = 1,
    budget_s: float = math.inf,
    min_repeats: int = 3,
) -> list[float]:
    """Wall times of `repeats` calls of `fn` after `warmup` untimed ones.

    Stops early once `budget_s` is spent and at least `min_repeats` were timed, so that a slow
    cell still reports a spread without eating the whole run.
    """
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    started = time.perf_counter()
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - begin)
        if len(samples) >= min_repeats and time.perf_counter() - started > budget_s:
            break
    return samples


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call, in seconds."""
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline, or None when either is missing or the baseline is zero."""
    if value is None or baseline is None or baseline <= 0:
        return None
    return value / baseline
