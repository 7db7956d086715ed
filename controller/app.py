"""The controller process: builds the sockets, routers and actors, runs them, releases them.

    Frontend (clients) --submit--> Router (per deployment) --dispatch--> Backend (workers)
    Backend --reply--> Router --answer--> Frontend
    Backend --worker messages--> WorldManager;  Backend --heartbeat--> Health, WorldManager
    Launcher --exit--> Health --lost--> WorldManager
    Router --idle / unreachable / stalled--> WorldManager --add / drain / remove--> Router
    Admin (meshctl), Autoscaler --scale / slo / form / drain--> WorldManager

Everything is built in ``__init__`` (sockets bound); ``start`` starts it, pushing each part's
release onto one ``AsyncExitStack``, so ``aclose`` undoes exactly what started, in reverse.
The data path is synchronous callbacks on one event loop (see mesh.transport for why); the
control path goes through the WorldManager's mailbox. Readiness and drain are awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from controller.admin import Admin
from controller.autoscaler import Autoscaler, policy_of
from controller.backend import Backend
from controller.busy_poll import BusyPoll
from controller.commands import (
    FromWorker,
    Scale,
    Tick,
    WorkerLost,
    WorldIdle,
    WorldStalled,
    WorldUnreachable,
)
from controller.config import Config, SecurityConfig
from controller.describe import model_metadata
from controller.fleet import WorldState
from controller.frontend import Frontend
from controller.health import Health
from controller.held_sends import HeldSends
from controller.launcher import Launcher, LocalLauncher
from controller.metrics import MetricsServer
from controller.probes import liveness, readiness
from controller.router import Router
from controller.scaling_inputs import ScalingInputs
from controller.status import build_status
from controller.world_manager import WorldManager
from mesh.errors import Cancelled
from mesh.logs import speaker
from mesh.messages import Heartbeat, Message, Ping
from mesh.security import DOMAINS, Guard, KeyRing, ServerKeys, read_key_pair

log = speaker(logging.getLogger(__name__), "controller")

LauncherFactory = Callable[[Config, Callable[[str, int], None]], Launcher]
_PING = Ping()


def local_launcher(config: Config, on_exit: Callable[[str, int], None]) -> Launcher:
    c = config.controller
    s = config.security
    # With CURVE, the controller's children hold its own key pair (allowed on the worker port).
    keys = ["--key", s.controller_key, "--controller-key", s.controller_key] if s.curve else []
    return LocalLauncher(c.worker_endpoint, on_exit=on_exit, device=c.worker_device,
                         threads=c.worker_threads, max_workers=c.max_local_workers,
                         extra_args=keys)


class Controller:
    def __init__(self, config: Config, *, launcher: LauncherFactory = local_launcher) -> None:
        self.config = config
        c = config.controller
        self.started_s = time.monotonic()
        self._stack = contextlib.AsyncExitStack()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: dict[str, asyncio.Task[Any]] = {}
        self._started = False
        self._closed = False
        self._context: zmq.Context[Any] = zmq.Context()
        built = contextlib.ExitStack()  # sockets bound so far, closed if a later one fails
        built.callback(self._context.term)
        try:
            self.guard, curve = self._security(config.security)
            if self.guard is not None:
                built.callback(self.guard.stop)
            # A heartbeat late by half an interval gets the worker probed; unreachable for
            # one more interval, it is lost (controller.health).
            self.health = Health(timeout_ms=c.heartbeat_timeout_ms, on_lost=self._lost,
                                 probe_after_ms=c.heartbeat_interval_ms * 3 // 2,
                                 grace_ms=c.heartbeat_interval_ms,
                                 reachable=self._reachable)
            self.launcher = launcher(config, self._exited)
            held = HeldSends()
            self.backend = Backend(self._context, c.worker_endpoint, curve=curve("worker"),
                                   after_batch=held.now)
            built.callback(self.backend.close)
            rids = itertools.count(1).__next__
            inflight_ids: dict[tuple[bytes, Any], int] = {}
            routes: dict[int, Router] = {}
            self.routers: dict[str, Router] = {
                dep.name: Router(
                    dep, send_client=self._send_client, send_worker=self.backend.send,
                    next_rid=rids, on_world_idle=self._world_idle,
                    on_world_unreachable=self._world_unreachable,
                    on_world_stalled=self._world_stalled, inflight_ids=inflight_ids,
                    routes=routes, max_attempts=c.max_attempts, defer=held.defer,
                    listening_since=lambda: self.health.lag.last_end_s)
                for dep in config.deployments}
            self.world_manager = WorldManager(
                config, self.routers, self.launcher, send_worker=self.backend.send_control,
                on_watch=self.health.watch, on_forget=self.health.forget)
            self.backend.routes = routes
            self.frontend = Frontend(self._context, c.client_endpoint, self.routers,
                                     max_request_bytes=c.max_request_bytes,
                                     curve=curve("client"),
                                     max_connections=c.max_client_connections,
                                     describe=self.describe, defer=held.defer,
                                     after_batch=held.now)
            built.callback(self.frontend.close)
            self.admin = Admin(self._context, c.admin_endpoint, world_manager=self.world_manager,
                               launcher=self.launcher, snapshot=self.status,
                               send_worker=self.backend.send_control, curve=curve("admin"))
            built.callback(self.admin.close)
            self.metrics = (MetricsServer(c.metrics_host, c.metrics_port, self.status,
                                          stats=lambda: {name: r.stats for name, r
                                                         in self.routers.items()},
                                          gen=lambda: {name: r.gen for name, r
                                                       in self.routers.items() if r.generative},
                                          live=self.live, ready=self.ready)
                            if c.metrics_port else None)
            self.scaling = ScalingInputs(self.world_manager, self.routers,
                                         self.launcher.host().get("cores", 0))
            self.autoscaler = Autoscaler(list(self.routers), context_of=self.scaling.context,
                                         apply=self._autoscale_apply,
                                         policy=policy_of(config.autoscaler),
                                         tick_s=c.autoscale_tick_ms / 1000.0)
        except BaseException:
            built.close()
            raise
        built.pop_all()

    def _security(self, s: SecurityConfig) -> tuple[Guard | None,
                                                   Callable[[str], ServerKeys | None]]:
        """With CURVE: the running authenticator, and each socket's server keys by domain."""
        if not s.curve:
            return None, lambda domain: None
        public, secret = read_key_pair(s.controller_key)
        # The controller's own key pair is allowed on the worker port (its local workers hold
        # it) and on the client port (the HTTP gateway meshctl up starts holds it).
        ring = KeyRing({"client": Path(s.client_keys), "worker": Path(s.worker_keys),
                        "admin": Path(s.admin_keys)}, always={"worker": {public},
                                                              "client": {public}})
        guard = Guard(self._context, ring)
        log.info("CURVE on: %s", ", ".join(f"{d} keys {ring.count(d)}" for d in DOMAINS))
        return guard, lambda domain: ServerKeys(public, secret, domain)

    def reload_keys(self) -> bool:
        """Re-read the allowed keys (SIGHUP, or a key folder changed)."""
        return self.guard.reload() if self.guard is not None else False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        c = self.config.controller
        stack = self._stack
        stack.callback(self._context.term)  # last: after every socket is closed
        if self.guard is not None:
            stack.callback(self.guard.stop)  # its ZAP socket too, after the servers'
        stack.callback(self.backend.close)
        stack.callback(self.frontend.close)
        # Answers already queued in ZeroMQ get a moment to leave before the sockets close.
        stack.push_async_callback(asyncio.sleep, 0.05)
        if self.metrics is not None:
            await self.metrics.start()
            stack.push_async_callback(self.metrics.aclose)
        if self.guard is not None:
            # A revoked key's open connections are refused from the next message on.
            for domain, pump in (("client", self.frontend.pump), ("worker", self.backend.pump),
                                 ("admin", self.admin.pump)):
                pump.admit = self.guard.admits(domain)
        if c.busy_poll_us:
            busy = BusyPoll(c.busy_poll_us / 1e6)
            stack.callback(busy.close)
            self.frontend.pump.on_receive = self.backend.pump.on_receive = busy.activity
        self.backend.start(on_heartbeat=self._heartbeat, on_control=self._control)
        self.frontend.start()
        for actor in (self.health, self.world_manager, self.admin):
            await actor.start()
            stack.push_async_callback(actor.aclose)
        stack.push_async_callback(self._cancel_tasks)
        if c.autoscale:
            self._spawn(self.autoscaler.run(), "controller.autoscaler")
        self._spawn(self._sweep_loop(), "controller.sweep")
        self._spawn(self._tick_loop(), "controller.tick")
        self._started = True
        self.world_manager.tell(Tick())
        log.info("clients %s, admin %s, workers %s%s", c.client_endpoint, c.admin_endpoint,
                 c.worker_endpoint, f", metrics http://{c.metrics_host}:{c.metrics_port}"
                 "/metrics" if c.metrics_port else "")

    async def wait_serving(self, timeout_s: float) -> dict[str, str]:
        """Wait until every deployment either has its desired number of serving worlds or
        cannot have one; returns why for each of the latter (empty: all serve)."""
        async with asyncio.timeout(timeout_s):
            return await self.world_manager.settled()

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting requests; wait for every accepted one to be answered."""
        for router in self.routers.values():
            router.accepting = False
        try:
            async with asyncio.timeout(timeout_s):
                for router in self.routers.values():
                    await router.all_answered()
            return True
        except TimeoutError:
            for router in self.routers.values():
                router.fail_all(Cancelled("controller stopped before an answer came"))
            return False

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._started:
            stop_s = self.config.controller.drain_timeout_ms / 1000.0
            await self.world_manager.shutdown_workers(timeout_s=max(2.0, min(stop_s, 10.0)))
        else:
            await self.launcher.aclose(timeout_s=5.0)
        await self._stack.aclose()
        if not self._started:  # nothing was pushed: release what __init__ built
            self.backend.close()
            self.frontend.close()
            self.admin.close()
            if self.guard is not None:
                self.guard.stop()
            self._context.term()
        log.info("stopped")

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        self._loops[name] = task  # for liveness: these run until the controller stops
        task.add_done_callback(self._tasks.discard)

    def describe(self) -> list[dict[str, Any]]:
        """Every deployment's metadata, for a client's ``describe`` (controller/describe.py)."""
        wm = self.world_manager
        serving = {w.deployment for w in wm.worlds.values() if w.state == WorldState.SERVING}
        return [model_metadata(name, dep.description, stages=dep.config.stages,
                               ready=name in serving)
                for name, dep in wm.deployments.items()]

    def live(self) -> tuple[bool, str]:
        """/healthz: controller/probes.py."""
        return liveness((self.health, self.world_manager, self.admin), self._loops,
                        stopping=self._closed)

    def ready(self) -> tuple[bool, str]:
        """/readyz: controller/probes.py."""
        stopping = self._closed or not all(r.accepting for r in self.routers.values())
        return readiness(self.status(), self.config.controller.readiness, stopping)

    async def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- wiring: who tells whom -----------------------------------------------------------

    def _send_client(self, frames: list[Any]) -> bool:
        return self.frontend.send(frames)

    def _heartbeat(self, worker_id: str, hb: Heartbeat) -> None:
        self.health.beat(worker_id)
        self.world_manager.tell(FromWorker(worker_id, hb, time.monotonic()))

    def _control(self, worker_id: str, message: Message) -> None:
        self.health.beat(worker_id)
        self.world_manager.tell(FromWorker(worker_id, message))

    def _exited(self, worker_id: str, returncode: int) -> None:
        if not self._closed:
            self.health.exited(worker_id, returncode)

    def _reachable(self, worker_id: str) -> bool:
        return self.backend.send_control(worker_id, _PING)

    def _lost(self, worker_id: str, reason: str, kill: bool) -> None:
        self.world_manager.tell(WorkerLost(worker_id, reason, kill))

    def _world_unreachable(self, world_id: int) -> None:
        self.world_manager.tell(WorldUnreachable(world_id))

    def _world_stalled(self, world_id: int, reason: str) -> None:
        self.world_manager.tell(WorldStalled(world_id, reason))

    def _world_idle(self, world_id: int) -> None:
        self.world_manager.tell(WorldIdle(world_id))

    def _autoscale_apply(self, name: str, worlds: int, reason: str) -> None:
        self.world_manager.tell(Scale(deployment=name, worlds=worlds, by_operator=False,
                                      reason=reason))

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
            for worker_id in self.world_manager.live_workers():
                self.backend.send_control(worker_id, _PING)
            if self.guard is not None and self.guard.ring.stale():
                self.reload_keys()

    # -- queries --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        c = self.config.controller
        return build_status(self.world_manager, self.routers, started_s=self.started_s,
                            autoscaler=self.autoscaler, loop_lag=self.health.lag,
                            backend=self.backend, frontend=self.frontend, admin=self.admin,
                            endpoints={"client_endpoint": c.client_endpoint,
                                       "admin_endpoint": c.admin_endpoint,
                                       "worker_endpoint": c.worker_endpoint})
