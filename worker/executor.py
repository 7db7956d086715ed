"""Dynamic batching: group requests, run the model on the compute thread, answer each one.

Batching policy (one world membership, one compute thread per device):

* a batch launches when the compute thread is free and either the queue holds at least as
  many rows as the previous batch had (the concurrency we recently saw), or the oldest queued
  request has waited ``max_batch_delay_ms``, or the queue holds ``max_batch_size`` rows;
* while the thread is busy, requests accumulate and go together into the next batch.

So a lone caller is served at once (the previous batch had one row: no added delay), and a
closed loop of N callers settles into batches that keep the compute thread busy without
waiting on stragglers longer than the configured delay.

The forward pass runs on a thread: the event loop keeps receiving requests and sending
heartbeats while the model computes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from mesh.errors import DeadlineExceeded, MeshError, ModelError
from worker.handler import Handler, Request

log = logging.getLogger(__name__)

# reply(rid, error_or_None, outputs_or_None)
Reply = Callable[[Any, "MeshError | None", "dict[str, Any] | None"], None]


@dataclass(slots=True)
class Item:
    rid: Any
    request: Request
    arrived_s: float
    deadline_s: float


class BatchStats:
    """Counters the worker reports in its heartbeats."""

    __slots__ = ("batches", "busy_s", "requests", "rows")

    def __init__(self) -> None:
        self.batches = 0
        self.rows = 0
        self.requests = 0
        self.busy_s = 0.0


class Executor:
    """Batches the requests of one world membership onto the device's compute thread."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_batch_size: int,
        max_batch_delay_ms: float,
        reply: Reply,
        pool: ThreadPoolExecutor,
        stats: BatchStats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.handler = handler
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_ms / 1000.0
        self._reply = reply
        self._pool = pool
        self._clock = clock
        self._queue: deque[Item] = deque()
        self._queued_rows = 0
        self._target_rows = 1
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        # Shared across a worker's memberships so its counters only ever grow.
        self.stats = stats if stats is not None else BatchStats()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._busy

    def submit(self, rid: Any, request: Request, deadline_s: float) -> None:
        """Queue one validated request; its answer comes through ``reply``."""
        if self._closed:
            self._reply(rid, MeshError("world is closing"), None)
            return
        self._queue.append(Item(rid, request, self._clock(), deadline_s))
        self._queued_rows += request.rows
        self._idle.clear()
        self._poke()

    def _poke(self) -> None:
        if self._busy or not self._queue:
            return
        now = self._clock()
        ready_rows = min(self._target_rows, self.max_batch_size)
        waited = now - self._queue[0].arrived_s
        if self._queued_rows >= ready_rows or waited >= self.max_batch_delay_s:
            self._launch(timer_driven=self._queued_rows < ready_rows)
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.max_batch_delay_s - waited, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._poke()

    def _launch(self, *, timer_driven: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self._clock()
        batch: list[Item] = []
        rows = 0
        queue = self._queue
        while queue:
            item = queue[0]
            if batch and rows + item.request.rows > self.max_batch_size:
                break
            queue.popleft()
            self._queued_rows -= item.request.rows
            if item.deadline_s <= now:
                self._reply(item.rid, DeadlineExceeded("deadline passed while queued"), None)
                continue
            batch.append(item)
            rows += item.request.rows
        if not batch:
            self._settle()
            return
        # Track recent concurrency: shrink when the delay fired first, grow when more came.
        self._target_rows = rows if timer_driven else max(self._target_rows, rows)
        self._busy = True
        loop = asyncio.get_running_loop()
        started = self._clock()
        fut = loop.run_in_executor(self._pool, self.handler.run_batch, [i.request for i in batch])
        fut.add_done_callback(lambda f: self._finished(f, batch, rows, started))

    def _finished(self, fut: asyncio.Future[Any], batch: list[Item], rows: int, started: float) -> None:
        self._busy = False
        stats = self.stats
        stats.batches += 1
        stats.rows += rows
        stats.requests += len(batch)
        stats.busy_s += self._clock() - started
        exc = fut.exception()
        if exc is not None:
            log.error("model failed on a batch of %d", len(batch), exc_info=exc)
            err = exc if isinstance(exc, MeshError) else ModelError(f"{type(exc).__name__}: {exc}")
            for item in batch:
                self._reply(item.rid, err, None)
        else:
            outputs = fut.result()
            if len(outputs) != len(batch):
                err = ModelError(f"handler returned {len(outputs)} outputs for {len(batch)} requests")
                for item in batch:
                    self._reply(item.rid, err, None)
            else:
                for item, out in zip(batch, outputs, strict=True):
                    self._reply(item.rid, None, out)
        if self._closed:
            self._fail_queue(MeshError("world closed"))
        self._poke()
        self._settle()

    def _settle(self) -> None:
        if not self._busy and not self._queue:
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every queued request is answered; True if that happened in time."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def close(self, error: MeshError) -> None:
        """Stop taking requests and answer every queued one with ``error``."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fail_queue(error)

    def _fail_queue(self, error: MeshError) -> None:
        while self._queue:
            item = self._queue.popleft()
            self._reply(item.rid, error, None)
        self._queued_rows = 0
        self._settle()
