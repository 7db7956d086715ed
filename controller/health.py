"""Health: notices workers that stop talking.

Workers heartbeat every ``heartbeat_interval_ms``; a worker silent for ``heartbeat_timeout_ms``
(a hung process, a SIGSTOP, a lost host) is reported to the WorldManager, which breaks its
worlds and fences it. Process exits come from the launcher instead, which sees them at once.
``beat`` is called from the socket pump for every heartbeat, so it is a dict store, no more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from mesh.actor import Actor


class Health(Actor):
    def __init__(
        self,
        *,
        timeout_ms: int,
        on_silent: Callable[[str, float], None],
        check_interval_ms: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__("health")
        self.timeout_s = timeout_ms / 1000.0
        self._check_s = check_interval_ms / 1000.0
        self._on_silent = on_silent
        self._clock = clock
        self._last: dict[str, float] = {}

    async def on_start(self) -> None:
        self.spawn(self._loop(), name="health.loop")

    def watch(self, worker_id: str) -> None:
        self._last[worker_id] = self._clock()

    def forget(self, worker_id: str) -> None:
        self._last.pop(worker_id, None)

    def beat(self, worker_id: str) -> None:
        if worker_id in self._last:
            self._last[worker_id] = self._clock()

    def check(self) -> list[str]:
        """Report (and stop watching) every worker silent for longer than the timeout."""
        now = self._clock()
        silent = [(w, now - t) for w, t in self._last.items() if now - t > self.timeout_s]
        for worker_id, silent_s in silent:
            del self._last[worker_id]
            self._on_silent(worker_id, silent_s)
        return [w for w, _ in silent]

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._check_s)
            self.check()

    async def handle(self, message: object) -> None:
        return None
