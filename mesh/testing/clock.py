"""A clock a test moves by hand, for the classes that take an injected clock (a callable
returning monotonic seconds): batcher, router, health, scheduler, autoscaler."""

from __future__ import annotations


class FakeClock:
    """Monotonic seconds that only ``advance`` moves: ``clock()`` reads it."""

    def __init__(self, start_s: float = 100.0) -> None:
        self._now_s = start_s

    @property
    def now_s(self) -> float:
        return self._now_s

    def __call__(self) -> float:
        return self._now_s

    def advance(self, seconds: float) -> float:
        """Move on by ``seconds`` (never back: a monotonic clock); returns the new time."""
        if seconds < 0:
            raise ValueError(f"a monotonic clock does not go back ({seconds} s)")
        self._now_s += seconds
        return self._now_s
