"""The controller process: its parts, who tells whom, and one exit stack that releases them.

    Frontend (clients) --submit--> Router (per deployment) --dispatch--> Backend (workers)
    Backend --reply--> Router --answer--> Frontend
    Backend --worker messages--> WorldManager;  Backend --heartbeat--> Health, WorldManager
    Launcher --exit--> Health --lost--> WorldManager
    Router --idle / unreachable / stalled--> WorldManager --add / drain / remove--> Router
    Admin (meshctl), Autoscaler --scale / slo / form / drain--> WorldManager

``Controller.open(config)`` builds every part, binds its sockets and starts it, pushing each
release onto one ``AsyncExitStack``; leaving the ``async with`` undoes exactly what was done,
in reverse, whether the controller ran for weeks or failed halfway through starting. The data
path is synchronous callbacks on one event loop (see mesh.transport for why); the control path
goes through the WorldManager's mailbox, and the WorldManager applies what the Fleet decides
(controller/fleet.py). Readiness and drain are awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from controller import state
from controller.admin import Admin
from controller.autoscaler import Autoscaler, policy_of
from controller.backend import Backend
from controller.busy_poll import BusyPoll
from controller.config import Config, SecurityConfig
from controller.describe import describe_fleet
from controller.fleet import Fleet
from controller.frontend import Frontend
from controller.health import Health
from controller.held_sends import HeldSends
from controller.launcher import Launcher, LocalLauncher
from controller.mailbox import AutoScale, FromWorker, Tick, WorkerLost
from controller.metrics import MetricsServer
from controller.probes import liveness, readiness
from controller.routers import Routers
from controller.scaling_inputs import ScalingInputs
from controller.status import Parts, build_status
from controller.world_manager import WorldManager
from mesh.actor import Mailbox
from mesh.errors import Cancelled
from mesh.logs import speaker
from mesh.messages import ApplyArgs, Heartbeat, Message, Ping
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
                         extra_args=keys, fork=c.fork_workers)


def _security(context: zmq.Context[Any], s: SecurityConfig
              ) -> tuple[Guard | None, Callable[[str], ServerKeys | None]]:
    """With CURVE: the running authenticator, and each socket's server keys by domain."""
    if not s.curve:
        return None, lambda domain: None
    public, secret = read_key_pair(s.controller_key)
    # The controller's own key pair is allowed on the worker port (its local workers hold it)
    # and on the client port (the HTTP gateway meshctl up starts holds it).
    ring = KeyRing({"client": Path(s.client_keys), "worker": Path(s.worker_keys),
                    "admin": Path(s.admin_keys)}, always={"worker": {public}, "client": {public}})
    guard = Guard(context, ring)
    log.info("CURVE on: %s", ", ".join(f"{d} keys {ring.count(d)}" for d in DOMAINS))
    return guard, lambda domain: ServerKeys(public, secret, domain)


@dataclass
class Stopping:
    """Set once the controller starts to stop: a worker's exit is then no loss to report."""

    now: bool = False
    workers_stopped: bool = False


