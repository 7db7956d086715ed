"""A deployment's service rate per world, measured online from the workers' counters.

A world delivers at most what its slowest stage can: answers per second of that stage's busy
time. Each autoscaler tick takes the deployment's answers since the last tick and, for every
serving world, the busy time its busiest stage added (from the cumulative ``busy_s`` each
worker reports in its heartbeats), and smooths answers / busy seconds into one rate per
world. Deltas are taken per worker, so a worker that joins a world with counters from earlier
work (a shared or re-used worker) adds only what it did since. On a host without room, more
worlds each take longer per answer, and the rate per world falls: that is how the autoscaler
learns that a world it added brought no capacity.
"""

from __future__ import annotations


class ServiceRate:
    def __init__(self, *, smoothing: float = 0.3, min_busy_fraction: float = 0.2) -> None:
        self._smoothing = smoothing
        # Below this much busy time per second of wall time, the sample is too thin to trust.
        self._min_busy_fraction = min_busy_fraction
        self._busy: dict[str, float] = {}  # worker id -> busy_s at the last tick
        self._answered: int | None = None
        self._last_s: float | None = None
        self.per_world = 0.0  # answers per second one busy world delivers (0: unknown)

    def update(self, now_s: float, worlds: list[list[tuple[str, float]]],
               answered: int) -> float:
        """``worlds``: for each serving world, (worker id, cumulative busy_s) per rank;
        ``answered``: the deployment's answers so far. Returns the smoothed rate per world."""
        busy = 0.0
        seen: dict[str, float] = {}
        for ranks in worlds:
            deltas = [value - self._busy[wid] for wid, value in ranks if wid in self._busy]
            seen.update(ranks)
            if deltas:
                busy += max(0.0, max(deltas))
        previous_answered, previous_s = self._answered, self._last_s
        self._busy, self._answered, self._last_s = seen, answered, now_s
        if previous_answered is None or previous_s is None or now_s <= previous_s:
            return self.per_world
        answers = answered - previous_answered
        if busy > self._min_busy_fraction * (now_s - previous_s) and answers > 0:
            rate = answers / busy
            self.per_world = rate if self.per_world == 0.0 else (
                (1.0 - self._smoothing) * self.per_world + self._smoothing * rate)
        return self.per_world
