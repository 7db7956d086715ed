"""The worker's data plane: its own thread, its own socket, batching and compute.

Why a thread that owns a socket, instead of an event loop handing batches to a thread pool?
Every hand-off between threads is a wake-up: on our 2-core machines a ``run_in_executor``
round trip costs 70-350 us, several times the whole controller hop. Here the thread that
computes is the thread that receives and replies: it blocks in ``poll`` on the data socket,
drains every request that arrived, runs the ready batches, sends the answers, and polls again.
The asyncio loop of the worker keeps the control plane (registration, heartbeats, joins) on
a separate socket, so heartbeats keep flowing while a forward pass runs (torch releases the
GIL inside its kernels).

Commands from the control plane (add or remove a world, stop) arrive through a queue plus a
wake-up pipe; each returns a ``concurrent.futures.Future`` the caller can await.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import zmq

from mesh import codec
from mesh.errors import (
    BadRequest,
    Cancelled,
    DeadlineExceeded,
    MeshError,
    ModelError,
    Unavailable,
)
from mesh.messages import CANCEL_WORK, DISPATCH, HELLO, REPLY, REPLY_ERROR, error_header
from mesh.transport import make_socket, recv_nowait, send_nowait
from worker.batcher import Item
from worker.comm import HEADER_BYTES, CommError
from worker.handler import Request
from worker.world import (
    OnBroken,
    Replier,
    StageRunner,
    World,
    emit_stream_step,
    names_and_tensors,
)

log = logging.getLogger(__name__)

_IDLE_POLL_MS = 250
# Micro-batches a stage may have on their way to the next one before it waits: this is what
# lets stage 0 compute batch n+1 while stage 1 still works on batch n.
SEND_WINDOW = 8


# Bytes of a p2p header the request list of one micro-batch may use; the rest is left for the
# tensor names, dtypes and shapes.
ITEMS_BUDGET = HEADER_BYTES - 1024


def micro_batches(batch: list[Item], parts: int, budget: int = ITEMS_BUDGET) -> list[list[Item]]:
    """Whole requests, in order, about ``1/parts`` of the rows each, and never more requests
    than one p2p header can name: each travels as [rid, client id, rows], and a client id may
    be a string of up to MAX_ID_BYTES."""
    rows = sum(item.rows for item in batch)
    per_micro = max(1, -(-rows // parts))
    groups: list[list[Item]] = [[]]
    acc = size = 0
    for item in batch:
        client_id = item.token[1]
        cost = 24 + (len(client_id.encode()) if isinstance(client_id, str) else 9)
        if groups[-1] and (acc + item.rows > per_micro or size + cost > budget):
            groups.append([])
            acc = size = 0
        groups[-1].append(item)
        acc += item.rows
        size += cost
    return groups


class BatchStats:
    """Counters the worker reports in its heartbeats (written by the data thread only)."""

    __slots__ = ("batches", "busy_s", "requests", "rows")

    def __init__(self) -> None:
        self.batches = 0
        self.rows = 0
        self.requests = 0
        self.busy_s = 0.0


@dataclass(slots=True)
class _Command:
    op: str
    future: Future[Any]
    world: World | None = None
    world_id: int = 0
    epoch: int = 0
    drain: bool = True
    deadline_s: float = 0.0


class DataPlane:
    def __init__(
        self,
        context: zmq.Context[Any],
        endpoint: str,
        identity: str,
        *,
        on_broken: OnBroken | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identity = identity
        self._on_broken_cb = on_broken
        # One device, one computation at a time, whichever world or stage asks.
        self.compute_lock = threading.Lock()
        self._context = context
        self._endpoint = endpoint
        self._clock = clock
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name="dataplane", daemon=True)
        self._worlds: dict[int, World] = {}
        self._leaving: dict[int, _Command] = {}
        self._stopping = False
        self.stats = BatchStats()
        self.queued = 0
        self.busy = False
        self.started = threading.Event()
        self._generating: set[Any] = set()  # rids whose decode loop runs now
        self._cancelled: set[Any] = set()
        self.fault_delay_s = 0.0  # fault injection: added to every computation
        self.crashed: BaseException | None = None

    # -- control-plane side (any thread) --------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def add_world(self, world: World) -> Future[Any]:
        return self._command(_Command("add", Future(), world=world))

    def remove_world(self, world_id: int, epoch: int, *, drain: bool,
                     timeout_s: float = 10.0) -> Future[Any]:
        return self._command(_Command("remove", Future(), world_id=world_id, epoch=epoch,
                                      drain=drain, deadline_s=self._clock() + timeout_s))

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._thread.is_alive():
            self._command(_Command("stop", Future()))
            self._thread.join(timeout_s)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _command(self, cmd: _Command) -> Future[Any]:
        self._commands.put(cmd)
        try:
            os.write(self._wake_w, b"\x01")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the thread is about to wake anyway
        return cmd.future

    # -- the data thread ------------------------------------------------------------------

    def _run(self) -> None:
        sock = make_socket(self._context, zmq.DEALER, identity=self.identity.encode())
        sock.connect(self._endpoint)
        # Announce this identity, so the controller's ROUTER can address us before we speak.
        sock.send(codec.pack([HELLO]))
        self._sock = sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        self.started.set()
        try:
            while not self._stopping:
                poller.poll(self._timeout_ms())
                self._apply_commands()
                self._receive()
                self._compute()
                self._keepalive()
        except BaseException as exc:  # the worker must hear that its data plane died
            self.crashed = exc
            log.exception("[worker %s] data plane crashed", self.identity)
        finally:
            for world in list(self._worlds.values()):
                self._fail_world(world, Unavailable("worker is stopping"))
            sock.close(linger=0)

    def _timeout_ms(self) -> int:
        wait: float | None = None
        for world in self._worlds.values():
            w = world.batcher.wait_s()
            if w is not None and (wait is None or w < wait):
                wait = w
        if self._leaving:
            wait = 0.05 if wait is None else min(wait, 0.05)
        now = self._clock()
        for world in self._worlds.values():
            if world.rank == 0 and world.comm is not None and world.broken is None:
                due = world.last_sent_s + world.comm.timeout.total_seconds() / 4 - now
                wait = max(0.0, due) if wait is None else max(0.0, min(wait, due))
        if wait is None:
            return _IDLE_POLL_MS
        return max(0, int(wait * 1000.0 + 0.999))

    def _apply_commands(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd.op == "add" and cmd.world is not None:
                world = cmd.world
                self._worlds[world.world_id] = world
                if world.rank > 0:
                    world.runner = StageRunner(
                        world, context=self._context, endpoint=self._endpoint,
                        identity=f"{self.identity}/{world.world_id}.{world.epoch}",
                        on_broken=self._report_broken, compute_lock=self.compute_lock,
                        stats=self.stats, fault_delay=lambda: self.fault_delay_s)
                    world.runner.start()
                cmd.future.set_result(None)
            elif cmd.op == "remove":
                gone = self._worlds.get(cmd.world_id)
                if gone is None or gone.epoch != cmd.epoch:
                    cmd.future.set_result(None)
                elif cmd.drain:
                    gone.draining = True
                    self._leaving[cmd.world_id] = cmd
                else:
                    self._fail_world(gone, Unavailable(f"world {gone.world_id} aborted"))
                    cmd.future.set_result(None)
            elif cmd.op == "stop":
                self._stopping = True
                cmd.future.set_result(None)
        now = self._clock()
        for world_id, cmd in list(self._leaving.items()):
            leaving = self._worlds.get(world_id)
            if leaving is None:
                del self._leaving[world_id]
                cmd.future.set_result(None)
            elif len(leaving.batcher) == 0 or now >= cmd.deadline_s:
                if leaving.rank == 0 and leaving.comm is not None and leaving.broken is None:
                    try:  # let the later stages finish what they hold, then stop
                        leaving.comm.send(1, {"k": "x"})
                    except CommError:
                        pass
                self._fail_world(leaving, Unavailable(f"world {world_id} closed"))
                del self._leaving[world_id]
                cmd.future.set_result(None)

    def _fail_world(self, world: World, error: MeshError) -> None:
        for item in world.batcher.clear():
            self._send_error(world, item.token, error)
        self._worlds.pop(world.world_id, None)
        world.close()

    def _report_broken(self, world_id: int, epoch: int, reason: str, peer_lost: bool) -> None:
        if self._on_broken_cb is not None:
            self._on_broken_cb(world_id, epoch, reason, peer_lost)

    def _broken(self, world: World, exc: CommError) -> None:
        """A world operation failed: the group is unusable. Say so, and stop using it."""
        if world.broken is not None:
            return
        world.broken = str(exc)
        log.warning("[worker %s world %d/%d] broken: %s", self.identity, world.world_id,
                    world.epoch, exc)
        self._report_broken(world.world_id, world.epoch, str(exc), exc.kind == "peer_lost")
        self._fail_world(world, Unavailable(f"world {world.world_id} broke: {exc.kind}"))

    def _receive(self) -> None:
        sock = self._sock
        while True:
            frames = recv_nowait(sock, 2)
            if frames is None:
                break
            try:
                self._accept(frames)
            except Exception:
                log.exception("[worker %s] dropped a request it could not read", self.identity)
        self.queued = sum(len(w.batcher) for w in self._worlds.values())

    def _accept(self, frames: list[Any]) -> None:
        head = codec.unpack_header(frames[0])
        if isinstance(head, list) and len(head) >= 4 and head[0] == CANCEL_WORK:
            self._cancel(head[1], head[2])
            return
        if not isinstance(head, list) or len(head) < 5 or head[0] != DISPATCH:
            log.warning("[worker %s] dropped a malformed dispatch", self.identity)
            return
        _, rid, world_id, epoch, deadline_ms = head[:5]
        world = self._worlds.get(world_id)
        client_id: Any = None
        try:
            header = codec.decode(frames[1:], codec.to_torch)
            client_id = header.get("id")
            if world is None or world.epoch != epoch or world.draining:
                raise Unavailable(f"{self.identity} is not serving world {world_id}/{epoch}")
            if world.rank != 0:
                raise Unavailable(f"{self.identity} is rank {world.rank} of world {world_id}")
            inputs = header.get("inputs")
            params = header.get("params") or {}
            kind = header.get("kind", "infer")
            if not isinstance(inputs, dict):
                raise BadRequest("'inputs' must be a map of named values")
            if not isinstance(params, dict):
                raise BadRequest("'params' must be a map")
            rows = world.handler.validate(inputs, params, kind)
        except MeshError as exc:
            self._send_error_raw(rid, world_id, epoch, client_id, exc)
            return
        except Exception as exc:  # a handler bug: answer this request, keep serving
            log.exception("[worker %s] validating a request failed", self.identity)
            self._send_error_raw(rid, world_id, epoch, client_id,
                                 ModelError(f"validation failed: {type(exc).__name__}: {exc}"))
            return
        now = self._clock()
        world.batcher.add(Item((rid, client_id), rows, now, now + deadline_ms / 1000.0,
                               Request(inputs, params, rows, kind)))

    def _cancel(self, rid: Any, world_id: Any) -> None:
        """Stop work the controller already answered (cancel, deadline): drop it from the
        queue, or stop its decode loop at the next step. Either way it is answered once more
        (Cancelled), which frees its slot on the controller; that answer is dropped there."""
        world = self._worlds.get(world_id)
        if world is None:
            return
        for item in world.batcher.remove(lambda it: it.token[0] == rid):
            self._send_error(world, item.token, Cancelled("cancelled while queued"))
        # It may be decoding now, or wait in the batch being decoded: stop it when it starts.
        if len(self._cancelled) > 10_000:
            self._cancelled.clear()
        self._cancelled.add(rid)

    def _compute(self) -> None:
        for world in list(self._worlds.values()):
            if world.rank != 0:
                continue
            batch, expired = world.batcher.take()
            for item in expired:
                self._send_error(world, item.token,
                                 DeadlineExceeded("deadline passed while queued"))
            if batch:
                self._run_batch(world, batch)
        self.queued = sum(len(w.batcher) for w in self._worlds.values())

    def _run_batch(self, world: World, batch: list[Item]) -> None:
        self.busy = True
        started = self._clock()
        if self.fault_delay_s:
            time.sleep(self.fault_delay_s)
        try:
            if world.handler.streaming:
                for item in batch:
                    self._generate(world, item)
            elif world.size == 1:
                self._run_local(world, batch)
            else:
                self._run_pipeline(world, batch)
        except CommError as exc:
            self._broken(world, exc)
            for item in batch:
                self._send_error(world, item.token,
                                 Unavailable(f"world {world.world_id} broke: {exc.kind}"))
        except Exception as exc:
            log.exception("[worker %s world %d/%d] model failed on a batch of %d",
                          self.identity, world.world_id, world.epoch, len(batch))
            err = exc if isinstance(exc, MeshError) else ModelError(f"{type(exc).__name__}: {exc}")
            for item in batch:
                self._send_error(world, item.token, err)
        finally:
            self.busy = False
            stats = self.stats
            stats.batches += 1
            stats.requests += len(batch)
            stats.rows += sum(item.rows for item in batch)
            stats.busy_s += self._clock() - started
            world.last_sent_s = self._clock()

    def _run_local(self, world: World, batch: list[Item]) -> None:
        with self.compute_lock:
            outputs = world.handler.run_batch([item.payload for item in batch])
        if len(outputs) != len(batch):
            raise ModelError(f"handler returned {len(outputs)} outputs for {len(batch)} requests")
        replier = self._replier(world)
        for item, out in zip(batch, outputs, strict=True):
            rid, client_id = item.token
            replier.result(rid, client_id, out)

    def _run_pipeline(self, world: World, batch: list[Item]) -> None:
        """Stage 0: split into micro-batches of whole requests and push each one on."""
        comm = world.comm
        assert comm is not None
        handler = world.handler
        for group in micro_batches(batch, world.micro_batches):
            with self.compute_lock:
                acts = handler.forward(handler.collate([item.payload for item in group]))
            names, tensors = names_and_tensors(acts)
            items = [[item.token[0], item.token[1], item.rows] for item in group]
            comm.send(1, {"k": "b", "items": items, "n": names}, tensors, window=SEND_WINDOW)

    def _generate(self, world: World, item: Item) -> None:
        """The decode loop of one request, driven from stage 0 (and inside the world)."""
        handler = world.handler
        request: Request = item.payload
        rid = item.token[0]
        steps = handler.gen_steps(request)
        skip = int(request.params.get("skip", 0))
        replier = self._replier(world)
        texts: dict[Any, list[str]] = {}
        if rid in self._cancelled:
            self._cancelled.discard(rid)
            replier.error(rid, item.token[1], Cancelled("cancelled before it started"))
            return
        tensors = handler.gen_start(request)
        self._generating.add(rid)
        try:
            self._decode(world, item, request, replier, texts, tensors, steps, skip)
        finally:
            self._generating.discard(rid)
            self._cancelled.discard(rid)

    def _decode(self, world: World, item: Item, request: Request, replier: Replier,
                texts: dict[Any, list[str]], tensors: dict[str, Any], steps: int,
                skip: int) -> None:
        handler = world.handler
        rid, client_id = item.token
        for step in range(steps):
            # Between steps, take in what arrived: new requests queue, cancels land here.
            self._receive()
            if rid in self._cancelled:
                replier.error(rid, client_id, Cancelled("stopped: the caller cancelled"))
                return
            if self._clock() > item.deadline_s:
                replier.error(rid, client_id, DeadlineExceeded("deadline passed while generating"))
                return
            last = step == steps - 1
            with self.compute_lock:
                acts = handler.forward(tensors)
            if world.size == 1:
                tokens = handler.gen_pick(acts)
                emit_stream_step(replier, handler, texts, rid, client_id, request.kind, skip,
                                 step, tokens[0], last)
            else:
                comm = world.comm
                assert comm is not None
                names, out = names_and_tensors(acts)
                comm.send(1, {"k": "g", "items": [[rid, client_id, request.kind, skip]],
                              "step": step, "last": last, "n": names}, out)
                header, _ = comm.recv(world.size - 1)
                if header.get("error"):
                    return  # a later stage failed and already answered this request
                tokens = header["tokens"]
            tensors = handler.gen_extend(tensors, tokens)

    def _keepalive(self) -> None:
        """Idle multi-stage worlds ping down the pipeline, so waiting ranks never time out."""
        now = self._clock()
        for world in list(self._worlds.values()):
            comm = world.comm
            if world.rank != 0 or comm is None or world.broken is not None:
                continue
            try:
                comm.reap(SEND_WINDOW)
                if now - world.last_sent_s >= comm.timeout.total_seconds() / 4:
                    world.last_sent_s = now
                    comm.send(1, {"k": "p"}, window=SEND_WINDOW)
            except CommError as exc:
                self._broken(world, exc)

    # -- replies --------------------------------------------------------------------------

    def _send(self, frames: list[Any]) -> None:
        try:
            send_nowait(self._sock, frames)
        except zmq.ZMQError as exc:
            log.warning("[worker %s] could not send an answer: %s", self.identity, exc)

    def _replier(self, world: World) -> Replier:
        return Replier(world.world_id, world.epoch, self._send)

    def _send_error(self, world: World, token: Any, error: MeshError) -> None:
        rid, client_id = token
        self._send_error_raw(rid, world.world_id, world.epoch, client_id, error)

    def _send_error_raw(self, rid: Any, world_id: Any, epoch: Any, client_id: Any,
                        error: MeshError) -> None:
        header = codec.pack(error_header(client_id, error.code, error.message, error.retryable))
        self._send([codec.pack([REPLY, rid, world_id, epoch, REPLY_ERROR]), header])