class Controller:
    """A running controller (from ``Controller.open``): what serve.py and tests ask of it."""

    def __init__(self, config: Config, *, fleet: Fleet, routers: Routers, parts: Parts,
                 world_manager: WorldManager, health: Health, guard: Guard | None,
                 inbox: Mailbox, stopping: Stopping) -> None:
        self.config = config
        self.fleet = fleet
        self.routers = routers
        self.world_manager = world_manager
        self._parts = parts
        self._health = health
        self._guard = guard
        self._inbox = inbox
        self._stopping = stopping
        self._loops: dict[str, asyncio.Task[Any]] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, config: Config, *,
                   launcher: LauncherFactory = local_launcher) -> AsyncIterator[Controller]:
        async with contextlib.AsyncExitStack() as stack:
            controller = _assemble(cls, config, launcher, stack)
            await controller._start(stack)
            yield controller
            controller._stopping.now = True
        log.info("stopped")

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        """Start every part, pushing each one's stop; then the first tick."""
        c = self.config.controller
        parts, routers, health, inbox = self._parts, self.routers, self._health, self._inbox
        if c.metrics_port:
            metrics = MetricsServer(
                c.metrics_host, c.metrics_port, self.status,
                stats=lambda: {name: r.stats for name, r in routers.items()},
                gen=lambda: {name: r.gen for name, r in routers.items() if r.generative},
                live=self.live, ready=self.ready)
            await metrics.start()
            stack.push_async_callback(metrics.aclose)
        pumps = {"client": parts.frontend.pump, "worker": parts.backend.pump,
                 "admin": parts.admin.pump}
        if self._guard is not None:
            # A revoked key's open connections are refused from the next message on.
            for domain, pump in pumps.items():
                pump.admit = self._guard.admits(domain)
        if c.busy_poll_us:
            busy = BusyPoll(c.busy_poll_us / 1e6)
            stack.callback(busy.close)
            pumps["client"].on_receive = pumps["worker"].on_receive = busy.activity

        def heartbeat(worker_id: str, hb: Heartbeat) -> None:
            health.beat(worker_id)
            inbox.tell(FromWorker(worker_id, hb, time.monotonic()))

        def control(worker_id: str, message: Message) -> None:
            health.beat(worker_id)
            inbox.tell(FromWorker(worker_id, message))

        parts.backend.start(route=routers.by_world.get, on_heartbeat=heartbeat,
                            on_control=control)
        parts.frontend.start(routers)
        for actor in (health, self.world_manager, parts.admin):
            await actor.start()
            stack.push_async_callback(actor.aclose)
        if c.autoscale:
            self._spawn(parts.autoscaler.run(), "controller.autoscaler")
        self._spawn(_sweep_loop(routers), "controller.sweep")
        self._spawn(self._tick_loop(), "controller.tick")
        stack.push_async_callback(self._cancel_loops)
        stack.push_async_callback(self._stop_workers)  # first, while everything else runs
        inbox.tell(Tick())
        log.info("clients %s, admin %s, workers %s%s", c.client_endpoint, c.admin_endpoint,
                 c.worker_endpoint, f", metrics http://{c.metrics_host}:{c.metrics_port}"
                 "/metrics" if c.metrics_port else "")

    def _spawn(self, coro: Any, name: str) -> None:
        """The controller's own loops: they run until it stops (liveness watches them)."""
        self._loops[name] = asyncio.get_running_loop().create_task(coro, name=name)

    async def _cancel_loops(self) -> None:
        for task in self._loops.values():
            task.cancel()
        await asyncio.gather(*self._loops.values(), return_exceptions=True)

    async def _stop_workers(self) -> None:
        self._stopping.now = True
        if self._stopping.workers_stopped:
            return
        self._stopping.workers_stopped = True
        stop_s = self.config.controller.drain_timeout_ms / 1000.0
        await self.world_manager.shutdown_workers(timeout_s=max(2.0, min(stop_s, 10.0)))

    async def apply(self, document: dict[str, Any]) -> dict[str, Any]:
        """Make a config document's deployments and routes the running set (SIGHUP)."""
        answer: dict[str, Any] = await self.world_manager.ask(ApplyArgs(document=document),
                                                              timeout_s=10.0)
        return answer

    def reload_keys(self) -> bool:
        """Re-read the allowed keys (SIGHUP, or a key folder changed)."""
        return self._guard.reload() if self._guard is not None else False

    async def wait_serving(self, timeout_s: float) -> dict[str, str]:
        """Wait until every deployment either has its desired number of serving worlds or
        cannot have one; returns why for each of the latter (empty: all serve)."""
        async with asyncio.timeout(timeout_s):
            return await self.world_manager.settled()

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting requests; wait for every accepted one to be answered."""
        self.routers.stop_accepting()
        try:
            async with asyncio.timeout(timeout_s):
                for router in self.routers.values():
                    await router.all_answered()
            return True
        except TimeoutError:
            for router in self.routers.values():
                router.fail_all(Cancelled("controller stopped before an answer came"))
            return False

    def status(self) -> dict[str, Any]:
        return build_status(self.config, self.fleet, self.routers, self._parts)

    def live(self) -> tuple[bool, str]:
        """/healthz: controller/probes.py."""
        return liveness((self._health, self.world_manager, self._parts.admin), self._loops,
                        stopping=self._stopping.now)

    def ready(self) -> tuple[bool, str]:
        """/readyz: controller/probes.py."""
        stopping = self._stopping.now or not self.routers.accepting
        return readiness(self.status(), self.config.controller.readiness, stopping)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.world_manager.tell(Tick())  # the Fleet pings every live worker on a tick
            if self._guard is not None and self._guard.ring.stale():
                self.reload_keys()


def _assemble(cls: type[Controller], config: Config, launcher: LauncherFactory,
              stack: contextlib.AsyncExitStack) -> Controller:
    """Build every part and bind its socket, pushing each one's release onto ``stack``."""
    config, resumed = state.resume(config)  # what a previous run kept, with state_dir
    c = config.controller
    context: zmq.Context[Any] = zmq.Context()
    stack.callback(context.term)  # last: after every socket is closed
    guard, curve = _security(context, config.security)
    if guard is not None:
        stack.callback(guard.stop)  # its ZAP socket too, after the servers'
    stopping = Stopping()
    inbox = Mailbox()  # the WorldManager's: the routers, Health and the autoscaler tell it
    held = HeldSends()
    backend = Backend(context, c.worker_endpoint, curve=curve("worker"), after_batch=held.now)
    stack.callback(backend.close)
    # A heartbeat late by half an interval gets the worker probed; unreachable for one more
    # interval, it is lost (controller.health).
    health = Health(timeout_ms=c.heartbeat_timeout_ms,
                    on_lost=lambda w, why, kill: inbox.tell(WorkerLost(w, why, kill)),
                    probe_after_ms=c.heartbeat_interval_ms * 3 // 2,
                    grace_ms=c.heartbeat_interval_ms,
                    reachable=lambda w: backend.send_control(w, _PING))

    def exited(worker_id: str, returncode: int) -> None:
        if not stopping.now:
            health.exited(worker_id, returncode)

    workers = launcher(config, exited)
    fleet = Fleet(config, resumed=resumed)
    frontend = Frontend(context, c.client_endpoint, max_request_bytes=c.max_request_bytes,
                        curve=curve("client"), max_connections=c.max_client_connections,
                        describe=lambda: describe_fleet(fleet), defer=held.defer,
                        after_batch=held.now)
    stack.callback(frontend.close)
    routers = Routers(config, send_client=frontend.send, send_worker=backend.send,
                      tell=inbox.tell, defer=held.defer,
                      listening_since=lambda: health.lag.last_end_s)
    world_manager = WorldManager(fleet, workers, routers, health, mailbox=inbox,
                                 send_worker=backend.send_control)
    scaling = ScalingInputs(fleet, routers, workers.host().get("cores", 0))
    autoscaler = Autoscaler(routers, context_of=scaling.context,
                            apply=lambda name, n, why: inbox.tell(AutoScale(name, n, why)),
                            policy=policy_of(config.autoscaler),
                            tick_s=c.autoscale_tick_ms / 1000.0)
    # The status reads the admin socket's counters too: a snapshot is only ever asked for
    # once ``parts`` is complete, a line below.
    admin = Admin(context, c.admin_endpoint, fleet=world_manager, launcher=workers,
                  snapshot=lambda: build_status(config, fleet, routers, parts),
                  curve=curve("admin"))
    stack.callback(admin.close)
    parts = Parts(started_s=time.monotonic(), launcher=workers, backend=backend,
                  frontend=frontend, admin=admin, autoscaler=autoscaler, loop_lag=health.lag)
    controller = cls(config, fleet=fleet, routers=routers, parts=parts,
                     world_manager=world_manager, health=health, guard=guard, inbox=inbox,
                     stopping=stopping)
    # The workers are told to stop and ended by PID (their launcher's) first, while the rest
    # still runs (pushed again by ``_start``); this one covers a start that fails halfway,
    # before the sockets close (the shutdowns go out on one of them).
    stack.push_async_callback(controller._stop_workers)
    # Answers already queued in ZeroMQ get a moment to leave before the sockets close.
    stack.push_async_callback(asyncio.sleep, 0.05)
    return controller


async def _sweep_loop(routers: Routers) -> None:
    # Deadlines are checked every 5 ms while requests are open, every 50 ms when idle (an
    # idle controller should not wake 200 times a second).
    while True:
        await asyncio.sleep(0.005 if routers.busy else 0.05)
        routers.sweep()
