"""The serving logic of one world membership, with no socket and no thread of its own.

``EntryStage`` is rank 0: it takes the controller's dispatches, batches them, computes the
first stage and pushes micro-batches down the world. ``InnerStage`` is every later rank: it
receives from the previous rank, computes its stage, and passes on or, as the last stage,
answers. Both talk to the controller through an
injected ``send`` and to their peers through the world's ``Comm``, so a test drives them with
a real gloo pair and a list for a socket. worker.runner wraps each in the thread that owns its
socket (vLLM's EngineCore / EngineCoreProc split). Generative models have stages of their own
(worker.gen_stage); these serve every other model.

Failures are sorted at this boundary: a ``CommError`` (the world's transport failed) breaks
the world and answers what it held with the retryable ``Unavailable``, so the controller
re-sends it elsewhere; any other exception from the handler is the model's failure and
answers the requests concerned with ``ModelError``, keeping the world.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from mesh import codec
from mesh.dataplane import (
    CancelWork,
    Dispatch,
    DispatchBatch,
    PackedDispatchBatch,
    dispatches,
    unpack,
)
from mesh.errors import (
    BadRequest,
    Cancelled,
    DeadlineExceeded,
    MeshError,
    ModelError,
    Unavailable,
)
from worker import pipeline
from worker.batcher import Batcher, Item
from worker.comm import HEADER_BYTES, Comm, CommError
from worker.handler import Request
from worker.world import (
    Compute,
    OnBroken,
    Replier,
    RunnerStats,
    World,
    as_model_error,
    names_and_tensors,
)

log = logging.getLogger(__name__)

# Micro-batches a stage may have on their way to the next one before it waits: this is what
# lets stage 0 compute batch n+1 while stage 1 still works on batch n.
SEND_WINDOW = 8
# Bytes of a p2p header the request list of one micro-batch may use; the rest is left for the
# tensor names, dtypes and shapes.
ITEMS_BUDGET = HEADER_BYTES - 1024

Send = Callable[[list[Any]], None]


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


def read_request(world: World, header: dict[str, Any], world_id: int, epoch: int, *,
                 closing: bool) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A dispatched request's inputs, params and kind (``header``: its decoded client
    header), or the MeshError to answer it with: it is not for this world, the world is
    closing, or it is not well formed."""
    if world_id != world.world_id or epoch != world.epoch:
        raise Unavailable(f"this runner serves world {world.world_id}/{world.epoch}")
    if closing:
        raise Unavailable(f"world {world.world_id} is closing")
    inputs = header.get("inputs")
    params = header.get("params") or {}
    kind = header.get("kind", "infer")
    if not isinstance(inputs, dict):
        raise BadRequest("'inputs' must be a map of named values")
    if not isinstance(params, dict):
        raise BadRequest("'params' must be a map")
    return inputs, params, kind


