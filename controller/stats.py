"""Sliding-window latency and throughput figures for one deployment.

``record`` is on the hot path (one deque append); percentiles are computed only when status
or metrics ask, over the samples of the last ``window_s`` seconds.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LatencySummary:
    count: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in [0, 100])."""
    if not sorted_values:
        return 0.0
    # q * n first: q / 100 is inexact in binary (0.07 * 100 > 7) and would skip a rank.
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values) / 100.0) - 1))
    return sorted_values[k]


class LatencyWindow:
    """``window_s`` is what ``summary`` reports on; samples are kept for ``keep_s`` (at least
    ``window_s``), so a reader of a longer span (``recent``, for the autoscaler) still finds
    them after a status call."""

    def __init__(self, window_s: float = 10.0, max_samples: int = 200_000, *,
                 keep_s: float = 0.0) -> None:
        self.window_s = window_s
        self.keep_s = max(window_s, keep_s)
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self.total_ok = 0
        self.errors: Counter[str] = Counter()
        self.latency_sum_s = 0.0

    def record(self, now_s: float, latency_s: float) -> None:
        self._samples.append((now_s, latency_s))
        self.total_ok += 1
        self.latency_sum_s += latency_s

    def recent(self, now_s: float, window_s: float) -> tuple[int, float]:
        """(samples, p99 ms) over the last ``window_s`` seconds (for the autoscaler)."""
        cutoff = now_s - window_s
        values = []
        for t, lat in reversed(self._samples):
            if t < cutoff:
                break
            values.append(lat)
        values.sort()
        return len(values), percentile(values, 99) * 1000.0

    def record_error(self, code: str) -> None:
        self.errors[code] += 1

    def summary(self, now_s: float) -> LatencySummary:
        samples = self._samples
        horizon = now_s - self.keep_s
        while samples and samples[0][0] < horizon:
            samples.popleft()
        cutoff = now_s - self.window_s
        values = []
        first_s = now_s
        for t, lat in reversed(samples):
            if t < cutoff:
                break
            values.append(lat)
            first_s = t
        if not values:
            return LatencySummary(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        values.sort()
        # Rate over the covered span, so a fresh deployment is not under-reported.
        span = min(self.window_s, max(now_s - first_s, 1e-3))
        return LatencySummary(
            count=len(values),
            rps=len(values) / span,
            p50_ms=percentile(values, 50) * 1000.0,
            p95_ms=percentile(values, 95) * 1000.0,
            p99_ms=percentile(values, 99) * 1000.0,
            max_ms=values[-1] * 1000.0,
        )


class Arrivals(deque[float]):
    """Arrival times of accepted requests (the last 100,000), for the autoscaler's rate.
    A deque, so that recording one (``append``, per request) stays a C call."""

    def __init__(self, keep: int = 100_000) -> None:
        super().__init__(maxlen=keep)

    def rate(self, now_s: float, window_s: float) -> float:
        """Arrivals per second over the last ``window_s`` seconds."""
        cutoff = now_s - window_s
        n = 0
        for t in reversed(self):
            if t < cutoff:
                break
            n += 1
        return n / window_s
