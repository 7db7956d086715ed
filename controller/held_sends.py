"""Sends held back so that what one wake-up produced leaves as few messages as possible.

The routers (dispatches, one message per world) and the frontend (answers, one batch per
batching client) hold what they would send and hand their ``flush`` to ``defer``. Every flush
runs once the loop iteration's callbacks are done, or earlier: right after a message that
carried a batch (``now``).

Why earlier: a batch is already one message's worth of work, and holding its sends until the
socket is drained merges it with whatever else arrived meanwhile. Under a closed loop of many
callers that merging feeds on itself: the client, the controller and the worker end up passing
one convoy of requests round, each working while the others wait (echo at 128 callers on two
cores: 0.7 of a core idle). Sent on at once, a batch keeps moving while the next one is read,
and the processes overlap (docs/benchmarks.md). Single requests still wait for the iteration's
end: from clients that do not batch, that is what makes them one message per world.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

Flush = Callable[[], None]


class HeldSends:
    def __init__(self, call_soon: Callable[[Flush], object] | None = None) -> None:
        self._call_soon = call_soon
        self._due: list[Flush] = []
        self._scheduled = False

    def defer(self, flush: Flush) -> None:
        """Run ``flush`` at the end of this loop iteration, or at the next ``now``."""
        self._due.append(flush)
        if not self._scheduled:
            self._scheduled = True
            call_soon = self._call_soon or asyncio.get_running_loop().call_soon
            call_soon(self._at_iteration_end)

    def now(self) -> None:
        """Run every deferred flush (in the order deferred), and those they defer in turn."""
        while self._due:
            due, self._due = self._due, []
            for flush in due:
                try:
                    flush()
                except Exception:
                    # One owner's failure must not keep the others' sends back.
                    log.exception("a held send failed")

    def _at_iteration_end(self) -> None:
        self._scheduled = False
        self.now()
