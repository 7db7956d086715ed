"""The worker process's actor: registration, heartbeats, world memberships, the data path.

Stateless by design: everything a worker holds (weights, memberships) can be rebuilt from the
controller's commands, so the controller may kill and replace it at any time. The worker
exits on its own when it hears nothing from the controller for ``controller_timeout_ms``, so a
lost controller never leaves orphans burning a device.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from mesh.actor import Actor
from mesh.messages import (
    Heartbeat,
    Join,
    Joined,
    JoinFailed,
    Leave,
    Left,
    Message,
    Ping,
    Register,
    Shutdown,
    Welcome,
)
from worker.dataplane import DataPlane
from worker.link import Link
from worker.loader import LoadError, load_handler
from worker.world import World

log = logging.getLogger(__name__)


class WorkerAgent(Actor):
    def __init__(
        self,
        *,
        controller: str,
        worker_id: str,
        device: str,
        threads: int = 0,
        labels: dict[str, str] | None = None,
        register_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(f"worker {worker_id}")
        self.worker_id = worker_id
        self.device = device
        self.threads = threads
        self.labels = labels or {}
        self._context: zmq.Context[Any] = zmq.Context()
        self._link = Link(self._context, controller, worker_id, on_control=self._on_control)
        self.data_identity = f"{worker_id}/data"
        self._plane = DataPlane(self._context, controller, self.data_identity)
        self._loader_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader")
        self._worlds: dict[int, World] = {}
        self._heartbeat_interval_s = 0.2
        self._controller_timeout_s = register_timeout_s
        self._last_heard = time.monotonic()
        self._welcomed = asyncio.Event()
        self.stopped = asyncio.Event()
        self.exit_reason = ""
        self._seq = 0

    async def on_start(self) -> None:
        if self.threads > 0:
            import torch

            torch.set_num_threads(self.threads)
        self._plane.start()
        await asyncio.get_running_loop().run_in_executor(None, self._plane.started.wait, 10.0)
        self._link.start()
        self._register()
        self.spawn(self._heartbeat_loop(), name=f"{self.name}.heartbeat")
        self.spawn(self._watchdog(), name=f"{self.name}.watchdog")

    async def on_stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._plane.stop, 5.0)
        self._worlds.clear()
        self._link.close()
        self._loader_pool.shutdown(wait=False, cancel_futures=True)
        self._context.term()

    def _register(self) -> None:
        self._link.send(Register(worker_id=self.worker_id, pid=os.getpid(),
                                 host=socket.gethostname(), device=self.device,
                                 data_identity=self.data_identity, labels=self.labels))

    def stop(self, reason: str) -> None:
        if not self.stopped.is_set():
            self.exit_reason = reason
            log.info("[worker %s] stopping: %s", self.worker_id, reason)
            self.stopped.set()

    # -- control --------------------------------------------------------------------------

    def _on_control(self, message: Message) -> None:
        self._last_heard = time.monotonic()
        if isinstance(message, Ping):
            return
        if isinstance(message, Welcome):
            self._heartbeat_interval_s = message.heartbeat_interval_ms / 1000.0
            self._controller_timeout_s = message.controller_timeout_ms / 1000.0
            self._welcomed.set()
            return
        if isinstance(message, Shutdown):
            self.stop(f"controller asked: {message.reason}")
            return
        self.tell(message)

    async def handle(self, message: Any) -> Any:
        if isinstance(message, Join):
            await self._join(message)
        elif isinstance(message, Leave):
            await self._leave(message)

    async def _join(self, msg: Join) -> None:
        if msg.world_id in self._worlds:
            self._link.send(Joined(world_id=msg.world_id, epoch=msg.epoch))
            return
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            handler = await loop.run_in_executor(self._loader_pool, load_handler,
                                                 msg.deployment, self.device)
        except LoadError as exc:
            log.error("[worker %s world %d/%d] load failed: %s", self.worker_id, msg.world_id,
                      msg.epoch, exc)
            self._link.send(JoinFailed(world_id=msg.world_id, epoch=msg.epoch, error=str(exc)))
            return
        world = World(world_id=msg.world_id, epoch=msg.epoch, rank=msg.rank, size=msg.size,
                      deployment=msg.deployment, handler=handler)
        await asyncio.wrap_future(self._plane.add_world(world))
        self._worlds[msg.world_id] = world
        load_ms = (time.perf_counter() - started) * 1000.0
        log.info("[worker %s world %d/%d] joined as rank %d/%d (%s, %.0f ms)", self.worker_id,
                 msg.world_id, msg.epoch, msg.rank, msg.size, msg.deployment.get("name"), load_ms)
        self._link.send(Joined(world_id=msg.world_id, epoch=msg.epoch, load_ms=load_ms,
                               inputs=handler.input_spec()))

    async def _leave(self, msg: Leave) -> None:
        world = self._worlds.get(msg.world_id)
        if world is None or world.epoch != msg.epoch:
            self._link.send(Left(world_id=msg.world_id, epoch=msg.epoch))
            return
        await asyncio.wrap_future(self._plane.remove_world(msg.world_id, msg.epoch,
                                                           drain=not msg.abort, timeout_s=10.0))
        self._worlds.pop(msg.world_id, None)
        log.info("[worker %s world %d/%d] left", self.worker_id, msg.world_id, msg.epoch)
        self._link.send(Left(world_id=msg.world_id, epoch=msg.epoch))

    # -- loops ----------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            if not self._welcomed.is_set():
                # Registration may race the controller's start; say it again until welcomed.
                try:
                    async with asyncio.timeout(1.0):
                        await self._welcomed.wait()
                except TimeoutError:
                    self._register()
                    continue
            self._seq += 1
            plane = self._plane
            if plane.crashed is not None:
                self.stop(f"data plane crashed: {plane.crashed!r}")
                return
            st = plane.stats
            self._link.send(Heartbeat(seq=self._seq, queued=plane.queued, busy=plane.busy,
                                      batches=st.batches, rows=st.rows, requests=st.requests,
                                      busy_s=st.busy_s))
            await asyncio.sleep(self._heartbeat_interval_s)

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            silent_s = time.monotonic() - self._last_heard
            if silent_s > self._controller_timeout_s:
                self.stop(f"no word from the controller for {silent_s:.1f}s")
                return
