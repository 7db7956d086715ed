"""The thread and the socket of one world membership: one runner per world, on every rank.

A runner owns a thread and a DEALER socket to the controller of its own, and drives its
world's logic (worker.stage_loop) on them. So a stream decoding in one world never holds up a
batch of another world on the same worker: they wait for each other only for the device, one
computation (a batch, or one decoding step) at a time (``Compute``).

Why a thread that owns its socket, instead of an event loop handing batches to a pool? Every
hand-off between threads is a wake-up: on our 2-core machines a ``run_in_executor`` round trip
costs several times the whole controller hop (docs/benchmarks.md). Rank 0's thread blocks in
``poll`` on its socket, takes in every request that arrived, runs what is ready, sends the
answers and polls again. Later ranks block in the world's receive (at most its timeout;
keepalives come every quarter of it) and send their answers on their own socket.

Rank 0's socket is the world's entry: the controller dispatches to its identity (reported in
``Joined``). A ROUTER can address a peer only after that peer spoke, so the runner announces
itself (``HELLO``) and waits for the controller's echo before its world is called joined.

Control (leave, drain, stop) reaches the thread through a command slot and a wake-up pipe;
``leave`` returns a ``concurrent.futures.Future`` that resolves when the thread has ended.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import zmq

from mesh import dataplane
from mesh.errors import Unavailable
from mesh.messages import WorldGen
from mesh.security import ClientKeys
from mesh.transport import make_socket, readable, recv_nowait, send_nowait
from worker.comm import CommError
from worker.gen_stage import GenEntry, GenInner
from worker.stage_loop import EntryStage, InnerStage
from worker.world import Compute, OnBroken, RunnerStats, World

log = logging.getLogger(__name__)

_IDLE_POLL_MS = 1000
HANDSHAKE_TIMEOUT_S = 10.0
# How long a closing socket may keep trying to deliver the last answers.
LINGER_MS = 1000


class WorldRunner:
    def __init__(self, world: World, *, context: zmq.Context[Any], endpoint: str,
                 identity: str, compute: Compute, on_broken: OnBroken,
                 clock: Callable[[], float] = time.monotonic,
                 curve: ClientKeys | None = None) -> None:
        self.world = world
        self.identity = identity
        self._context = context
        self._endpoint = endpoint
        self._curve = curve
        self._on_broken_cb = on_broken
        self._clock = clock
        self._sock: zmq.Socket[Any] | None = None
        send = self._send
        self.core: EntryStage | InnerStage | GenEntry | GenInner
        generative = getattr(world.handler, "generative", False)
        if world.rank == 0:
            entry = GenEntry if generative else EntryStage
            self.core = entry(world, send=send, compute=compute, on_broken=self._broken,
                              clock=clock)
        else:
            inner = GenInner if generative else InnerStage
            self.core = inner(world, send=send, compute=compute, clock=clock)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # Guards the pipe's closing against a wake from another thread: a descriptor number
        # written to after it was closed may already name some other file.
        self._wake_lock = threading.Lock()
        self._ready: Future[None] = Future()
        self.done: Future[None] = Future()
        self._leave_deadline_s: float | None = None  # set: drain until then, then close
        self._graceful = True  # on leaving, tell later ranks to finish (not after an abort)
        self._leaving = False  # the worker let go of this world: no broken report
        self._thread = threading.Thread(
            target=self._run, name=f"world-{world.world_id}.{world.epoch}-r{world.rank}",
            daemon=True)

    # -- any thread -----------------------------------------------------------------------

    @property
    def stats(self) -> RunnerStats:
        return self.core.stats

    @property
    def queued(self) -> int:
        return self.core.queued if isinstance(self.core, EntryStage | GenEntry) else 0

    def gen_stats(self) -> WorldGen | None:
        """A generative world's sequences and KV cache (None for other worlds)."""
        core = self.core
        return core.gen_stats() if isinstance(core, GenEntry | GenInner) else None

    @property
    def busy(self) -> bool:
        return self.core.busy

    def start(self, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
        """Start the thread; return once the controller can route to it (blocking)."""
        self._thread.start()
        self._ready.result(timeout_s)

    def leave(self, *, drain: bool, timeout_s: float = 10.0) -> Future[None]:
        """Stop: finish queued work first (``drain``, up to ``timeout_s``) or answer it with
        Unavailable at once. The future resolves when the thread has ended."""
        self._leaving = True
        self._graceful = drain
        self._leave_deadline_s = self._clock() + (timeout_s if drain else 0.0)
        if isinstance(self.core, InnerStage | GenInner):
            # Later ranks end on the previous rank's Close, or when its group is released.
            if not drain and self.world.comm is not None:
                self.world.comm.abort()
        self._wake()
        return self.done

    def join(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w < 0:
                return  # the thread has ended
            try:
                os.write(self._wake_w, b"\x01")
            except (BlockingIOError, OSError):
                pass  # full: it wakes anyway

    # -- the runner's thread --------------------------------------------------------------

    def _send(self, frames: list[Any]) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            send_nowait(sock, frames)
        except zmq.ZMQError as exc:
            log.warning("[%s] could not send an answer: %s", self.world.label, exc)

    def _broken(self, world_id: int, epoch: int, reason: str, peer_lost: bool) -> None:
        if not self._leaving:
            self._on_broken_cb(world_id, epoch, reason, peer_lost)

    def _run(self) -> None:
        world = self.world
        sock = make_socket(self._context, zmq.DEALER, identity=self.identity.encode(),
                           curve=self._curve)
        sock.connect(self._endpoint)
        self._sock = sock
        try:
            if isinstance(self.core, GenEntry | GenInner):
                self.core.prepare()  # the stages agree on their KV room before serving
            if isinstance(self.core, EntryStage | GenEntry):
                if self._handshake(sock):
                    self._ready.set_result(None)
                    self._serve_entry(self.core, sock)
            else:
                self._ready.set_result(None)
                self._serve_inner(self.core)
        except BaseException as exc:  # the worker must hear that its runner died
            log.exception("[%s] runner crashed", world.label)
            if not self._ready.done():
                self._ready.set_exception(exc)
            self._broken(world.world_id, world.epoch, f"runner crashed: {exc!r}", False)
        finally:
            self._sock = None
            sock.close(linger=LINGER_MS)
            if world.comm is not None:
                world.comm.close()
            with self._wake_lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1
            self.done.set_result(None)

    def _handshake(self, sock: zmq.Socket[Any]) -> bool:
        """Announce this socket and wait for the controller's echo, so it can route here."""
        world = self.world
        sock.send(dataplane.pack(dataplane.Hello(world.world_id, world.epoch)))
        deadline = self._clock() + HANDSHAKE_TIMEOUT_S
        while self._leave_deadline_s is None:
            left_ms = int((deadline - self._clock()) * 1000)
            if left_ms <= 0:
                self._ready.set_exception(CommError(
                    f"no answer from the controller at {self._endpoint} to this world's "
                    f"socket within {HANDSHAKE_TIMEOUT_S:.0f}s"))
                return False
            if sock.poll(min(left_ms, 100), zmq.POLLIN):
                frames = recv_nowait(sock, 1)
                if frames and type(dataplane.unpack(frames[0])) is dataplane.Hello:
                    return True
        self._ready.set_exception(CommError("left before the controller answered"))
        return False

    def _serve_entry(self, core: EntryStage | GenEntry, sock: zmq.Socket[Any]) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        clock = self._clock
        while True:
            wait = core.wait_s()
            if self._leave_deadline_s is not None:
                wait = 0.0 if wait is None else min(wait, 0.05)
            poller.poll(_IDLE_POLL_MS if wait is None else int(wait * 1000.0 + 0.999))
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass
            while readable(sock):  # no receive that fails: see mesh.transport.readable
                frames = recv_nowait(sock, 2)
                if frames is None:
                    break
                try:
                    core.accept(frames)
                except Exception:
                    log.exception("[%s] dropped a request it could not read", self.world.label)
            core.flush()
            if self._leave_deadline_s is not None:
                core.draining = True
                if core.idle or clock() >= self._leave_deadline_s:
                    core.finish(Unavailable(f"world {self.world.world_id} closed"),
                                graceful=self._graceful)
                    return
            core.step()
            if core.broken is not None:
                return

    def _serve_inner(self, core: InnerStage | GenInner) -> None:
        world = self.world
        try:
            while core.serve_one():
                pass
            log.debug("[%s] closed by rank %d", world.label, world.rank - 1)
        except CommError as exc:
            if self._leaving:
                log.info("[%s] left: %s", world.label, exc)
                return
            log.warning("[%s] %s", world.label, exc)
            self._broken(world.world_id, world.epoch, str(exc), exc.kind == "peer_lost")
