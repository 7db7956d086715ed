"""Health: the one place that decides a worker is gone.

Three detectors, one verdict:

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
* **A closed control connection.** A worker that joined by itself has no launcher to see it
  exit, and waiting out the whole heartbeat timeout leaves its worlds holding requests they
  will never answer. So a worker whose heartbeat is late (``probe_after_ms``) is probed:
  ``reachable`` sends it a ping, and the worker socket (ROUTER_MANDATORY) refuses at once a
  send to a peer whose connection is gone. A process that died closed its connection (the
  kernel closes it, on any host), so a worker still unreachable after ``grace_ms`` is lost.
  The grace lets a live worker whose connection merely broke reconnect; a host cut off
  keeps its connection open and is left to the heartbeat timeout.

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
        probe_after_ms: int = 0,
        grace_ms: int = 200,
        reachable: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``reachable(worker_id)`` probes a worker silent for ``probe_after_ms`` (0: never):
        False when its connection is gone."""
        super().__init__("health")
        self.timeout_s = timeout_ms / 1000.0
        self._check_s = check_interval_ms / 1000.0
        self._probe_after_s = probe_after_ms / 1000.0
        self._grace_s = grace_ms / 1000.0
        self._reachable = reachable if probe_after_ms > 0 else None
        self._on_lost = on_lost
        self._clock = clock
        self._last: dict[str, float] = {}
        self._unreachable: dict[str, float] = {}  # worker id -> first probe that failed
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
        self._unreachable.pop(worker_id, None)

    def beat(self, worker_id: str) -> None:
        if worker_id in self._last:
            self._last[worker_id] = self._clock()

    def exited(self, worker_id: str, returncode: int) -> None:
        """The launcher saw the process end. Its process is gone: nothing to kill."""
        self.forget(worker_id)
        self._report(worker_id, exit_reason(returncode), kill=False)

    def credit(self, deaf_s: float) -> None:
        """The controller was not listening for ``deaf_s``: that time is no worker's silence."""
        if deaf_s > 0.0:
            for worker_id in self._last:
                self._last[worker_id] += deaf_s

    def check(self) -> list[str]:
        """Report (and stop watching) every worker silent for longer than the timeout, or
        late and unreachable for longer than the grace."""
        now = self._clock()
        lost: list[tuple[str, str]] = []
        # A copy: a probe sends, and nothing it sets off may change what is being walked.
        for worker_id, last in list(self._last.items()):
            silent_s = now - last
            if silent_s > self.timeout_s:
                lost.append((worker_id, f"no heartbeat for {silent_s * 1000:.0f} ms"))
            elif self._reachable is not None and silent_s > self._probe_after_s:
                if self._reachable(worker_id):
                    self._unreachable.pop(worker_id, None)
                    continue
                since = self._unreachable.setdefault(worker_id, now)
                if now - since >= self._grace_s:
                    lost.append((worker_id, f"connection closed (no heartbeat for "
                                            f"{silent_s * 1000:.0f} ms, unreachable for "
                                            f"{(now - since) * 1000:.0f} ms)"))
            elif self._unreachable:
                self._unreachable.pop(worker_id, None)  # it spoke again
        for worker_id, reason in lost:
            self.forget(worker_id)
            self._report(worker_id, reason, kill=True)
        return [w for w, _ in lost]

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
