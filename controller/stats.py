"""Sliding-window latency and throughput figures for one deployment.

``record`` is on the hot path (one deque append); percentiles are computed only when status
or metrics ask, over the samples of the last ``window_s`` seconds.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter, deque
from dataclasses import dataclass

from mesh.stats import percentile

# Bucket bounds in seconds for the latency histograms (request, queue, compute): from 1 ms (a
# small model on one core) to 30 s (the default deadline), about 2.5x apart.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0)


class Histogram:
    """Fixed buckets for Prometheus, counted here so the hot path pays a bisect and two adds
    (no lock, no label lookup); controller/metrics.py reads them when scraped."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: bound >= value
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with (inf, the count)."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


@dataclass(frozen=True, slots=True)
class LatencySummary:
    count: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float



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
        # Of the requests answered ok, since the start: the whole time at the controller,
        # the wait before the last dispatch, and from that dispatch to the answer.
        self.request = Histogram()
        self.queue = Histogram()
        self.compute = Histogram()

    def record(self, now_s: float, latency_s: float, queue_s: float = 0.0) -> None:
        """One request answered ok, ``latency_s`` after it arrived, ``queue_s`` of it before
        its last dispatch to a world."""
        self._samples.append((now_s, latency_s))
        self.total_ok += 1
        self.latency_sum_s += latency_s
        self.request.observe(latency_s)
        self.queue.observe(queue_s)
        self.compute.observe(latency_s - queue_s)

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


# Bucket bounds in seconds for time per output token: from 0.5 ms to 2.5 s.
TPOT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True, slots=True)
class GenSummary:
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    tokens_per_s: float


class GenWindow:
    """A generative deployment's token-level figures: time to first token (TTFT, per stream,
    at its first chunk) and time per output token (TPOT, per stream that ends well: the time
    from its first chunk to its last over the tokens after the first), over a sliding window,
    plus Prometheus histograms and a count of the tokens delivered."""

    def __init__(self, window_s: float = 10.0, max_samples: int = 100_000, *,
                 keep_s: float = 0.0) -> None:
        self.window_s = window_s
        self.keep_s = max(window_s, keep_s)
        self._ttft: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._tpot: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._tokens: deque[tuple[float, int]] = deque(maxlen=max_samples)
        self.ttft = Histogram()
        self.tpot = Histogram(TPOT_BUCKETS_S)
        self.tokens_total = 0

    def first_token(self, now_s: float, ttft_s: float) -> None:
        self._ttft.append((now_s, ttft_s))
        self.ttft.observe(ttft_s)

    def delivered(self, now_s: float, tokens: int) -> None:
        self.tokens_total += tokens
        self._tokens.append((now_s, tokens))

    def finished(self, now_s: float, tpot_s: float) -> None:
        self._tpot.append((now_s, tpot_s))
        self.tpot.observe(tpot_s)

    def recent(self, now_s: float, window_s: float) -> tuple[int, float, int, float]:
        """(samples, TTFT p99 ms, samples, TPOT p50 ms) over the last ``window_s`` (for the
        autoscaler)."""
        ttft = _since(self._ttft, now_s - window_s)
        tpot = _since(self._tpot, now_s - window_s)
        return (len(ttft), percentile(ttft, 99) * 1000.0, len(tpot),
                percentile(tpot, 50) * 1000.0)

    def summary(self, now_s: float) -> GenSummary:
        horizon = now_s - self.keep_s
        for samples in (self._ttft, self._tpot, self._tokens):
            while samples and samples[0][0] < horizon:
                samples.popleft()
        cutoff = now_s - self.window_s
        ttft = _since(self._ttft, cutoff)
        tpot = _since(self._tpot, cutoff)
        tokens = sum(n for t, n in self._tokens if t >= cutoff)
        return GenSummary(percentile(ttft, 50) * 1000.0, percentile(ttft, 99) * 1000.0,
                          percentile(tpot, 50) * 1000.0, percentile(tpot, 99) * 1000.0,
                          tokens / self.window_s)


def _since(samples: deque[tuple[float, float]], cutoff: float) -> list[float]:
    values = []
    for t, v in reversed(samples):
        if t < cutoff:
            break
        values.append(v)
    values.sort()
    return values
