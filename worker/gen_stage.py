"""The serving logic of a generative world: many sequences decoded together, a KV cache per
stage, the pipeline kept full. No socket and no thread of its own (worker.runner drives it).

``GenEntry`` is rank 0. It admits the controller's dispatches as sequences of a
``Scheduler`` (worker.gen_scheduler), and each time it may it runs the scheduler's next
micro-batch through its own stage and sends it on (``GenStep``), up to one micro-batch in
flight per stage; when it may not, it waits for the last stage's ``GenTokens`` and hands them
back to the scheduler. Cancels and deadlines end a sequence here; its KV goes with the next
micro-batch. ``GenInner`` is every later rank: it drops what the step says to drop, runs its
stage, and passes on or, as the last stage, samples and answers (worker.gen_outputs) and
sends the tokens back to rank 0 before its answers leave. A one-stage world does all of it
in rank 0.

Each stage keeps its own KV cache (worker.kv_cache). As the world starts every later rank
tells rank 0 how many KV blocks it can hold (``KvInfo``), and rank 0 schedules within the
smallest, so no stage ever runs out.

Failures are sorted as in worker.stage_loop: a ``CommError`` breaks the world (every sequence
is answered ``Unavailable`` and the controller re-sends it, streams from the tokens their
clients already have); a model failure answers the sequences of that micro-batch with
``ModelError`` at the stage that failed and the world carries on.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import replace
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
from mesh.messages import ClientKind, WorldGen
from worker import pipeline
from worker.comm import Comm, CommError
from worker.gen_outputs import Outputs
from worker.gen_scheduler import Plan, Scheduler, Seq
from worker.generative import GenerativeHandler, SeqSlice, StepBatch
from worker.kv_cache import MB, KvCache
from worker.stage_loop import SEND_WINDOW, Send, read_request
from worker.world import Compute, OnBroken, Replier, RunnerStats, World, as_model_error

log = logging.getLogger(__name__)

HIDDEN = ("h",)  # the one tensor a GenStep carries: hidden states [tokens, hidden]


def new_cache(world: World) -> KvCache:
    handler: GenerativeHandler = world.handler  # type: ignore[assignment]
    return KvCache(handler.kv_layout(), budget_bytes=int(world.deployment.kv_cache_mb * MB),
                   device=getattr(handler, "device", "cpu"))


def build_batch(cache: KvCache, chunks: tuple[pipeline.GenChunk, ...] | list[pipeline.GenChunk],
                *, device: Any, tokens: list[int] | None = None, hidden: Any = None
                ) -> StepBatch:
    """The packed batch of ``chunks``, each sequence's storage grown to hold its chunk."""
    import torch

    seqs = []
    positions: list[int] = []
    last_rows: list[int] = []
    row = 0
    for c in chunks:
        kv = cache.reserve(c.sid, c.pos + c.n)
        seqs.append(SeqSlice(c.sid, row, c.n, c.pos, kv))
        positions.extend(range(c.pos, c.pos + c.n))
        row += c.n
        if c.sample:
            last_rows.append(row - 1)
    on = str(device) != "cpu"

    def tensor(values: list[int]) -> Any:
        t = torch.tensor(values, dtype=torch.long)
        return t.to(device, non_blocking=True) if on else t

    return StepBatch(seqs=seqs, positions=tensor(positions), last_rows=tensor(last_rows),
                     tokens=None if tokens is None else tensor(tokens), hidden=hidden)


def join_of(seq: Seq) -> pipeline.GenJoin:
    rid, client_id = seq.token
    return pipeline.GenJoin(seq.sid, rid, client_id, seq.kind, seq.params.to_wire(),
                            seq.prompt_len, list(seq.resume.tokens), seq.resume.chunks)


