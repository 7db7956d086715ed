"""The router of one deployment: admission, queue, world choice, in-flight table, deadlines.

Hot path, called synchronously from the socket pumps (no task, no future per request):

    submit()   a validated client request: dispatch to the serving world with the fewest
               outstanding requests, or queue it while every world is full
    flush()    once per loop iteration (``defer``): send each world what was dispatched to
               it since the last flush, as one message (one ZeroMQ message per world and
               wake-up instead of one per request: docs/benchmarks.md)
    on_reply() a worker's answer: forward it to the client, free the world's slot, pull the
               next queued request
    sweep()    on a timer: answer requests whose deadline passed

Every accepted request gets exactly one final answer. ``Pending.answered`` is the guard: a
late reply (after a deadline, a cancel or a re-send) finds it set and is dropped. When a world
leaves (broken or released), its in-flight requests are re-sent to other worlds while their
deadline and retry budget allow, else answered with a typed error.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from controller.admission import Capacity, TokenCapacity, worlds_rps
from controller.config import DeploymentConfig
from controller.inflight import (
    Pending,
    WorldRoute,
    bad_duplicate,
    chunk_tokens,
    dispatch_message,
    generation_cost,
    pick,
    stalled_worlds,
    with_resume,
)
from controller.mailbox import RouterReport, WorldIdle, WorldStalled, WorldUnreachable
from controller.stats import Arrivals, GenWindow, LatencyWindow
from mesh import codec
from mesh.dataplane import (
    CHUNK,
    ERROR,
    CancelWork,
    Reply,
    is_map,
    pack,
)
from mesh.errors import (
    Cancelled,
    DeadlineExceeded,
    MeshError,
    Overloaded,
    StreamInterrupted,
    Unavailable,
)
from mesh.messages import ClientKind, error_header

log = logging.getLogger(__name__)

SendFn = Callable[[list[Any]], bool]

# Requests sent to a world in one message at most (bounds a message; more go in several).
MAX_DISPATCH_BATCH = 256


class Router:
    def __init__(
        self,
        deployment: DeploymentConfig,
        *,
        send_client: Callable[[list[Any]], bool],
        send_worker: Callable[[list[Any]], bool],
        next_rid: Callable[[], int],
        tell: Callable[[RouterReport], None],
        inflight_ids: dict[tuple[bytes, Any], int] | None = None,
        max_attempts: int = 4,
        defer: Callable[[Callable[[], None]], object] | None = None,
        listening_since: Callable[[], float] = lambda: float("-inf"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.deployment = deployment
        self.name = deployment.name
        self._send_client = send_client
        self._send_worker = send_worker
        self._next_rid = next_rid
        # What it reports to the WorldManager (a world went idle, cannot be reached, stalled).
        self._tell = tell
        self.max_attempts = max_attempts
        # Runs the flush once the current wake-up's work is done (the controller: the event
        # loop's call_soon); None: at once, one message per dispatch (tests that drive a
        # router alone).
        self._defer = defer
        self._flush_scheduled = False
        self._outboxes: list[WorldRoute] = []  # worlds with dispatches not yet sent
        # When the controller's loop last came back from a stall (Health measures it): no
        # world is judged stalled on time the controller was not reading its answers.
        self._listening_since = listening_since
        self._stall_s = deployment.world_timeout_ms / 1000.0
        self._next_stall_check_s = 0.0
        self._clock = clock
        self.worlds: dict[int, WorldRoute] = {}
        self._serving: list[WorldRoute] = []
        self.queue: deque[Pending] = deque()
        self._queue_dead = 0  # answered entries still sitting in ``queue``
        self.pending: dict[int, Pending] = {}
        # (client identity, client id) -> rid; shared by every router of a controller, so a
        # client's ids are unique per connection, not per deployment.
        self._by_client: dict[tuple[bytes, Any], int] = (
            inflight_ids if inflight_ids is not None else {})
        self._deadlines: list[tuple[float, int]] = []
        # Kept long enough for the autoscaler's breach window (controller/scaling_inputs.py).
        self.stats = LatencyWindow(keep_s=max(2.0, deployment.upscale_delay_s))
        # Generative deployments (their worlds' joins say so): requests go to the world with
        # the fewest tokens outstanding, streams resume from the tokens delivered, and the
        # token-level figures are kept here.
        self.generative = False
        self.gen = GenWindow(keep_s=max(2.0, deployment.upscale_delay_s))
        self.arrivals = Arrivals()  # accepted requests' arrival times
        # Service rate while saturated, for deadline-aware admission (controller/admission.py):
        # saturated means at least a few requests waiting per world's batch.
        self.capacity = Capacity(floor=4)
        self.token_capacity = TokenCapacity(floor=4)
        self.backlog_tokens = 0  # generative: the tokens every unanswered request may take
        # Accepted requests without their final answer, and an event set whenever there is
        # none: what a graceful stop awaits.
        self.unanswered = 0
        self._all_answered = asyncio.Event()
        self._all_answered.set()
        self.late_replies = 0
        self.foreign_replies = 0
        self.bad_replies = 0
        self.resent = 0
        self.accepting = True
        self.limit = deployment.max_inflight_per_world
        # Why no world of this deployment can form now (quarantined, no worker can start);
        # "" while one can. Set by the WorldManager; requests that find no serving world are
        # then answered at once instead of waiting out their deadline.
        self.unavailable = ""

    # -- admission ------------------------------------------------------------------------

    def submit(self, client: bytes, client_id: Any, kind: str, header: Any, frames: list[Any],
               timeout_ms: int) -> None:
        now = self._clock()
        if not self.accepting:
            self._reject(client, client_id, Cancelled("controller is shutting down"))
            return
        key = (client, client_id)
        if key in self._by_client:
            self._reject(client, client_id, bad_duplicate(client_id))
            return
        world = pick(self._serving, self.limit, -1, self.generative)
        if world is None and self.unavailable and not self._serving:
            self._reject(client, client_id, Unavailable(
                f"{self.name}: no world can serve it: {self.unavailable}"))
            return
        if world is None and len(self.queue) - self._queue_dead >= self.deployment.max_queue:
            self._reject(client, client_id, Overloaded(
                f"{self.name}: {self.queued} requests queued, limit {self.deployment.max_queue}",
                retry_after_ms=100))
            return
        backlog = len(self.pending)
        cost = generation_cost(header) if self.generative else 0
        if self.generative:
            if self.deployment.admit_by_deadline:
                retry_s = self.token_capacity.retry_after_s(now, self.backlog_tokens + cost,
                                                            timeout_ms / 1000.0)
                if retry_s > 0.0:
                    self._reject(client, client_id, Overloaded(
                        f"{self.name}: {self.backlog_tokens} tokens ahead at "
                        f"{self.token_capacity.rate:.0f} tokens/s would not finish within the "
                        "deadline", retry_after_ms=max(1, int(retry_s * 1e3))))
                    return
        elif backlog >= self.capacity.floor and self.deployment.admit_by_deadline:
            # The worlds' own rates stand in until the deployment has measured itself
            # saturated: a cold spike is refused from its first answers on.
            prior_rps = worlds_rps([w.rate.rps for w in self._serving])
            retry_s = self.capacity.retry_after_s(now, backlog, timeout_ms / 1000.0, prior_rps)
            if retry_s > 0.0:
                rate = self.capacity.rate_rps(now, prior_rps)
                self._reject(client, client_id, Overloaded(
                    f"{self.name}: {backlog} requests ahead at {rate:.0f}/s would not finish "
                    "within the deadline", retry_after_ms=max(1, int(retry_s * 1e3))))
                return
        rid = self._next_rid()
        self.arrivals.append(now)
        p = Pending(rid, client, client_id, kind, header, frames, now, now + timeout_ms / 1000.0)
        p.cost = cost
        self.backlog_tokens += cost
        self.pending[rid] = p
        self._opened()
        self._by_client[key] = rid
        heapq.heappush(self._deadlines, (p.deadline_s, rid))
        if world is not None:
            self._dispatch(p, world, now)
        else:
            self.queue.append(p)

    def _dispatch(self, p: Pending, world: WorldRoute, now: float) -> None:
        if not world.inflight:
            world.last_progress_s = now
            world.rate.holding(now)
        p.world = world
        p.attempts += 1
        p.dispatched_s = now
        world.inflight[p.rid] = p
        world.load_tokens += p.cost
        if not world.outbox:
            self._outboxes.append(world)
        world.outbox.append(p)
        if self._defer is None:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._defer(self.flush)

    def flush(self) -> None:
        """Send every world the requests dispatched to it since the last flush, as one
        message (``MAX_DISPATCH_BATCH`` at most); a world whose entry cannot be reached is
        routed around, and what it was to get goes back to the head of the queue."""
        self._flush_scheduled = False
        worlds, self._outboxes = self._outboxes, []
        if not worlds:
            return
        now = self._clock()
        unsent = False
        for world in worlds:
            batch, world.outbox = world.outbox, []
            if self.worlds.get(world.world_id) is not world:
                continue  # removed meanwhile: its requests were re-sent from its in-flight
            batch = [p for p in batch if p.world is world]
            for at in range(0, len(batch), MAX_DISPATCH_BATCH):
                if not self._send_worker(dispatch_message(
                        world, batch[at:at + MAX_DISPATCH_BATCH], now)):
                    self._unsent(world, batch[at:])
                    unsent = True
                    break
        if unsent:
            self._pump_queue()

    def _unsent(self, world: WorldRoute, batch: list[Pending]) -> None:
        """The world's socket is gone: take these back and route around the world until
        health breaks it."""
        for p in reversed(batch):
            if world.inflight.pop(p.rid, None) is not None:
                world.load_tokens -= p.cost
            p.world = None
            p.attempts -= 1
            if p.answered:
                self.pending.pop(p.rid, None)  # answered meanwhile (deadline, cancel)
            else:
                self.queue.appendleft(p)
        if not world.unreachable:
            world.unreachable = True
            self._refresh_serving()
            self._tell(WorldUnreachable(world.world_id))

    def _pump_queue(self) -> None:
        queue = self.queue
        if not queue:
            return
        now = self._clock()
        # Which world takes each: controller/inflight.py ``pick`` (dispatching changes none
        # of these).
        serving, limit, by_tokens = self._serving, self.limit, self.generative
        while queue:
            p = queue[0]
            world = pick(serving, limit, p.avoid, by_tokens)
            if world is None:
                return
            queue.popleft()
            if p.answered:
                self._queue_dead -= 1
                continue
            self._dispatch(p, world, now)

    # -- answers --------------------------------------------------------------------------

    def on_reply(self, head: Reply, frames: list[Any], sender: bytes = b"") -> None:
        """A worker's answer (frame 0 decoded by mesh.dataplane; ``frames`` are the client's)
        from the socket ``sender``, which must be a member of the world."""
        p = self.pending.get(head.rid)
        if p is None or p.world is None or p.world.world_id != head.world_id or \
                p.world.epoch != head.epoch:
            self.late_replies += 1  # from a world that no longer owns this request
            return
        if sender not in p.world.members:
            # A socket that is not a member answering for it. A world whose members are not
            # known takes no answer at all: fail closed, never "anyone may answer".
            self.foreign_replies += 1
            return
        if not frames or not is_map(codec.frame_buffer(frames[0])):
            # A member answering with something no client could read: a worker fault. The
            # world is reported (it breaks, its requests are re-sent, and its workers are
            # charged as for a stall); the client never sees the garbage.
            self.bad_replies += 1
            world = p.world
            if not world.stall_reported:
                world.stall_reported = True
                self._tell(WorldStalled(world.world_id, "answered with a reply header that "
                                        "is not a msgpack map"))
            return
        if head.status == CHUNK:
            now = self._clock()
            p.world.last_progress_s = now
            if not p.answered:
                p.chunks += 1
                if self.generative:
                    self._on_tokens(p, chunk_tokens(frames[0]), now)
                self._send_client([p.client, *frames])
            return
        if p.answered:
            self.late_replies += 1  # after its deadline or a cancel: the world lets go of it
        self._on_final(p, p.world, head, frames)

    def _on_final(self, p: Pending, world: WorldRoute, head: Reply, frames: list[Any]) -> None:
        """A request's last answer: the world's slot is free, the client is answered (or the
        request is re-sent), the next queued request goes out."""
        now = self._clock()
        world.last_progress_s = now
        world.inflight.pop(p.rid, None)
        world.load_tokens -= p.cost
        world.served += 1
        del self.pending[p.rid]
        # An error answer took no service worth counting (most are work the world dropped:
        # cancelled, or its deadline passed in the world's queue).
        served = head.status != ERROR
        world.rate.answered(now, served, bool(world.inflight))
        self.capacity.answered(now, len(self.pending), served)
        if not p.answered:
            self._answered(p)
            self._by_client.pop((p.client, p.client_id), None)
            answer = self._final_answer(p, head, frames, now)
            if answer is not None:
                self._send_client([p.client, *answer])
        self._pump_queue()
        self._after_world_progress(world)

    def _final_answer(self, p: Pending, head: Reply, frames: list[Any],
                      now: float) -> list[Any] | None:
        """What the client gets for this last answer, recorded in the figures; None when the
        request was re-sent instead (a world that could not serve it)."""
        if head.status == ERROR:
            code = head.code or "internal"
            if code == Unavailable.code and self._retry(p):
                return None
            if code == Unavailable.code and p.kind == ClientKind.STREAM and p.chunks:
                err = StreamInterrupted(f"{self.name}: stream interrupted after {p.chunks} "
                                        "chunks; no world could resume it in time")
                frames = [codec.pack(error_header(p.client_id, err.code, err.message, True))]
                code = err.code
            self.stats.record_error(code)
            return frames
        if now > p.deadline_s:
            # The answer came after the deadline (its timer had not run yet: the loop was
            # busy, or the reply waited in the socket): the caller was promised an answer
            # within the deadline, so it gets the deadline's error, not a late success.
            late = DeadlineExceeded(f"{self.name}: answered {int((now - p.arrived_s) * 1000)} "
                                    f"ms after arrival, past its "
                                    f"{int((p.deadline_s - p.arrived_s) * 1000)} ms deadline")
            self.stats.record_error(late.code)
            return [codec.pack(error_header(p.client_id, late.code, late.message, True))]
        self.stats.record(now, now - p.arrived_s, p.dispatched_s - p.arrived_s)
        if self.generative and p.kind != ClientKind.STREAM:
            # A whole answer: its tokens count as delivered now (its budget, as estimated;
            # the answer itself is not read here).
            self.token_capacity.delivered(now, p.cost, len(self.pending) + 1)
        if len(p.tokens) > 1:
            self.gen.finished(now, (p.last_chunk_s - p.first_chunk_s) / (len(p.tokens) - 1))
        return frames

    def _on_tokens(self, p: Pending, tokens: list[int], now: float) -> None:
        """A generative stream's chunk came: remember its tokens (a re-send continues after
        them) and time it."""
        if not p.tokens:
            p.first_chunk_s = now
            self.gen.first_token(now, now - p.arrived_s)
        p.last_chunk_s = now
        p.tokens += tokens
        self.gen.delivered(now, len(tokens))
        done = min(len(tokens), p.cost)
        p.cost -= done
        self.backlog_tokens -= done
        if p.world is not None:
            p.world.load_tokens -= done
        self.token_capacity.delivered(now, len(tokens), len(self.pending))

    def _after_world_progress(self, world: WorldRoute) -> None:
        if world.draining and not world.inflight:
            self._tell(WorldIdle(world.world_id))

    def _retry(self, p: Pending) -> bool:
        """Put an unanswered request back in line if its deadline and budget allow."""
        if p.attempts >= self.max_attempts or p.deadline_s <= self._clock():
            return False
        if p.kind == ClientKind.STREAM and p.chunks:
            # Resume where the client is: the new world prefills the prompt and the tokens
            # already delivered, and generates from there (a seeded sampler continues exactly).
            if not p.tokens:
                return False  # chunks without token ids: nothing to continue from
            try:
                p.header = with_resume(p.original_header, p.tokens, p.chunks)
            except Exception:
                return False
        p.answered = False
        self._opened()
        self.backlog_tokens += p.cost
        if p.world is not None:
            p.avoid = p.world.world_id
        p.world = None
        self.pending[p.rid] = p
        self._by_client[(p.client, p.client_id)] = p.rid
        self.queue.appendleft(p)
        self.resent += 1
        return True

    def cancel(self, client: bytes, client_id: Any) -> None:
        rid = self._by_client.get((client, client_id))
        if rid is None:
            return
        p = self.pending.get(rid)
        if p is not None and not p.answered:
            self._answer_error(p, Cancelled("cancelled by the caller"))
            if p.world is None:
                self.pending.pop(rid, None)
                self._queue_dead += 1
            else:
                self._stop_on_worker(p)

    def _stop_on_worker(self, p: Pending) -> None:
        """Tell the world to stop spending compute on an answered request (it still answers,
        so its slot is freed; the answer is dropped as late)."""
        world = p.world
        if world is not None:
            if world.outbox:
                self.flush()  # the request itself first, or the cancel finds nothing
                if p.world is not world:
                    return  # never reached it
            self._send_worker([world.entry, pack(CancelWork(p.rid, world.world_id,
                                                            world.epoch))])

    def sweep(self) -> None:
        """Answer every request whose deadline has passed; once a second, report worlds that
        hold requests but answered nothing for the world timeout."""
        now = self._clock()
        if now >= self._next_stall_check_s:
            self._next_stall_check_s = now + 1.0
            self._report_stalls(now)
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, rid = heapq.heappop(heap)
            p = self.pending.get(rid)
            if p is None or p.answered or p.deadline_s > now:
                continue
            self._answer_error(p, DeadlineExceeded(
                f"{self.name}: no answer within {int((p.deadline_s - p.arrived_s) * 1000)} ms"))
            if p.world is None:
                # Still queued: forget it now (the queue skips answered entries).
                self.pending.pop(rid, None)
                self._queue_dead += 1
            else:
                self._stop_on_worker(p)

    def stalled(self, now_s: float) -> list[tuple[int, str]]:
        """Worlds that hold requests but sent no answer or chunk for the world timeout of
        listening time: a stuck stage, or a rank 0 that heartbeats but no longer serves."""
        return stalled_worlds(self.worlds.values(), now_s, self._listening_since(),
                              self._stall_s)

    def _report_stalls(self, now_s: float) -> None:
        for world_id, reason in self.stalled(now_s):
            world = self.worlds[world_id]
            if not world.stall_reported:
                world.stall_reported = True
                self._tell(WorldStalled(world_id, reason))

    def _opened(self) -> None:
        self.unanswered += 1
        self._all_answered.clear()

    def _answered(self, p: Pending) -> None:
        p.answered = True
        self.backlog_tokens -= p.cost
        self.unanswered -= 1
        if self.unanswered == 0:
            self._all_answered.set()

    async def all_answered(self) -> None:
        """Return once every accepted request has its final answer."""
        await self._all_answered.wait()

    def _answer_error(self, p: Pending, err: MeshError) -> None:
        self._answered(p)
        self._by_client.pop((p.client, p.client_id), None)
        self._reject(p.client, p.client_id, err)

    def _reject(self, client: bytes, client_id: Any, err: MeshError) -> None:
        self.stats.record_error(err.code)
        header = codec.pack(error_header(client_id, err.code, err.message, err.retryable,
                                         err.retry_after_ms))
        self._send_client([client, header])

    def set_unavailable(self, reason: str) -> None:
        """No world can form (``reason``), or one can again (""). Requests queued for a world
        that cannot come are answered now, with the reason."""
        if reason == self.unavailable:
            return
        self.unavailable = reason
        if not reason or self._serving:
            return
        err = Unavailable(f"{self.name}: no world can serve it: {reason}")
        while self.queue:
            p = self.queue.popleft()
            if p.answered:
                continue
            self.pending.pop(p.rid, None)
            self._answer_error(p, err)
        self._queue_dead = 0

    def reconfigure(self, deployment: DeploymentConfig) -> None:
        """Its deployment's spec changed (applied, or rolled back): read the new one."""
        self.deployment = deployment
        self.limit = deployment.max_inflight_per_world
        self._stall_s = deployment.world_timeout_ms / 1000.0
        self._refresh_serving()

    # -- worlds ---------------------------------------------------------------------------

    def add_world(self, world_id: int, epoch: int, entry: bytes, members: frozenset[bytes],
                  *, packed: bool = False, generative: bool | None = None) -> None:
        """``members``: the routing ids of its members' sockets, the only senders whose
        answers it takes (none when empty); ``packed``: its entry reads packed dispatch
        batches (its ``joined`` said so); ``generative``: its model generates tokens (its
        rank 0's ``joined`` said so)."""
        if generative is not None:
            self.generative = generative
        self.worlds[world_id] = WorldRoute(world_id, epoch, entry, members, packed=packed)
        self._refresh_serving()
        self._pump_queue()

    def hold_world(self, world_id: int) -> None:
        """Send it nothing more (it is about to be removed, with others of a dead worker)."""
        world = self.worlds.get(world_id)
        if world is not None and not world.unreachable:
            world.unreachable = True
            self._refresh_serving()

    def drain_world(self, world_id: int) -> None:
        """Stop routing to a world; ``WorldIdle`` is told once its in-flight work is done."""
        world = self.worlds.get(world_id)
        if world is None:
            return
        world.draining = True
        self._refresh_serving()
        if not world.inflight:
            self._tell(WorldIdle(world_id))

    def remove_world(self, world_id: int, reason: str) -> int:
        """Forget a world; re-send its unanswered requests elsewhere. Returns how many."""
        world = self.worlds.pop(world_id, None)
        if world is None:
            return 0
        self._refresh_serving()
        resent = 0
        for p in sorted(world.inflight.values(), key=lambda q: q.arrived_s, reverse=True):
            self.pending.pop(p.rid, None)
            if p.answered:
                continue
            self._answered(p)  # a late reply from the old world must not count
            if self._retry(p):
                resent += 1
                continue
            self._by_client.pop((p.client, p.client_id), None)
            message = (f"{self.name}: world {world_id} failed ({reason}); no retry left "
                       "before the deadline")
            self._reject(p.client, p.client_id, StreamInterrupted(
                f"{message}; {p.chunks} chunks delivered") if p.kind == ClientKind.STREAM
                and p.chunks else Unavailable(message))
        world.inflight.clear()
        self._pump_queue()
        return resent

    def _refresh_serving(self) -> None:
        self._serving = [w for w in self.worlds.values() if w.routable]
        # Saturated: two full batches waiting per serving world, or more (generative: half
        # the sequences its worlds decode at once).
        dep = self.deployment
        self.capacity.floor = max(4, 2 * len(self._serving) *
                                  min(dep.max_batch_size, dep.max_inflight_per_world))
        self.token_capacity.floor = max(4, len(self._serving) *
                                        min(dep.max_seqs, dep.max_inflight_per_world) // 2)

    # -- figures --------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return sum(len(w.inflight) for w in self.worlds.values())

    @property
    def queued(self) -> int:
        return len(self.queue) - self._queue_dead

    def fail_all(self, err: MeshError) -> None:
        """Answer everything still open (used at shutdown, after the drain timeout)."""
        for p in list(self.pending.values()):
            if not p.answered:
                self._answer_error(p, err)
        self.pending.clear()
        self.queue.clear()
        self._queue_dead = 0
