"""How long this process was not listening: its event loop's lag, measured from a periodic task.

A process whose loop is blocked (a long synchronous call, a stopped process, a starved CPU)
hears nothing, but silence it did not listen for is no evidence against its peers. Whoever
judges a peer by silence (Health in the controller, the watchdog in a worker) ticks a
``LoopLag`` from its periodic task and credits the peers with the time the loop was deaf:
the gap between two ticks beyond the period and a little slack.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class LoopLag:
    def __init__(self, period_s: float, *, slack_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = period_s
        # Late by less than this is an ordinary busy loop, not deafness.
        self.slack_s = max(0.05, 2 * period_s) if slack_s is None else slack_s
        self._clock = clock
        self._last_s: float | None = None
        self.total_s = 0.0  # deaf time so far
        self.max_s = 0.0  # the longest single stall
        self.last_end_s = float("-inf")  # when the loop last came back from a stall

    def tick(self) -> float:
        """Called once per period; returns the seconds the loop was deaf since the last call."""
        now = self._clock()
        last, self._last_s = self._last_s, now
        if last is None:
            return 0.0
        deaf = now - last - self.period_s - self.slack_s
        if deaf <= 0.0:
            return 0.0
        self.total_s += deaf
        self.max_s = max(self.max_s, deaf)
        self.last_end_s = now
        return deaf