class GenEntry:
    """Rank 0 of a generative world."""

    def __init__(self, world: World, *, send: Send, compute: Compute, on_broken: OnBroken,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.world = world
        self.comm: Comm | None = world.comm
        self.handler: GenerativeHandler = world.handler  # type: ignore[assignment]
        self.compute = compute
        self._on_broken = on_broken
        self._clock = clock
        self._rng = rng or random.Random()
        self.replier = Replier(world.world_id, world.epoch, send, packed=world.packed_replies)
        dep = world.deployment
        self.cache = new_cache(world)
        self.scheduler = Scheduler(max_seqs=dep.max_seqs, max_batch_tokens=dep.max_batch_tokens,
                                   total_blocks=self.cache.total_blocks, stages=world.size,
                                   block_tokens=self.cache.block_tokens, clock=clock)
        self.outputs = Outputs(self.handler, self.replier) if world.size == 1 else None
        self._by_rid: dict[Any, Seq] = {}
        self._sids = itertools.count(1)
        self.stats = RunnerStats()
        self.generated = 0  # tokens sampled for this world's sequences
        self.busy = False
        self.draining = False
        self.broken: CommError | None = None
        self.last_sent_s = clock()
        self._keepalive_s = self.comm.timeout_s / 4 if self.comm is not None else None

    def prepare(self) -> None:
        """Learn every later stage's KV room (runner thread, before serving): the world
        schedules within the smallest."""
        comm = self.comm
        if comm is None:
            return
        blocks = self.cache.total_blocks
        for rank in range(1, self.world.size):
            message, _ = pipeline.recv(comm, rank)
            if not isinstance(message, pipeline.KvInfo):
                raise CommError(f"expected rank {rank}'s KV room, got {type(message).__name__}")
            blocks = min(blocks, message.blocks)
        self.scheduler.total_blocks = blocks

    @property
    def queued(self) -> int:
        return len(self.scheduler)

    @property
    def idle(self) -> bool:
        return not self.scheduler.busy

    def gen_stats(self) -> WorldGen:
        s = self.scheduler
        return WorldGen(world_id=self.world.world_id, running=len(s.running),
                        waiting=len(s.waiting), kv_used_bytes=self.cache.used_bytes,
                        kv_budget_bytes=self.cache.budget_bytes, preemptions=s.preemptions,
                        generated=self.generated)

    # -- input ----------------------------------------------------------------------------

    def accept(self, frames: list[Any]) -> None:
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
            if kind not in (ClientKind.INFER, ClientKind.STREAM):
                raise BadRequest(f"this model answers 'infer' and 'stream', not {kind!r}")
            request = self.handler.parse_request(inputs, params)
            total = len(request.prompt) + request.params.max_tokens
            room = self.scheduler.capacity_tokens
            if total > room:
                raise BadRequest(
                    f"prompt ({len(request.prompt)} tokens) + max_tokens "
                    f"({request.params.max_tokens}) = {total} exceeds the KV budget of {room} "
                    f"tokens a sequence can hold (kv_cache_mb = {world.deployment.kv_cache_mb:g})")
        except MeshError as exc:
            self.replier.error(rid, client_id, exc)
            return
        except Exception as exc:  # a handler bug: answer this request, keep serving
            log.exception("[%s] reading a request failed", world.label)
            self.replier.error(rid, client_id, ModelError(
                f"validation failed: {type(exc).__name__}: {exc}"))
            return
        sampling = request.params
        if not sampling.greedy and sampling.seed is None:
            sampling = replace(sampling, seed=self._rng.getrandbits(63))
        now = self._clock()
        seq = Seq(next(self._sids), (rid, client_id), kind, len(request.prompt),
                  [*request.prompt, *request.resume.tokens], sampling, request.resume,
                  now, now + deadline_ms / 1000.0, generated=len(request.resume.tokens))
        old = self._by_rid.pop(rid, None)
        if old is not None:
            self.scheduler.end(old, "replaced")
        self._by_rid[rid] = seq
        self.scheduler.add(seq)

    def _cancel(self, rid: Any) -> None:
        """Stop a sequence the controller already answered (cancel, deadline). It is answered
        once more (Cancelled), which frees its slot there; that answer is dropped there."""
        seq = self._by_rid.pop(rid, None)
        if seq is None:
            return
        self.scheduler.end(seq, "cancelled")
        self._answer(seq, Cancelled("cancelled"))

    # -- work -----------------------------------------------------------------------------

    def wait_s(self) -> float | None:
        if self.broken is not None:
            return None
        if self.scheduler.busy:
            return 0.0
        if self._keepalive_s is not None:
            return max(0.0, self.last_sent_s + self._keepalive_s - self._clock())
        return None

    def step(self) -> None:
        """One unit of work: run the next micro-batch, else take back the oldest one in
        flight, else a keepalive if due."""
        if self.broken is not None:
            return
        try:
            for seq in self.scheduler.expire(self._clock()):
                self._by_rid.pop(seq.token[0], None)
                self._answer(seq, DeadlineExceeded("deadline passed while generating"))
            plan = self.scheduler.plan()
            if plan is not None:
                self._run(plan)
            elif self.scheduler.in_flight:
                self._collect()
            elif self._keepalive_s is not None:
                self._keepalive()
        except CommError as exc:
            self._break(exc)
        finally:
            self.replier.flush()

    def _waited_s(self) -> float:
        return self.comm.waited_s if self.comm is not None else 0.0

    def _run(self, plan: Plan) -> None:
        started = self._clock()
        waited = self._waited_s()
        self.busy = True
        chunks = tuple(pipeline.GenChunk(c.seq.sid, c.start, c.n, c.sample)
                       for c in plan.chunks)
        try:
            for sid in (*plan.frees, *plan.preempts):
                self.cache.free(sid)
            out = None
            try:
                if chunks:
                    batch = build_batch(self.cache, chunks, device=self.handler.device,
                                        tokens=[t for c in plan.chunks
                                                for t in c.seq.tokens[c.start:c.start + c.n]])
                    with self.compute.turn():
                        out = self.handler.step(batch)
                if self.outputs is not None:
                    self._finish_locally(plan, chunks, out)
                    return
            except CommError:
                raise
            except Exception as exc:
                log.exception("[%s] the model failed on a micro-batch of %d sequences",
                              self.world.label, len(chunks))
                out = None
                chunks = self._fail(plan, as_model_error(exc))
                if self.outputs is not None:
                    self._returned(plan.step, {}, ())
                    return
            assert self.comm is not None
            step = pipeline.GenStep(plan.step, chunks, tuple(join_of(s) for s in plan.joins),
                                    tuple(plan.frees), tuple(plan.preempts), (),
                                    HIDDEN if out is not None else ())
            pipeline.send(self.comm, 1, step, [out] if out is not None else [],
                          window=SEND_WINDOW)
        finally:
            self.busy = False
            now = self._clock()
            self.stats.busy_s += max(0.0, now - started - (self._waited_s() - waited))
            self.stats.batches += 1
            self.stats.rows += sum(c.n for c in chunks)
            self.last_sent_s = now

    def _finish_locally(self, plan: Plan, chunks: tuple[pipeline.GenChunk, ...],
                        logits: Any) -> None:
        """A one-stage world: sample and answer here."""
        outputs = self.outputs
        assert outputs is not None
        for sid in plan.frees:
            outputs.drop(sid)
        for seq in plan.joins:
            outputs.join(join_of(seq))
        sampling = [c.sid for c in chunks if c.sample]
        sampled = outputs.sample(sampling, logits) if sampling else {}
        self._returned(plan.step, sampled, ())

    def _fail(self, plan: Plan, error: MeshError) -> tuple[pipeline.GenChunk, ...]:
        """The model failed on ``plan`` here: answer its sequences and end them; the later
        stages still get the plan's drops (and those of the ended ones) in an empty step."""
        for chunk in plan.chunks:
            seq = chunk.seq
            if not seq.ended:
                self._by_rid.pop(seq.token[0], None)
                self._answer(seq, error)
                self.scheduler.end(seq, "failed")
            if self.outputs is not None:
                self.outputs.drop(seq.sid)
        return ()

    def _collect(self) -> None:
        """Wait for the last stage's tokens of the oldest micro-batch in flight."""
        assert self.comm is not None
        message, _ = pipeline.recv(self.comm, self.world.size - 1)
        if not isinstance(message, pipeline.GenTokens):
            raise CommError(f"expected tokens from the last stage, got {type(message).__name__}")
        self._returned(message.step, {sid: (tok, fin) for sid, tok, fin in message.tokens},
                       message.failed)

    def _returned(self, step: int, sampled: dict[int, tuple[int, bool]],
                  failed: tuple[int, ...]) -> None:
        try:
            ended = self.scheduler.returned(step, sampled, failed)
        except ValueError as exc:
            raise CommError(str(exc)) from exc
        self.generated += sum(1 for tok, _ in sampled.values() if tok >= 0)
        for seq in ended:
            self._by_rid.pop(seq.token[0], None)
        self.stats.requests += len(ended)

    def _keepalive(self) -> None:
        assert self.comm is not None and self._keepalive_s is not None
        if self._clock() - self.last_sent_s < self._keepalive_s:
            return
        self.comm.flush()
        self.comm.send(1, pipeline.KEEPALIVE.to_wire(), window=SEND_WINDOW)
        self.last_sent_s = self._clock()

    # -- endings --------------------------------------------------------------------------

    def _answer(self, seq: Seq, error: MeshError) -> None:
        rid, client_id = seq.token
        self.replier.error(rid, client_id, error)

    def _break(self, exc: CommError) -> None:
        if self.broken is not None:
            return
        self.broken = exc
        log.warning("[%s] broken: %s", self.world.label, exc)
        self.finish(Unavailable(f"world {self.world.world_id} broke: {exc.kind}"),
                    graceful=False)
        self._on_broken(self.world.world_id, self.world.epoch, str(exc), exc.kind == "peer_lost")

    def finish(self, error: MeshError, *, graceful: bool) -> None:
        """Answer every sequence not ended with ``error``; on a graceful close, tell the later
        stages to stop."""
        for seq in self.scheduler.abandon():
            self._answer(seq, error)
        self._by_rid.clear()
        self.cache.clear()
        self.replier.flush()
        comm = self.comm
        if graceful and comm is not None and self.broken is None and not comm.aborted:
            try:
                comm.send(1, pipeline.CLOSE.to_wire())
            except CommError as exc:
                log.info("[%s] closing: rank 1 did not take the close: %s", self.world.label,
                         exc)


class GenInner:
    """Rank 1.. of a generative world."""

    def __init__(self, world: World, *, send: Send, compute: Compute,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert world.comm is not None and world.rank > 0
        self.world = world
        self.comm: Comm = world.comm
        self.handler: GenerativeHandler = world.handler  # type: ignore[assignment]
        self.compute = compute
        self._clock = clock
        self.replier = Replier(world.world_id, world.epoch, send, packed=world.packed_replies)
        self.cache = new_cache(world)
        self.outputs = Outputs(self.handler, self.replier) if world.is_last else None
        self._reply_to: dict[int, tuple[Any, Any]] = {}  # sid -> (rid, client id)
        self.stats = RunnerStats()
        self.busy = False

    def prepare(self) -> None:
        pipeline.send(self.comm, 0, pipeline.KvInfo(self.world.rank, self.cache.total_blocks,
                                                    self.cache.layout.bytes_per_token))

    def gen_stats(self) -> WorldGen:
        return WorldGen(world_id=self.world.world_id, running=len(self.cache),
                        kv_used_bytes=self.cache.used_bytes,
                        kv_budget_bytes=self.cache.budget_bytes)

    def serve_one(self) -> bool:
        message, tensors = pipeline.recv(self.comm, self.world.rank - 1)
        try:
            return self._serve(message, tensors)
        finally:
            self.replier.flush()

    def _serve(self, message: Any, tensors: list[Any]) -> bool:
        world = self.world
        if isinstance(message, pipeline.Close):
            if not world.is_last:
                self.comm.send(world.rank + 1, message.to_wire())
            return False
        if isinstance(message, pipeline.Keepalive):
            if not world.is_last:
                self.comm.send(world.rank + 1, message.to_wire(), window=SEND_WINDOW)
            return True
        if not isinstance(message, pipeline.GenStep):
            raise CommError(f"rank {world.rank - 1} sent a {type(message).__name__} to a "
                            "generative stage")
        self._step(message, tensors)
        return True

    def _drop(self, sid: int) -> None:
        self.cache.free(sid)
        self._reply_to.pop(sid, None)
        if self.outputs is not None:
            self.outputs.drop(sid)

    def _step(self, message: pipeline.GenStep, tensors: list[Any]) -> None:
        for sid in message.frees:
            self._drop(sid)
        for sid in message.preempts:
            self.cache.free(sid)
        for j in message.joins:
            self._reply_to[j.sid] = (j.rid, j.client_id)
            if self.outputs is not None:
                self.outputs.join(j)
        failed = list(message.failed)
        for sid in failed:
            self._drop(sid)
        chunks = message.chunks
        out = None
        sampled: dict[int, tuple[int, bool]] = {}
        started = self._clock()
        self.busy = True
        try:
            if chunks:
                if len(tensors) != 1:
                    raise CommError(f"a micro-batch of {len(chunks)} sequences came with "
                                    f"{len(tensors)} tensors")
                batch = build_batch(self.cache, chunks, device=self.handler.device,
                                    hidden=tensors[0])
                with self.compute.turn():
                    out = self.handler.step(batch)
                if self.outputs is not None:
                    sampled = self.outputs.sample([c.sid for c in chunks if c.sample], out)
        except CommError:
            raise
        except Exception as exc:
            log.exception("[%s] the model failed on a micro-batch of %d sequences",
                          self.world.label, len(chunks))
            error = as_model_error(exc)
            for c in chunks:
                who = self._reply_to.get(c.sid)
                if who is not None:
                    self.replier.error(who[0], who[1], error)
                self._drop(c.sid)
                failed.append(c.sid)
            chunks, out, sampled = (), None, {}
        finally:
            self.busy = False
            self.stats.busy_s += self._clock() - started
            self.stats.batches += 1
            self.stats.rows += sum(c.n for c in message.chunks)
        for sid, (_, finished) in sampled.items():
            if finished:
                self._drop(sid)
                self.stats.requests += 1
        if not self.world.is_last:
            forward = pipeline.GenStep(message.step, chunks, message.joins, message.frees,
                                       message.preempts, tuple(failed),
                                       HIDDEN if out is not None else ())
            pipeline.send(self.comm, self.world.rank + 1, forward,
                          [out] if out is not None else [], window=SEND_WINDOW)
            return
        # The tokens go back to rank 0 first: its next micro-batch must not wait on our replies.
        pipeline.send(self.comm, 0, pipeline.GenTokens(
            message.step, tuple((sid, tok, fin) for sid, (tok, fin) in sampled.items()),
            tuple(failed)))
