"""One world's formation on a worker, and how the worker gives up on it from inside.

Forming a world's group blocks in its rendezvous until every rank has arrived. A TCPStore
client can neither be closed nor have its blocking wait interrupted from another thread, so a
formation whose peer had died held its thread, its store connection and its stage (pinned for
the world) until ``form_timeout_ms``, long after the controller had given up on the world.

So each formation has a ``Formation``, made before its thread starts, and the world's store is
a ``ClosableStore`` bound to it: a c10d store implemented in Python over the world's own
TCPStore client, whose waits poll (``check``, which never blocks) instead of blocking on the
socket. ``Formation.abort`` may be called from any thread: whatever the group's constructor is
waiting for, that wait raises ``FormationAborted`` within one poll, the constructor fails with
it, and the store (its client, its socket) is closed as the formation thread unwinds. The agent
aborts a formation when the controller gives up on the world (a ``leave`` for it: a break, a
drain, or the controller's own formation deadline) and when it loses the controller.

Only gloo groups meet through a ``ClosableStore``: gloo's constructor is what blocks in the
rendezvous. An NCCL group's constructor returns at once (its communicator is made at its first
operation, bounded by the world's timeout and ended by ``Comm.abort``), so it keeps the plain
client, as NCCL's own threads use the store and have never been run against a Python one.

Connecting to rank 0's store is abortable too, and a refused connection is taken for what it
is (rank 0's worker, which serves that store for as long as it lives, is gone): ``PeerLost`` at
once, where a TCPStore client retries for its whole timeout.
"""

from __future__ import annotations

import datetime
import functools
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from worker.comm import CommError, PeerLost, WorldTimeout

# A wait polls the store after 1 ms, then ever less often, at most every POLL_MAX_S: the
# latency it adds to a formation, and the longest an abort waits to be noticed.
POLL_MAX_S = 0.02
# One attempt to reach rank 0's store; attempts repeat until the formation's deadline.
CONNECT_ATTEMPT_S = 1.0


class FormationAborted(CommError):
    """The formation was given up on (by the controller, or on losing it)."""

    kind = "aborted"


class Formation:
    """The abort switch of one world's formation: made on the event loop, checked by the
    formation thread at every wait."""

    def __init__(self, label: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.reason = ""
        self._aborted = threading.Event()
        self._clock = clock

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def abort(self, reason: str) -> None:
        """Make the formation fail at its next poll (idempotent, any thread)."""
        if not self._aborted.is_set():
            self.reason = reason
            self._aborted.set()

    def check(self) -> None:
        if self._aborted.is_set():
            raise FormationAborted(f"{self.label}: formation aborted: {self.reason}")

    def wait(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll ``ready`` until it holds; ``WorldTimeout`` after ``timeout_s``,
        ``FormationAborted`` as soon as the formation is aborted."""
        deadline_s = self._clock() + timeout_s
        pause_s = 0.001
        while not ready():
            self.check()
            if self._clock() > deadline_s:
                raise WorldTimeout(f"{self.label}: {what} not within {timeout_s:.1f}s")
            self._aborted.wait(pause_s)  # an abort ends the pause at once
            pause_s = min(POLL_MAX_S, pause_s * 2)
        self.check()

    def store(self, host: str, port: int, *, connect_timeout_s: float, timeout_s: float,
              closable: bool = True) -> Any:
        """A store client of the world's own on rank 0's store at ``host:port``, closable
        through this formation (a ``ClosableStore``; with ``closable`` false the plain
        client). Connecting is retried until ``connect_timeout_s``; every operation on the
        client after that is bounded by ``timeout_s``.

        A client of its own, not one shared by the worker's worlds: a TCPStore client is one
        socket, and a blocked operation on it holds up every other (a shared client once made
        a worker's next world wait out a stuck one's whole formation timeout)."""
        import torch.distributed as dist

        deadline_s = self._clock() + connect_timeout_s
        while True:
            self.check()
            remaining_s = deadline_s - self._clock()
            if remaining_s <= 0:
                raise WorldTimeout(f"{self.label}: rendezvous store {host}:{port} not "
                                   f"reachable within {connect_timeout_s:.1f}s")
            try:
                with socket.create_connection((host, port),
                                              timeout=min(CONNECT_ATTEMPT_S, remaining_s)):
                    break
            except ConnectionRefusedError as exc:
                raise PeerLost(f"{self.label}: rendezvous store {host}:{port} refused the "
                               "connection: rank 0's worker is gone") from exc
            except OSError:  # no answer yet (a host cut off, a lost SYN): try again
                self._aborted.wait(0.1)
        client = dist.TCPStore(host, port, 1, False, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
        return closable_store(client, self) if closable else client


def closable_store(inner: Any, formation: Formation) -> Any:
    """``inner`` (a c10d store) behind a ``ClosableStore`` bound to ``formation``."""
    return _closable_store_class()(inner, formation)


@functools.cache
def _closable_store_class() -> type:
    """Built on first use: a subclass of torch's Store (worker modules import torch lazily)."""
    import torch.distributed as dist

    class ClosableStore(dist.Store):
        """The operations a group's rendezvous uses, each checking the formation first; a
        wait (and a get, which waits) polls ``check`` on the inner store instead of blocking
        on its socket, so an abort ends it. ``close`` lets go of the inner store."""

        def __init__(self, inner: Any, formation: Formation) -> None:
            super().__init__()
            self._inner = inner
            self._formation = formation

        def _store(self) -> Any:
            self._formation.check()
            inner = self._inner
            if inner is None:
                raise FormationAborted(f"{self._formation.label}: its store was closed")
            return inner

        def close(self) -> None:
            self._inner = None  # the client (and its socket) goes with the last reference

        def set(self, key: str, value: Any) -> None:
            self._store().set(key, value)

        def get(self, key: str) -> bytes:
            self.wait([key])
            return bytes(self._store().get(key))

        def add(self, key: str, amount: int) -> int:
            return int(self._store().add(key, amount))

        def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
            return bytes(self._store().compare_set(key, expected, desired))

        def check(self, keys: list[str]) -> bool:
            return bool(self._store().check(keys))

        def delete_key(self, key: str) -> bool:
            return bool(self._store().delete_key(key))

        def num_keys(self) -> int:
            return int(self._store().num_keys())

        def set_timeout(self, timeout: datetime.timedelta) -> None:
            self._store().set_timeout(timeout)

        def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
            # No reference to the inner store in this frame: an abort's traceback holds it.
            timeout_s = (timeout or self._store().timeout).total_seconds()
            self._formation.wait(lambda: bool(self._store().check(keys)), timeout_s,
                                 f"rendezvous keys {keys}")

    return ClosableStore
