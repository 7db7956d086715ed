"""Busy polling: the controller's loop stays awake for a while after each message.

At one caller, a request's round trip is mostly wake-ups: each process (client, controller,
worker) and each ZeroMQ I/O thread falls asleep between messages, and waking a sleeping
thread on a VM is tens of microseconds, more when the other vCPU has to be interrupted. With
``busy_poll_us`` set, the controller does not go to sleep for that long after the last message
it received: it keeps its loop turning (a callback that re-schedules itself, so the loop polls
its sockets without blocking), and the worker's answer is read the moment it lands.

The price is CPU: up to ``busy_poll_us`` of a core after every burst of messages, so it pays
where the controller has a core to itself (measured in docs/benchmarks.md: on two shared
cores it speeds up one caller and slows down a compute-bound worker). Off (0) by default. An
idle controller never spins: the window starts at a message and ends ``busy_poll_us`` later.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class BusyPoll:
    def __init__(self, window_s: float, *, clock: Callable[[], float] = time.perf_counter,
                 call_soon: Callable[[Callable[[], None]], object] | None = None) -> None:
        self.window_s = window_s
        self._clock = clock
        self._call_soon = call_soon
        self._last_s = float("-inf")
        self._spinning = False
        self._closed = False
        self.windows = 0  # spins started (a message after a quiet spell)

    @property
    def spinning(self) -> bool:
        return self._spinning

    def activity(self) -> None:
        """A message arrived: keep the loop awake until ``window_s`` after now."""
        self._last_s = self._clock()
        if self._spinning or self._closed:
            return
        if self._call_soon is None:
            self._call_soon = asyncio.get_running_loop().call_soon
        self._spinning = True
        self.windows += 1
        self._call_soon(self._spin)

    def close(self) -> None:
        self._closed = True

    def _spin(self) -> None:
        if self._closed or self._clock() - self._last_s >= self.window_s:
            self._spinning = False
            return
        assert self._call_soon is not None
        self._call_soon(self._spin)
