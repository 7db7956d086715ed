"""The controller process: wires the sockets, routers and actors together and runs them.

    Frontend (clients) --submit--> Router (per deployment) --dispatch--> Backend (workers)
    Backend --reply--> Router --answer--> Frontend
    Backend --control--> WorldManager <--> Launcher;   Backend --heartbeat--> Health
    Launcher --exit--> Health --lost--> WorldManager
    Admin (meshctl) --ask--> WorldManager / Routers

The data path is synchronous callbacks on one event loop (see mesh.transport for why); the
control path goes through actor mailboxes. ``start`` binds everything and asks for the initial
worlds; ``drain`` stops admitting requests and waits for in-flight ones; ``aclose`` stops
every worker and releases every socket.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from controller.admin import Admin
from controller.autoscaler import Autoscaler, Context
from controller.backend import Backend
from controller.config import Config
from controller.frontend import Frontend
from controller.health import Health
from controller.host_cpu import HostCpu
from controller.launcher import Launcher, LocalLauncher
from controller.metrics import MetricsServer
from controller.router import Router
from controller.service_rate import ServiceRate
from controller.status import build_status
from controller.world_manager import (
    FromWorker,
    Scale,
    Tick,
    WorkerLost,
    WorldIdle,
    WorldManager,
    WorldUnreachable,
)
from mesh.errors import Cancelled
from mesh.messages import Heartbeat, Message, Ping

log = logging.getLogger(__name__)

LauncherFactory = Callable[[Config, Callable[[str, int], None]], Launcher]


def local_launcher(config: Config, on_exit: Callable[[str, int], None]) -> Launcher:
    c = config.controller
    return LocalLauncher(c.worker_endpoint, on_exit=on_exit, device=c.worker_device,
                         threads=c.worker_threads, max_workers=c.max_local_workers)


class Controller:
    def __init__(self, config: Config, *, launcher: LauncherFactory = local_launcher) -> None:
        self.config = config
        self._context: zmq.Context[Any] = zmq.Context()
        self._rids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started_s = time.monotonic()
        self._launcher_factory = launcher
        self.routers: dict[str, Router] = {}
        self._world_owner: dict[int, Router] = {}
        self._closed = False

    # -- wiring ---------------------------------------------------------------------------

    async def start(self) -> None:
        c = self.config.controller
        self.launcher = self._launcher_factory(self.config, self._on_worker_exit)
        self.backend = Backend(self._context, c.worker_endpoint, route_of=self._route_of,
                               on_heartbeat=self._on_heartbeat, on_control=self._on_control)
        next_rid = self._rids.__next__
        inflight_ids: dict[tuple[bytes, Any], int] = {}
        for dep in self.config.deployments:
            self.routers[dep.name] = Router(
                dep, send_client=self._send_client, send_worker=self.backend.send,
                next_rid=next_rid, on_world_idle=self._on_world_idle,
                on_world_unreachable=self._on_world_unreachable, inflight_ids=inflight_ids,
                max_attempts=c.max_attempts)
        self.frontend = Frontend(self._context, c.client_endpoint, self.routers,
                                 max_request_bytes=c.max_request_bytes)
        self.health = Health(timeout_ms=c.heartbeat_timeout_ms, on_lost=self._on_lost)
        self.world_manager = WorldManager(
            self.config, self.routers, self.launcher, send_worker=self.backend.send_control,
            on_watch=self.health.watch, on_forget=self.health.forget,
            deaf_until=lambda: self.health.lag.last_end_s)
        self.admin = Admin(self._context, c.admin_endpoint, world_manager=self.world_manager,
                           routers=self.routers, launcher=self.launcher, snapshot=self.status,
                           send_worker=self.backend.send_control)
        self.metrics: MetricsServer | None = None
        if c.metrics_port:
            self.metrics = MetricsServer(c.metrics_host, c.metrics_port, self.status)
            await self.metrics.start()
        self.backend.start()
        self.frontend.start()
        await self.health.start()
        await self.world_manager.start()
        await self.admin.start()
        self.autoscaler = Autoscaler(list(self.routers), context_of=self._autoscale_context,
                                     apply=self._autoscale_apply,
                                     tick_s=c.autoscale_tick_ms / 1000.0)
        self._service_rates: dict[str, ServiceRate] = {}
        cores = self.launcher.host().get("cores", 0)
        self._host_load = HostCpu(cores) if cores else None
        self._host_sampled_s = -1.0
        if c.autoscale:
            self._spawn(self.autoscaler.run(), "controller.autoscaler")
        self._spawn(self._sweep_loop(), "controller.sweep")
        self._spawn(self._tick_loop(), "controller.tick")
        self.world_manager.tell(Tick())
        log.info("[controller] clients %s, admin %s, workers %s%s", c.client_endpoint,
                 c.admin_endpoint, c.worker_endpoint,
                 f", metrics http://{c.metrics_host}:{c.metrics_port}/metrics"
                 if c.metrics_port else "")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send_client(self, frames: list[Any]) -> bool:
        return self.frontend.send(frames)

    def _route_of(self, world_id: int) -> Router | None:
        router = self._world_owner.get(world_id)
        if router is None:
            for r in self.routers.values():
                if world_id in r.worlds:
                    self._world_owner[world_id] = r
                    return r
        return router

    def _on_heartbeat(self, worker_id: str, hb: Heartbeat) -> None:
        self.health.beat(worker_id)
        self.world_manager.note_heartbeat(worker_id, hb)

    def _on_control(self, worker_id: str, message: Message) -> None:
        self.health.beat(worker_id)
        self.world_manager.tell(FromWorker(worker_id, message))

    def _on_worker_exit(self, worker_id: str, returncode: int) -> None:
        if not self._closed:
            self.health.exited(worker_id, returncode)

    def _on_lost(self, worker_id: str, reason: str, kill: bool) -> None:
        self.world_manager.tell(WorkerLost(worker_id, reason, kill))

    def _on_world_unreachable(self, world_id: int) -> None:
        self.world_manager.tell(WorldUnreachable(world_id))

    def _on_world_idle(self, world_id: int) -> None:
        self._world_owner.pop(world_id, None)
        self.world_manager.tell(WorldIdle(world_id))

    async def _sweep_loop(self) -> None:
        # Deadlines are checked every 5 ms while requests are open, every 50 ms when idle
        # (an idle controller should not wake 200 times a second).
        while True:
            busy = any(router.pending for router in self.routers.values())
            await asyncio.sleep(0.005 if busy else 0.05)
            for router in self.routers.values():
                router.sweep()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.world_manager.tell(Tick())
            for worker in self.world_manager.workers.values():
                if worker.state not in ("dead", "starting"):
                    self.backend.send_control(worker.id, _PING)

    # -- autoscaling ----------------------------------------------------------------------

    def _autoscale_context(self, name: str, now: float) -> Context | None:
        wm = self.world_manager
        dep = wm.deployments[name]
        if dep.quarantined:
            return None
        router = self.routers[name]
        window_s = max(2.0, dep.config.upscale_delay_s)
        samples, p99 = router.stats.recent(now, window_s)
        serving = [w for w in wm.worlds.values() if w.deployment == name and w.state == "serving"]
        forming = sum(1 for w in wm.worlds.values()
                      if w.deployment == name and w.state == "forming")
        host_cores, host_busy, world_cpu = self._host_cpu(now, serving)
        rate = self._service_rates.setdefault(name, ServiceRate())
        world_rps = rate.update(now, [[(wid, _busy_s(wm.workers.get(wid))) for wid in w.workers]
                                      for w in serving], router.stats.total_ok)
        return Context(
            now_s=now, slo_p99_ms=router.slo_p99_ms, p99_ms=p99, samples=samples,
            arrival_rps=router.arrival_rate(now, window_s), queued=router.queued,
            serving=len(serving), forming=forming, desired=dep.desired,
            min_worlds=dep.min_worlds, max_worlds=dep.max_worlds,
            world_rps=world_rps, capacity_rps=capacity_rps(serving, wm.workers),
            host_cores=host_cores, host_busy_cores=host_busy, world_cpu=world_cpu,
            upscale_delay_s=dep.config.upscale_delay_s,
            downscale_delay_s=dep.config.downscale_delay_s)

    def _host_cpu(self, now: float, serving: list[Any]) -> tuple[int, float, float]:
        """(cores, busy cores, cores one busy world keeps busy) of the local launcher's host;
        (0, 0, 0) where unknown. A world's cores: its workers' CPU use over their busy
        fraction (the busiest world, so a half-idle one does not look cheap)."""
        if self._host_load is None:
            return 0, 0.0, 0.0
        if now != self._host_sampled_s:  # once per tick, for every deployment
            self._host_sampled_s = now
            self._host_load.sample()
        busy = self._host_load.busy_cores
        if busy is None:
            return 0, 0.0, 0.0
        workers = self.world_manager.workers
        per_world = 0.0
        for world in serving:
            members = [workers[w] for w in world.workers if w in workers]
            util = max((m.util for m in members), default=0.0)
            if util >= 0.2:
                per_world = max(per_world, sum(m.cpu_cores for m in members) / util)
        return self._host_load.cores, busy, per_world

    def _autoscale_apply(self, name: str, worlds: int, reason: str) -> None:
        self.world_manager.tell(Scale(deployment=name, worlds=worlds, by_operator=False,
                                      reason=reason))

    # -- queries --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        c = self.config.controller
        return build_status(self.world_manager, self.routers, started_s=self.started_s,
                            autoscaler=self.autoscaler, loop_lag=self.health.lag,
                            endpoints={"client_endpoint": c.client_endpoint,
                                       "admin_endpoint": c.admin_endpoint,
                                       "worker_endpoint": c.worker_endpoint})

    async def wait_serving(self, timeout_s: float) -> dict[str, str]:
        """Wait until every deployment either has its desired number of serving worlds or
        cannot have one; returns why for each of the latter (empty: all serve)."""
        async with asyncio.timeout(timeout_s):
            while True:
                down = {name: router.unavailable for name, router in self.routers.items()
                        if router.unavailable}
                status = self.status()
                if all(d["worlds_current"] >= d["worlds_desired"] or d["name"] in down
                       for d in status["deployments"]):
                    return down
                await asyncio.sleep(0.05)

    # -- lifecycle ------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting requests; wait for every accepted one to be answered."""
        for router in self.routers.values():
            router.accepting = False
        deadline = time.monotonic() + timeout_s
        while any(r.unanswered for r in self.routers.values()):
            if time.monotonic() >= deadline:
                for router in self.routers.values():
                    router.fail_all(Cancelled("controller stopped before an answer came"))
                return False
            await asyncio.sleep(0.01)  # answers arrive on socket callbacks, not as events
        return True

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        stop_s = self.config.controller.drain_timeout_ms / 1000.0
        # start() may have failed halfway (a port in use): close only what exists.
        world_manager = getattr(self, "world_manager", None)
        if world_manager is not None:
            await world_manager.shutdown_workers(timeout_s=max(2.0, min(stop_s, 10.0)))
        elif getattr(self, "launcher", None) is not None:
            await self.launcher.aclose(timeout_s=5.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for name in ("admin", "world_manager", "health"):
            actor = getattr(self, name, None)
            if actor is not None:
                await actor.aclose()
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            await metrics.aclose()
        # Give answers already queued in ZeroMQ a moment to leave before closing sockets.
        await asyncio.sleep(0.05)
        for name in ("frontend", "backend"):
            endpoint = getattr(self, name, None)
            if endpoint is not None:
                endpoint.close()
        self._context.term()
        log.info("[controller] stopped")


_PING = Ping()


def capacity_rps(serving: list[Any], workers: dict[str, Any]) -> float:
    """What these serving worlds can deliver together, from each worker's measured compute
    time per request: per stage, the summed rates of the distinct workers serving it (a worker
    shared by worlds counts once), and the slowest stage. 0 while any stage's costs are
    unknown."""
    stages: dict[int, set[str]] = {}
    for world in serving:
        for rank, wid in enumerate(world.workers):
            stages.setdefault(rank, set()).add(wid)
    if not stages:
        return 0.0
    rates = []
    for members in stages.values():
        costs = [workers[w].cost_ms for w in members if w in workers]
        if not costs or min(costs) <= 0.0:
            return 0.0
        rates.append(sum(1000.0 / c for c in costs))
    return min(rates)


def _busy_s(worker: Any) -> float:
    hb = worker.heartbeat if worker is not None else None
    return hb.busy_s if hb is not None else 0.0
