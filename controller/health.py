"""Health: the one place that decides a worker is gone.

Two detectors, one verdict:

* **Process exits.** The launcher reports every exit of a process it started, at once, with
  its return code (a signal shows by name: ``exited with code -9 (SIGKILL)``). Exits are
  reported even for workers that never registered: the WorldManager counts those as failed
  starts and backs off.
* **Silence.** Workers heartbeat every ``heartbeat_interval_ms``; one silent for
  ``heartbeat_timeout_ms`` (a hung process, a SIGSTOP, a lost host) is declared lost, and its
  process is to be killed so it cannot come back with stale state. Silence counts only while
  the controller was listening: when its own loop stalls (a long synchronous call, a stopped
  process), the heartbeats of that time wait unread, so the stall is credited to every worker
  (``credit``, from the loop's measured lag) and a healthy worker is never blamed for it.

Each loss is reported once, through ``on_lost(worker_id, reason, kill)``: a worker that goes
silent and then exits (because it was killed for its silence) is not lost twice. The
WorldManager acts on the verdict: it breaks the worker's worlds and fences the process.
``beat`` is called from the socket pump for every heartbeat, so it is a dict store, no more.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

from mesh.actor import Actor
from mesh.loop_lag import LoopLag

# (worker id, reason, kill): kill is True when the process may still be running.
OnLost = Callable[[str, str, bool], None]


def exit_reason(returncode: int) -> str:
    """``exited with code 3``; a negative code is a signal, named: ``... -9 (SIGKILL)``."""
    reason = f"exited with code {returncode}"
    if returncode < 0:
        try:
            reason += f" ({signal.Signals(-returncode).name})"
        except ValueError:
            pass
    return reason


class Health(Actor):
    def __init__(
        self,
        *,
        timeout_ms: int,
        on_lost: OnLost,
        check_interval_ms: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__("health")
        self.timeout_s = timeout_ms / 1000.0
        self._check_s = check_interval_ms / 1000.0
        self._on_lost = on_lost
        self._clock = clock
        self._last: dict[str, float] = {}
        self._gone: set[str] = set()  # reported lost, not registered again since
        self.lag = LoopLag(self._check_s, clock=clock)

    async def on_start(self) -> None:
        self.spawn(self._loop(), name="health.loop")

    def watch(self, worker_id: str) -> None:
        """Start the silence clock of a (re)registered worker."""
        self._gone.discard(worker_id)
        self._last[worker_id] = self._clock()

    def forget(self, worker_id: str) -> None:
        self._last.pop(worker_id, None)

    def beat(self, worker_id: str) -> None:
        if worker_id in self._last:
            self._last[worker_id] = self._clock()

    def exited(self, worker_id: str, returncode: int) -> None:
        """The launcher saw the process end. Its process is gone: nothing to kill."""
        self._last.pop(worker_id, None)
        self._report(worker_id, exit_reason(returncode), kill=False)

    def credit(self, deaf_s: float) -> None:
        """The controller was not listening for ``deaf_s``: that time is no worker's silence."""
        if deaf_s > 0.0:
            for worker_id in self._last:
                self._last[worker_id] += deaf_s

    def check(self) -> list[str]:
        """Report (and stop watching) every worker silent for longer than the timeout."""
        now = self._clock()
        silent = [(w, now - t) for w, t in self._last.items() if now - t > self.timeout_s]
        for worker_id, silent_s in silent:
            del self._last[worker_id]
            self._report(worker_id, f"no heartbeat for {silent_s * 1000:.0f} ms", kill=True)
        return [w for w, _ in silent]

    def _report(self, worker_id: str, reason: str, *, kill: bool) -> None:
        if worker_id in self._gone:
            return
        self._gone.add(worker_id)
        self._on_lost(worker_id, reason, kill)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._check_s)
            self.credit(self.lag.tick())
            self.check()

    async def handle(self, message: object) -> None:
        return None
