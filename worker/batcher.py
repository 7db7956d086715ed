"""The dynamic batching policy, as a plain object with an injected clock (no threads, no I/O).

A batch is ready when any of these holds:

* the queue holds ``max_batch_size`` rows;
* the queue holds at least as many rows as the previous batch had (the concurrency we saw
  recently: a closed loop of N callers keeps coming back N at a time);
* the oldest queued request has waited ``max_batch_delay_ms``.

So a lone caller is served at once (its previous batch had one row: no added delay), a burst
is served together, and no request waits on stragglers longer than the configured delay. The
data plane asks ``ready`` whenever it is free to compute, and sleeps until ``wait_s`` when not.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Item:
    """One validated request waiting for a batch."""

    token: Any  # whatever the owner needs to answer it
    rows: int
    arrived_s: float
    deadline_s: float
    payload: Any = None


class Batcher:
    def __init__(self, *, max_batch_size: int, max_batch_delay_ms: float,
                 clock: Callable[[], float]) -> None:
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_ms / 1000.0
        self._clock = clock
        self._queue: deque[Item] = deque()
        self._rows = 0
        self._target = 1

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def rows(self) -> int:
        return self._rows

    def add(self, item: Item) -> None:
        self._queue.append(item)
        self._rows += item.rows

    def wait_s(self) -> float | None:
        """Seconds until a batch becomes ready by delay; 0 if ready now; None if empty."""
        if not self._queue:
            return None
        if self._rows >= min(self._target, self.max_batch_size):
            return 0.0
        waited = self._clock() - self._queue[0].arrived_s
        return max(0.0, self.max_batch_delay_s - waited)

    def take(self, *, force: bool = False) -> tuple[list[Item], list[Item]]:
        """If a batch is ready (or ``force``), remove it: (batch, expired items skipped)."""
        wait = self.wait_s()
        if wait is None or (wait > 0.0 and not force):
            return [], []
        by_delay = self._rows < min(self._target, self.max_batch_size)
        now = self._clock()
        batch: list[Item] = []
        expired: list[Item] = []
        rows = 0
        queue = self._queue
        while queue:
            item = queue[0]
            if batch and rows + item.rows > self.max_batch_size:
                break
            queue.popleft()
            self._rows -= item.rows
            if item.deadline_s <= now:
                expired.append(item)
                continue
            batch.append(item)
            rows += item.rows
        if batch:
            # Track recent concurrency: shrink when the delay fired first, grow when more came.
            self._target = rows if by_delay else max(self._target, rows)
        return batch, expired

    def remove(self, match: Callable[[Item], bool]) -> list[Item]:
        """Take the queued items ``match`` selects out of the queue."""
        gone = [item for item in self._queue if match(item)]
        for item in gone:
            self._queue.remove(item)
            self._rows -= item.rows
        return gone

    def clear(self) -> list[Item]:
        items = list(self._queue)
        self._queue.clear()
        self._rows = 0
        return items