class EntryStage:
    """Rank 0 of a world."""

    def __init__(self, world: World, *, send: Send, compute: Compute, on_broken: OnBroken,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.world = world
        self.comm: Comm | None = world.comm
        self.handler = world.handler
        self.compute = compute
        self._send = send
        self._on_broken = on_broken
        self._clock = clock
        self.replier = Replier(world.world_id, world.epoch, send, packed=world.packed_replies)
        dep = world.deployment
        self.batcher = Batcher(max_batch_size=dep.max_batch_size,
                               max_batch_delay_ms=dep.max_batch_delay_ms,
                               clock=clock)
        self.stats = RunnerStats()
        self.busy = False
        self.draining = False
        self.broken: CommError | None = None
        self.last_sent_s = clock()
        self._keepalive_s = self.comm.timeout_s / 4 if self.comm is not None else None

    @property
    def queued(self) -> int:
        return len(self.batcher)

    @property
    def idle(self) -> bool:
        return not self.batcher

    # -- input ----------------------------------------------------------------------------

    def accept(self, frames: list[Any]) -> None:
        """A message from the controller: a dispatch, a batch of them, or a cancel. Answers
        it gives at once (a request it refuses) are held until ``flush``."""
        head = unpack(frames[0])
        if isinstance(head, Dispatch):
            self._accept_one(head.rid, head.world_id, head.epoch, head.deadline_ms, frames[1:])
        elif isinstance(head, PackedDispatchBatch | DispatchBatch):
            requests = dispatches(head, frames[1:])
            if not requests:
                log.warning("[%s] dropped a malformed batch of dispatches", self.world.label)
                return
            for rid, deadline_ms, part in requests:
                self._accept_one(rid, head.world_id, head.epoch, deadline_ms, part)
        elif isinstance(head, CancelWork):
            self._cancel(head.rid)
        else:
            log.warning("[%s] dropped a malformed dispatch", self.world.label)

    def flush(self) -> None:
        """Send the answers held so far."""
        self.replier.flush()

    def _accept_one(self, rid: int, world_id: int, epoch: int, deadline_ms: int,
                    frames: list[Any]) -> None:
        world = self.world
        client_id: Any = None
        try:
            header = codec.decode(frames, codec.to_torch)
            client_id = header.get("id")
            inputs, params, kind = read_request(
                world, header, world_id, epoch, closing=self.draining or self.broken is not None)
            rows = self.handler.validate(inputs, params, kind)
        except MeshError as exc:
            self.replier.error(rid, client_id, exc)
            return
        except Exception as exc:  # a handler bug: answer this request, keep serving
            log.exception("[%s] validating a request failed", world.label)
            self.replier.error(rid, client_id, ModelError(
                f"validation failed: {type(exc).__name__}: {exc}"))
            return
        now = self._clock()
        self.batcher.add(Item((rid, client_id), rows, now, now + deadline_ms / 1000.0,
                              Request(inputs, params, rows, kind)))

    def _cancel(self, rid: Any) -> None:
        """Drop work the controller already answered (cancel, deadline) from the queue. It is
        answered once more (Cancelled), which frees its slot on the controller; that answer is
        dropped there."""
        for item in self.batcher.remove(lambda it: it.token[0] == rid):
            self._answer(item, Cancelled("cancelled while queued"))

    # -- work -----------------------------------------------------------------------------

    def wait_s(self) -> float | None:
        """Seconds until ``step`` has something to do (0: now); None: only new input."""
        if self.broken is not None:
            return None
        wait = self.batcher.wait_s()
        if self._keepalive_s is not None:
            due = max(0.0, self.last_sent_s + self._keepalive_s - self._clock())
            wait = due if wait is None else min(wait, due)
        return wait

    def step(self) -> None:
        """One unit of work: a ready batch, else a keepalive if due."""
        if self.broken is not None:
            return
        try:
            batch, expired = self.batcher.take()
            for item in expired:
                self._answer(item, DeadlineExceeded("deadline passed while queued"))
            if batch:
                self._run_batch(batch)
            elif self._keepalive_s is not None:
                self._keepalive()
        except CommError as exc:
            self._break(exc)
        finally:
            self.replier.flush()

    def _waited_s(self) -> float:
        """Seconds this rank's comm has spent blocked on its peers. Rank 0's busy time leaves
        them out: a stage held up by a slower one is not itself costly, and counting the wait
        would make every stage look as slow as the bottleneck (see controller/sharing.py)."""
        return self.comm.waited_s if self.comm is not None else 0.0

    def _run_batch(self, batch: list[Item]) -> None:
        self.busy = True
        started = self._clock()
        waited = self._waited_s()
        try:
            if self.world.size == 1:
                self._run_local(batch)
            else:
                self._run_pipeline(batch)
        except CommError as exc:
            for item in batch:
                self._answer(item, Unavailable(f"world {self.world.world_id} broke: {exc.kind}"))
            raise
        except Exception as exc:
            log.exception("[%s] model failed on a batch of %d", self.world.label, len(batch))
            err = as_model_error(exc)
            for item in batch:
                self._answer(item, err)
        finally:
            self.busy = False
            stats = self.stats
            stats.batches += 1
            stats.requests += len(batch)
            stats.rows += sum(item.rows for item in batch)
            now = self._clock()
            stats.busy_s += max(0.0, now - started - (self._waited_s() - waited))
            self.last_sent_s = now

    def _run_local(self, batch: list[Item]) -> None:
        with self.compute.turn():
            outputs = self.handler.run_batch([item.payload for item in batch])
        if len(outputs) != len(batch):
            raise ModelError(f"handler returned {len(outputs)} outputs for {len(batch)} requests")
        result = self.replier.result
        for item, out in zip(batch, outputs, strict=True):
            rid, client_id = item.token
            result(rid, client_id, out)

    def _run_pipeline(self, batch: list[Item]) -> None:
        """Split into micro-batches of whole requests and push each one on."""
        comm = self.comm
        assert comm is not None
        handler = self.handler
        for group in micro_batches(batch, self.world.micro_batches):
            with self.compute.turn():
                acts = handler.forward(handler.collate([item.payload for item in group]))
            names, tensors = names_and_tensors(acts)
            message = pipeline.MicroBatch(
                tuple(pipeline.BatchItem(i.token[0], i.token[1], i.rows) for i in group),
                tuple(names))
            comm.send(1, message.to_wire(), tensors, window=SEND_WINDOW)

    def _keepalive(self) -> None:
        """An idle world's sign of life, every world_timeout / 4. The flush before it is how an
        idle rank 0 learns that rank 1 still takes what it is sent (see Comm.flush)."""
        assert self.comm is not None and self._keepalive_s is not None
        if self._clock() - self.last_sent_s < self._keepalive_s:
            return
        self.comm.flush()
        self.comm.send(1, pipeline.KEEPALIVE.to_wire(), window=SEND_WINDOW)
        self.last_sent_s = self._clock()

    # -- endings --------------------------------------------------------------------------

    def _answer(self, item: Item, error: MeshError) -> None:
        rid, client_id = item.token
        self.replier.error(rid, client_id, error)

    def _break(self, exc: CommError) -> None:
        """A world operation failed: the group is unusable. Say so, answer what is held."""
        if self.broken is not None:
            return
        self.broken = exc
        log.warning("[%s] broken: %s", self.world.label, exc)
        self.finish(Unavailable(f"world {self.world.world_id} broke: {exc.kind}"),
                    graceful=False)
        self._on_broken(self.world.world_id, self.world.epoch, str(exc), exc.kind == "peer_lost")

    def finish(self, error: MeshError, *, graceful: bool) -> None:
        """Answer everything still held with ``error``; on a graceful close, tell the later
        stages to finish what they hold and stop (they then end without a broken report)."""
        for item in self.batcher.clear():
            self._answer(item, error)
        self.replier.flush()
        comm = self.comm
        if graceful and comm is not None and self.broken is None and not comm.aborted:
            try:
                comm.send(1, pipeline.CLOSE.to_wire())
            except CommError as exc:
                log.info("[%s] closing: rank 1 did not take the close: %s", self.world.label,
                         exc)


class InnerStage:
    """Rank 1.. of a world: receive from the previous rank, compute, pass on or answer."""

    def __init__(self, world: World, *, send: Send, compute: Compute,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert world.comm is not None and world.rank > 0
        self.world = world
        self.comm: Comm = world.comm
        self.handler = world.handler
        self.compute = compute
        self._clock = clock
        self.replier = Replier(world.world_id, world.epoch, send, packed=world.packed_replies)
        self.stats = RunnerStats()
        self.busy = False

    def serve_one(self) -> bool:
        """Receive one message from the previous rank and act on it (blocking, at most the
        world's timeout). False once the world closed on purpose; CommError when it broke."""
        world = self.world
        comm = self.comm
        header, tensors = comm.recv(world.rank - 1)
        try:
            return self._serve(pipeline.decode(header), tensors)
        finally:
            self.replier.flush()

    def _serve(self, message: Any, tensors: list[Any]) -> bool:
        world = self.world
        comm = self.comm
        if isinstance(message, pipeline.Close):
            if not world.is_last:
                comm.send(world.rank + 1, message.to_wire())
            return False
        if isinstance(message, pipeline.Keepalive):
            if not world.is_last:
                comm.send(world.rank + 1, message.to_wire(), window=SEND_WINDOW)
            return True
        if not isinstance(message, pipeline.MicroBatch):
            raise CommError(f"rank {world.rank - 1} sent a {type(message).__name__} to a "
                            "batch stage")
        started = self._clock()
        self.busy = True
        try:
            with self.compute.turn():
                acts = self.handler.forward(dict(zip(message.names, tensors, strict=True)))
        except Exception as exc:
            # The model failed on these requests: answer them, keep the world.
            log.exception("[%s] stage failed on a batch", world.label)
            self._fail_items(message, as_model_error(exc))
            return True
        finally:
            self.busy = False
            self.stats.busy_s += self._clock() - started
        if not world.is_last:
            names, out = names_and_tensors(acts)
            forward = pipeline.MicroBatch(message.items, tuple(names))
            comm.send(world.rank + 1, forward.to_wire(), out, window=SEND_WINDOW)
        else:
            self._finish_batch(message, acts)
        return True

    def _fail_items(self, message: pipeline.MicroBatch, error: MeshError) -> None:
        for item in message.items:
            self.replier.error(item.rid, item.client_id, error)

    def _finish_batch(self, message: pipeline.MicroBatch, acts: dict[str, Any]) -> None:
        batch = [Request({}, {}, item.rows) for item in message.items]
        try:
            outputs = self.handler.split(acts, batch)
        except Exception as exc:
            err = as_model_error(exc)
            for item in message.items:
                self.replier.error(item.rid, item.client_id, err)
            return
        stats = self.stats
        stats.batches += 1
        stats.requests += len(message.items)
        stats.rows += sum(item.rows for item in message.items)
        for item, out in zip(message.items, outputs, strict=True):
            self.replier.result(item.rid, item.client_id, out)
