"""Deadline-aware admission: take a request only if it can plausibly be answered in time.

A deployment past its capacity used to queue everything its queue could hold, and its worlds
then computed requests that had already missed their deadlines: at 2x a 10 ms model's
capacity with 500 ms deadlines, goodput fell to 5% of capacity. Admission now compares the
work ahead of a request with the deployment's measured service rate:

    wait = (backlog + 1) / capacity_rps      backlog: accepted, unanswered requests
    admit if wait <= ADMIT_SHARE * the request's timeout, else Overloaded(retry_after)

The service rate comes from two measurements:

* ``Capacity``: the rate over the last answers given while the deployment was saturated (its
  backlog at least a floor at each), the whole deployment's capacity; used while it is at
  most ``VALID_S`` old.
* Otherwise the worlds' own rates (``WorldRate``, ``worlds_rps``): each world's served
  answers over the time it held work, from its first answer on, whatever the load. Idle time
  is not counted, so a quiet deployment's low answer rate is never taken for its capacity;
  a lightly loaded world underestimates its rate (a batch of one, the round trip), so a spike
  starts conservative and admits more as the evidence grows. It is what lets a deployment
  that was idle, or quiet for longer than ``VALID_S``, refuse in the first second of a spike
  what it cannot answer in time, instead of admitting blindly until it has measured itself
  saturated (goodput of a cold spike, before and after: docs/benchmarks.md).

Answers a world gave without serving (a request cancelled, or whose deadline passed in its
queue: dropped, answered at once) count in neither: a burst of them read as service once
raised the measured rate several-fold, and admission then took in far more than could finish.
Before any answer at all nothing is refused on this ground (``max_queue`` still bounds the
queue): that lasts one service time. The retry-after hint is how long the backlog needs to
drain to where the request would have been admitted.

Generative deployments are admitted by tokens instead (``TokenCapacity``): a request's cost is
its prompt and its ``max_tokens``, not one unit.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

ADMIT_SHARE = 0.8  # of the request's timeout that the wait ahead of it may take
VALID_S = 10.0  # a capacity measured longer ago than this is not used


class Capacity:
    """The service rate over the last ``WINDOW`` answers, all given while the deployment was
    saturated (its backlog at least ``floor`` at each): a few hundred milliseconds into an
    overload, the rate at which its worlds actually answer."""

    WINDOW = 64

    __slots__ = ("_times", "floor", "measured_s", "rps")

    def __init__(self, floor: int) -> None:
        self.floor = floor  # backlog below which the deployment is not the bottleneck
        self.rps = 0.0
        self.measured_s = -math.inf  # when ``rps`` was last measured
        self._times: deque[float] = deque(maxlen=self.WINDOW)

    def answered(self, now_s: float, backlog: int, served: bool = True) -> None:
        """A world answered a request; ``backlog`` is what is still unanswered (per answer:
        an append, or a clear when the deployment is not saturated); ``served``: false when
        the world dropped it without computing it (it says nothing of the rate)."""
        if not served:
            return
        if backlog >= self.floor:
            self._times.append(now_s)
        elif self._times:
            self._times.clear()

    def estimate(self) -> float:
        """The service rate, updated from the last ``WINDOW`` saturated answers if there are
        that many (else the last estimate)."""
        times = self._times
        if len(times) == self.WINDOW and times[-1] > times[0]:
            self.rps = (self.WINDOW - 1) / (times[-1] - times[0])
            self.measured_s = times[-1]
        return self.rps

    def rate_rps(self, now_s: float, prior_rps: float = 0.0) -> float:
        """The rate admission assumes: the saturated measurement while it is fresh, else
        ``prior_rps`` (the worlds' own rates, ``worlds_rps``); 0: unknown."""
        if self.estimate() > 0.0 and now_s - self.measured_s <= VALID_S:
            return self.rps
        return prior_rps

    def retry_after_s(self, now_s: float, backlog: int, timeout_s: float,
                      prior_rps: float = 0.0) -> float:
        """0.0 to admit a request with ``timeout_s`` behind ``backlog``; else how long to wait
        before trying again."""
        if backlog < self.floor:
            return 0.0
        rate = self.rate_rps(now_s, prior_rps)
        if rate <= 0.0:
            return 0.0
        wait_s = (backlog + 1) / rate
        budget_s = ADMIT_SHARE * timeout_s
        return 0.0 if wait_s <= budget_s else wait_s - budget_s


class WorldRate:
    """One world's service rate: the answers it served over the time it held work (from the
    moment it got work while holding none to each answer), weighted towards the last
    ``1 / (1 - KEEP)`` answers so that it follows a change. Known from the first answer."""

    KEEP = 1.0 - 1.0 / 64

    __slots__ = ("_busy_s", "_served", "since_s")

    def __init__(self) -> None:
        self._busy_s = 0.0
        self._served = 0.0
        self.since_s: float | None = None  # when it last got work while holding none

    def holding(self, now_s: float) -> None:
        """It got work while holding none."""
        self.since_s = now_s

    def answered(self, now_s: float, served: bool, holding: bool) -> None:
        """It answered a request (``served``: false when it dropped it without computing
        it); ``holding``: it still holds work."""
        if self.since_s is None:
            return  # an answer for work it was not known to hold: no span to read
        keep = self.KEEP
        self._busy_s = self._busy_s * keep + max(0.0, now_s - self.since_s)
        self._served = self._served * keep + (1.0 if served else 0.0)
        self.since_s = now_s if holding else None

    @property
    def rps(self) -> float:
        """Requests a second it serves while it holds work; 0 before its first answer."""
        return self._served / self._busy_s if self._busy_s > 0.0 else 0.0


def worlds_rps(rates: Sequence[float]) -> float:
    """A deployment's service rate from its serving worlds' own (``WorldRate.rps``): their
    sum, a world with none yet counted as the mean of the others (the same model on the same
    kind of worker); 0 while no world has one."""
    known = [r for r in rates if r > 0.0]
    return len(rates) * sum(known) / len(known) if known else 0.0


class TokenCapacity:
    """A generative deployment's service rate in tokens per second, measured only while it is
    saturated (enough sequences unanswered that its worlds decode at full batch): the tokens
    delivered over the last ``WINDOW_S``. Admission then compares the tokens ahead of a request
    (every unanswered request's remaining budget, its own included) with that rate: streams on
    a world decode together, so all of them finish when the tokens ahead are produced."""

    WINDOW_S = 2.0
    MIN_SPAN_S = 0.5

    __slots__ = ("_events", "_tokens", "floor", "measured_s", "rate")

    def __init__(self, floor: int) -> None:
        self.floor = floor  # unanswered sequences below which the deployment is not saturated
        self.rate = 0.0
        self.measured_s = -math.inf
        self._events: deque[tuple[float, int]] = deque()
        self._tokens = 0

    def delivered(self, now_s: float, tokens: int, backlog: int) -> None:
        """``tokens`` reached clients; ``backlog`` sequences are unanswered."""
        events = self._events
        if backlog < self.floor:
            events.clear()
            self._tokens = 0
            return
        events.append((now_s, tokens))
        self._tokens += tokens
        while events and events[0][0] < now_s - self.WINDOW_S:
            self._tokens -= events.popleft()[1]
        span = now_s - events[0][0]
        if span >= self.MIN_SPAN_S:
            self.rate = (self._tokens - events[0][1]) / span
            self.measured_s = now_s

    def retry_after_s(self, now_s: float, backlog_tokens: int, timeout_s: float) -> float:
        """0.0 to admit a request whose tokens, with those ahead, come to ``backlog_tokens``;
        else how long to wait before trying again."""
        if self.rate <= 0.0 or now_s - self.measured_s > VALID_S:
            return 0.0
        wait_s = backlog_tokens / self.rate
        budget_s = ADMIT_SHARE * timeout_s
        return 0.0 if wait_s <= budget_s else wait_s - budget_s
