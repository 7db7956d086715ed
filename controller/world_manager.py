"""The WorldManager: the worker registry, world formation and teardown, scaling to a target.

It owns two maps, workers and worlds, and one rule: after every event (a registration, a
join, an exit, a scale command, a tick) ``reconcile`` moves each deployment towards its desired
number of worlds. It forms worlds from idle workers (asking the launcher for more when none
are idle), drains surplus worlds through their router (no new requests, in-flight ones
finish) before releasing them, and breaks every world of a worker that died, so its router
re-sends the in-flight requests elsewhere.

A world is a list of workers in rank order (rank = pipeline stage); it serves once every rank
has joined. World ids are never reused; a world re-formed after a failure is a new world.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controller.config import Config, DeploymentConfig
from controller.launcher import Launcher, LaunchError
from controller.placement import Placement, world_backend
from controller.router import Router
from mesh.actor import Actor
from mesh.errors import BadRequest
from mesh.messages import (
    Heartbeat,
    Join,
    Joined,
    JoinFailed,
    Leave,
    Left,
    Message,
    Ping,
    Preload,
    Register,
    Shutdown,
    Welcome,
    WorldBroken,
)

log = logging.getLogger(__name__)

SendWorker = Callable[[str, Message], bool]


@dataclass
class WorkerInfo:
    id: str
    state: str = "starting"  # starting | idle | serving | draining | dead
    pid: int = 0
    host: str = ""
    device: str = ""
    device_uuid: str = ""
    store_addr: str = ""
    worlds: set[int] = field(default_factory=set)
    spawned_by_us: bool = False
    retiring: bool = False
    joined_once: bool = False
    preloaded: bool = False  # it loaded a model at least once (a later crash is no load fault)
    # Set when a world of this worker broke by someone else's report: the worker may be the
    # one that died, so it is not reused until it heartbeats again after this time.
    suspect_since_s: float = 0.0
    since_s: float = field(default_factory=time.monotonic)
    reason: str = ""
    heartbeat: Heartbeat | None = None
    heartbeat_s: float = 0.0
    util: float = 0.0  # busy fraction of its compute, smoothed over recent heartbeats
    cost_ms: float = 0.0  # compute time per request, smoothed (which stage is the bottleneck)
    cpu_cores: float = 0.0  # cores its process keeps busy, smoothed over recent heartbeats


@dataclass
class WorldInfo:
    id: int
    deployment: str
    epoch: int
    workers: list[str]
    state: str = "forming"  # forming | serving | draining | broken
    joined: set[str] = field(default_factory=set)
    created_s: float = field(default_factory=time.monotonic)
    ready_s: float = 0.0
    reason: str = ""
    load_ms: float = 0.0
    form_ms: float = 0.0
    backend: str = "local"  # gloo | nccl | local (one rank), see controller.placement
    entry: str = ""  # identity of rank 0's runner socket, from its Joined


@dataclass
class DeploymentState:
    config: DeploymentConfig
    desired: int
    min_worlds: int
    max_worlds: int
    failures: int = 0
    retry_at_s: float = 0.0
    last_error: str = ""
    quarantined: str = ""  # why formation stopped being retried ("" = it is not)
    inputs: dict[str, Any] = field(default_factory=dict)


# -- mailbox messages ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FromWorker:
    worker_id: str
    message: Message


@dataclass(frozen=True, slots=True)
class WorkerLost:
    """Health's verdict: the process exited, or went silent (then ``kill`` it)."""

    worker_id: str
    reason: str
    kill: bool = False


@dataclass(frozen=True, slots=True)
class WorldIdle:
    world_id: int


@dataclass(frozen=True, slots=True)
class WorldUnreachable:
    world_id: int


@dataclass(frozen=True, slots=True)
class Scale:
    deployment: str
    worlds: int | None = None
    min_worlds: int | None = None
    max_worlds: int | None = None
    by_operator: bool = True
    reason: str = ""


@dataclass(frozen=True, slots=True)
class FormWorld:
    """Form a world of ``deployment`` on exactly these workers (rank order); they may already
    serve other worlds: a worker shared between worlds is the MultiWorld idea."""

    deployment: str
    workers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DrainTarget:
    target: str


@dataclass(frozen=True, slots=True)
class Tick:
    pass


class WorldManager(Actor):
    def __init__(
        self,
        config: Config,
        routers: dict[str, Router],
        launcher: Launcher,
        *,
        send_worker: SendWorker,
        on_watch: Callable[[str], None],
        on_forget: Callable[[str], None],
        deaf_until: Callable[[], float] = lambda: float("-inf"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__("world-manager")
        self.config = config
        self.routers = routers
        self.launcher = launcher
        self._send = send_worker
        self._on_watch = on_watch
        self._on_forget = on_forget
        # When the controller's loop last came back from a stall (Health measures it): no
        # world is judged on time the controller was not listening to its answers.
        self._deaf_until = deaf_until
        self._clock = clock
        self.workers: dict[str, WorkerInfo] = {}
        self.worlds: dict[int, WorldInfo] = {}
        self.deployments: dict[str, DeploymentState] = {
            d.name: DeploymentState(d, d.worlds, d.min_worlds, d.max_worlds)
            for d in config.deployments
        }
        self._world_ids = itertools.count(1)
        # Workers that die before registering (a broken environment, an import error) make
        # the launcher back off, and stop after max_load_failures in a row.
        self._spawn_failures = 0
        self._spawn_retry_at_s = 0.0
        self.spawn_quarantined = ""
        self._full_reported = False
        self._worker_ids = itertools.count(1)
        # (worker id, pid) of processes declared dead: the same process must never come back,
        # but a new process may reuse the id (a remote worker restarted by its operator).
        self._fenced: set[tuple[str, int]] = set()
        self.stopping = False
        # The last world and worker events, for status: what broke, when, and why.
        self.events: deque[dict[str, Any]] = deque(maxlen=100)
        c = config.controller
        self._welcome = Welcome(heartbeat_interval_ms=c.heartbeat_interval_ms,
                                controller_timeout_ms=c.controller_timeout_ms,
                                max_idle_stages=c.max_idle_stages)

    # -- events ---------------------------------------------------------------------------

    async def handle(self, message: Any) -> Any:
        # Every message ends with a reconcile pass, so what it changed (a replacement, a
        # spare, a drain) acts now, before an operator command's result goes back.
        result: Any = None
        if isinstance(message, FromWorker):
            self._from_worker(message.worker_id, message.message)
        elif isinstance(message, WorkerLost):
            self._worker_died(message.worker_id, message.reason, kill=message.kill)
        elif isinstance(message, WorldIdle):
            self._release_world(message.world_id)
        elif isinstance(message, WorldUnreachable):
            world = self.worlds.get(message.world_id)
            if world is not None:
                self._break_world(world, "its stage-0 worker's data socket is unreachable")
        elif isinstance(message, Scale):
            result = self._scale(message)
        elif isinstance(message, DrainTarget):
            result = self._drain_target(message.target)
        elif isinstance(message, FormWorld):
            result = self._form_on(message)
        elif isinstance(message, Tick):
            self._check_forming()
            self.check_progress()
            self._forget_dead()
        await self.reconcile()
        return result

    def _from_worker(self, worker_id: str, msg: Message) -> None:
        if isinstance(msg, Register):
            self._register(worker_id, msg)
            return
        worker = self.workers.get(worker_id)
        if worker is None or worker.state == "dead":
            if worker is not None and (worker_id, worker.pid) in self._fenced:
                # A fenced process spoke again (it was stopped, now resumed): end it.
                self._send(worker_id, Shutdown(reason="fenced: declared dead earlier"))
            return
        if isinstance(msg, Joined):
            world = self.worlds.get(msg.world_id)
            if world is None or world.epoch != msg.epoch or world.state != "forming":
                return
            world.joined.add(worker_id)
            if msg.entry and world.workers[0] == worker_id:
                world.entry = msg.entry
            worker.joined_once = True
            world.load_ms = max(world.load_ms, msg.load_ms)
            world.form_ms = max(world.form_ms, msg.form_ms)
            if msg.inputs:
                self.deployments[world.deployment].inputs = dict(msg.inputs)
            if world.joined == set(world.workers):
                self._world_serving(world)
        elif isinstance(msg, JoinFailed):
            world = self.worlds.get(msg.world_id)
            if world is None or world.epoch != msg.epoch:
                return
            self._formation_failed(world, msg.error)
            self._break_world(world, f"join failed: {msg.error}")
        elif isinstance(msg, Left):
            worker.worlds.discard(msg.world_id)
            self._settle_worker(worker)
        elif isinstance(msg, WorldBroken):
            world = self.worlds.get(msg.world_id)
            if world is not None and world.epoch == msg.epoch:
                now = self._clock()
                for wid in world.workers:
                    peer = self.workers.get(wid)
                    if wid != worker_id and peer is not None and peer.state != "dead":
                        peer.suspect_since_s = now
                        self._send(wid, Ping(reply=True))  # alive? a heartbeat clears it
                self._break_world(world, f"reported by {worker_id}: {msg.reason}")

    def _register(self, worker_id: str, msg: Register) -> None:
        if (worker_id, msg.pid) in self._fenced:
            # A worker we declared dead came back (e.g. SIGCONT): it must not rejoin anything.
            self._send(worker_id, Shutdown(reason="fenced: declared dead earlier"))
            return
        worker = self.workers.get(worker_id)
        if worker is None or worker.state == "dead":
            worker = WorkerInfo(worker_id)
            self.workers[worker_id] = worker
        if worker.state == "starting":
            worker.state = "idle"
            worker.since_s = self._clock()
            self._spawn_failures = 0
        worker.pid, worker.host, worker.device = msg.pid, msg.host, msg.device
        worker.device_uuid = msg.device_uuid
        worker.store_addr = msg.store_addr
        self._on_watch(worker_id)
        self._send(worker_id, self._welcome)
        log.info("[controller] worker %s registered (pid %d, %s)", worker_id, msg.pid, msg.device)

    def note_heartbeat(self, worker_id: str, hb: Heartbeat) -> None:
        worker = self.workers.get(worker_id)
        if worker is not None:
            suspect = worker.heartbeat_s < worker.suspect_since_s
            now = self._clock()
            previous, previous_s = worker.heartbeat, worker.heartbeat_s
            if previous is not None and now > previous_s:
                d_busy = hb.busy_s - previous.busy_s
                busy = max(0.0, min(1.0, d_busy / (now - previous_s)))
                worker.util = 0.7 * worker.util + 0.3 * busy
                cores = max(0.0, (hb.cpu_s - previous.cpu_s) / (now - previous_s))
                worker.cpu_cores = 0.7 * worker.cpu_cores + 0.3 * cores
                d_req = hb.requests - previous.requests
                if d_req > 0 and d_busy > 0:
                    cost = d_busy * 1000.0 / d_req
                    worker.cost_ms = cost if worker.cost_ms == 0.0 else \
                        0.7 * worker.cost_ms + 0.3 * cost
            worker.heartbeat = hb
            worker.heartbeat_s = now
            if suspect and worker.state == "idle" and not self.stopping:
                self.tell(Tick())  # cleared: it may take a place in a new world now

    # -- worlds ---------------------------------------------------------------------------

    def _form_world(self, dep: DeploymentState, workers: list[WorkerInfo]) -> WorldInfo:
        backend, why = world_backend([Placement(w.host, w.device, w.device_uuid)
                                      for w in workers])
        world = WorldInfo(id=next(self._world_ids), deployment=dep.config.name, epoch=1,
                          workers=[w.id for w in workers], backend=backend)
        self.worlds[world.id] = world
        spec = dep.config.to_wire()
        for rank, worker in enumerate(workers):
            worker.worlds.add(world.id)
            worker.state = "serving"
            self._send(worker.id, Join(world_id=world.id, epoch=world.epoch, rank=rank,
                                       size=len(workers), deployment=spec,
                                       rendezvous=workers[0].store_addr,
                                       world_timeout_ms=dep.config.world_timeout_ms,
                                       form_timeout_ms=self.config.controller
                                       .world_form_timeout_ms,
                                       peers=list(world.workers),
                                       backend="" if backend == "local" else backend))
        log.info("[controller] forming world %d/%d of %s on %s (%s: %s)", world.id,
                 world.epoch, dep.config.name, world.workers, backend, why)
        return world

    def event(self, kind: str, **fields: Any) -> None:
        self.events.append({"t": round(time.time(), 3), "event": kind, **fields})

    def _world_serving(self, world: WorldInfo) -> None:
        world.state = "serving"
        world.ready_s = self._clock()
        self.event("world_serving", world=world.id, epoch=world.epoch,
                   deployment=world.deployment, workers=list(world.workers),
                   formed_ms=round((world.ready_s - world.created_s) * 1000, 1),
                   load_ms=round(world.load_ms, 1), form_ms=round(world.form_ms, 1))
        dep = self.deployments[world.deployment]
        dep.failures = 0
        dep.last_error = ""
        self.routers[world.deployment].add_world(world.id, world.epoch, world.entry.encode())
        log.info("[controller] world %d/%d of %s serving (formed in %.0f ms)", world.id,
                 world.epoch, world.deployment, (world.ready_s - world.created_s) * 1000)

    def _shareable(self, dep: DeploymentState,
                   max_util: float = 0.85) -> tuple[dict[int, WorkerInfo], str]:
        """Worker-granular scaling: for each stage that is not the bottleneck, an existing
        worker of that stage that the new world can share.

        The bottleneck is the stage with the highest compute time per request; a stage at
        most 2/3 of that, whose least busy worker still has headroom, is shared instead of
        started anew. A new world then adds processes only for the stages that need them.
        Nothing is shared while the costs are unknown. Also returns why, for the log.
        """
        if dep.config.stages < 2:
            return {}, ""
        by_stage: dict[int, list[WorkerInfo]] = {}
        for world in self.worlds.values():
            if world.deployment != dep.config.name or world.state != "serving":
                continue
            for rank, wid in enumerate(world.workers):
                worker = self.workers.get(wid)
                if worker is not None and worker.state == "serving":
                    by_stage.setdefault(rank, []).append(worker)
        costs = {s: min(w.cost_ms for w in ws) for s, ws in by_stage.items() if ws}
        if len(costs) < dep.config.stages or min(costs.values()) <= 0.0:
            return {}, ""
        worst = max(costs.values())
        shared: dict[int, WorkerInfo] = {}
        for stage, workers in by_stage.items():
            best = min(workers, key=lambda w: w.util)
            if costs[stage] <= worst / 1.5 and best.util < max_util:
                shared[stage] = best
        if len(shared) == dep.config.stages:  # never a world of only shared workers
            shared.pop(max(shared, key=lambda s: costs[s]))
        why = (f"{dep.config.name} stage costs "
               f"{ {s: round(c, 1) for s, c in sorted(costs.items())} } ms, busiest-stage "
               f"utilisation "
               f"{ {s: round(max(w.util for w in ws), 2) for s, ws in sorted(by_stage.items())} }"
               f": sharing { {s: w.id for s, w in shared.items()} }")
        return shared, why

    def _drain_world(self, world: WorldInfo, reason: str) -> None:
        if world.state == "forming":
            self._release_world(world.id)
            return
        if world.state != "serving":
            return
        world.state = "draining"
        world.reason = reason
        log.info("[controller] draining world %d/%d of %s: %s", world.id, world.epoch,
                 world.deployment, reason)
        self.routers[world.deployment].drain_world(world.id)  # may call WorldIdle at once

    def _release_world(self, world_id: int) -> None:
        world = self.worlds.pop(world_id, None)
        if world is None:
            return
        self.routers[world.deployment].remove_world(world_id, "released")
        for wid in world.workers:
            worker = self.workers.get(wid)
            if worker is None or worker.state == "dead":
                continue
            self._send(wid, Leave(world_id=world.id, epoch=world.epoch))
            worker.worlds.discard(world.id)
            self._settle_worker(worker)
        log.info("[controller] released world %d/%d of %s", world.id, world.epoch,
                 world.deployment)

    def _break_world(self, world: WorldInfo, reason: str) -> None:
        if world.id not in self.worlds:
            return
        del self.worlds[world.id]
        world.state = "broken"
        resent = self.routers[world.deployment].remove_world(world.id, reason)
        self.event("world_broken", world=world.id, epoch=world.epoch,
                   deployment=world.deployment, reason=reason, resent=resent)
        (log.info if self.stopping else log.warning)(
            "[controller] world %d/%d of %s broken: %s (%d requests re-sent)",
            world.id, world.epoch, world.deployment, reason, resent)
        for wid in world.workers:
            worker = self.workers.get(wid)
            if worker is None or worker.state == "dead":
                continue
            self._send(wid, Leave(world_id=world.id, epoch=world.epoch, abort=True))
            worker.worlds.discard(world.id)
            self._settle_worker(worker)

    def _formation_failed(self, world: WorldInfo, error: str) -> None:
        """Back off exponentially; after ``max_load_failures`` in a row, stop trying."""
        dep = self.deployments[world.deployment]
        dep.failures += 1
        dep.last_error = error
        limit = self.config.controller.max_load_failures
        if dep.failures >= limit:
            dep.quarantined = (f"{dep.failures} formation failures in a row; last: {error}. "
                               f"Fix the model, then 'meshctl scale {dep.config.name}' to retry")
            self.routers[dep.config.name].set_unavailable(self.unavailable_reason(dep))
            log.error("[controller] %s quarantined: %s", dep.config.name, dep.quarantined)
            self.event("deployment_quarantined", deployment=dep.config.name, reason=error,
                       failures=dep.failures)
            return
        backoff_s = min(60.0, 0.5 * 2 ** (dep.failures - 1))
        dep.retry_at_s = self._clock() + backoff_s
        log.error("[controller] world %d/%d of %s failed to form: %s (retry %d/%d in %.1fs)",
                  world.id, world.epoch, world.deployment, error, dep.failures, limit - 1,
                  backoff_s)

    def check_progress(self) -> None:
        """Break serving worlds that hold requests but stopped answering (a stuck stage)."""
        now = self._clock()
        listening_since = self._deaf_until()
        for world in list(self.worlds.values()):
            if world.state not in ("serving", "draining"):
                continue
            route = self.routers[world.deployment].worlds.get(world.id)
            if route is None or not route.inflight:
                continue
            stall_s = self.deployments[world.deployment].config.world_timeout_ms / 1000.0
            silent_s = now - max(route.last_progress_s, listening_since)
            if silent_s > stall_s:
                self._break_world(world, f"no progress for {silent_s:.1f}s "
                                         f"with {len(route.inflight)} requests in flight")

    def _check_forming(self) -> None:
        limit_s = self.config.controller.world_form_timeout_ms / 1000.0
        now = self._clock()
        for world in list(self.worlds.values()):
            if world.state == "forming" and now - world.created_s > limit_s:
                self._break_world(world, f"not formed within {limit_s:.0f}s")

    # -- workers --------------------------------------------------------------------------

    def _forget_dead(self, keep_s: float = 60.0) -> None:
        now = self._clock()
        for wid in [w.id for w in self.workers.values()
                    if w.state == "dead" and now - w.since_s > keep_s]:
            del self.workers[wid]

    def _settle_worker(self, worker: WorkerInfo) -> None:
        if worker.worlds or worker.state == "dead":
            return
        if worker.state == "draining":
            if not worker.retiring:
                self._retire_worker(worker)
            return
        worker.state = "idle"
        worker.since_s = self._clock()

    def _worker_died(self, worker_id: str, reason: str, *, kill: bool = False) -> None:
        worker = self.workers.get(worker_id)
        if worker is None:
            worker = WorkerInfo(worker_id)
            self.workers[worker_id] = worker
        if worker.state == "dead":
            return
        was_draining = worker.state == "draining"
        if worker.state == "starting" and worker.spawned_by_us and not self.stopping:
            self._spawn_failed(worker_id, reason)
        worker.state = "dead"
        worker.reason = reason
        worker.since_s = self._clock()
        self._fenced.add((worker_id, worker.pid))
        self._on_forget(worker_id)
        if kill:
            self.launcher.kill(worker_id)
        log_fn = log.info if was_draining or self.stopping else log.warning
        log_fn("[controller] worker %s is dead: %s", worker_id, reason)
        self.event("worker_dead", worker=worker_id, reason=reason)
        for world_id in sorted(worker.worlds):
            world = self.worlds.get(world_id)
            if world is not None:
                if world.state == "forming" and worker_id not in world.joined \
                        and not worker.joined_once:
                    self._formation_failed(world, f"worker {worker_id} {reason} while loading")
                self._break_world(world, f"worker {worker_id} {reason}")
        worker.worlds.clear()

    def _spawn_failed(self, worker_id: str, reason: str) -> None:
        self._spawn_failures += 1
        limit = self.config.controller.max_load_failures
        if self._spawn_failures >= limit:
            self.spawn_quarantined = (f"{self._spawn_failures} workers in a row died before "
                                      f"registering; last: {worker_id} {reason}")
            log.error("[controller] no more workers will be started: %s", self.spawn_quarantined)
            self.event("launcher_quarantined", reason=self.spawn_quarantined)
            return
        backoff_s = min(60.0, 0.5 * 2 ** (self._spawn_failures - 1))
        self._spawn_retry_at_s = self._clock() + backoff_s
        log.error("[controller] worker %s died before registering (%s); next start in %.1fs",
                  worker_id, reason, backoff_s)

    def _retire_worker(self, worker: WorkerInfo) -> None:
        worker.state = "draining"
        worker.retiring = True
        worker.since_s = self._clock()
        if worker.spawned_by_us:
            # It goes quiet on purpose, and the launcher reports its exit: not a hang. A
            # worker that joined by itself has no launcher to report it, so Health keeps
            # watching and declares it dead once it has gone quiet.
            self._on_forget(worker.id)
        self._send(worker.id, Shutdown(reason="released"))
        if worker.spawned_by_us:
            self.spawn(self.launcher.stop(worker.id, timeout_s=10.0),
                       name=f"{self.name}.stop.{worker.id}")

    async def _spawn_worker(self) -> None:
        worker_id = f"w{next(self._worker_ids)}"
        info = WorkerInfo(worker_id, spawned_by_us=True)
        self.workers[worker_id] = info
        try:
            info.pid = await self.launcher.spawn(worker_id)
        except (LaunchError, OSError) as exc:
            log.error("[controller] cannot start a worker: %s", exc)
            info.state = "dead"
            info.reason = f"launch failed: {exc}"

    # -- the reconcile loop ---------------------------------------------------------------

    async def reconcile(self) -> None:
        if self.stopping:
            return
        now = self._clock()
        # A suspect worker (its world broke on a peer's word) waits for a fresh heartbeat.
        idle = [w for w in self.workers.values() if w.state == "idle"
                and w.heartbeat_s >= w.suspect_since_s]
        suspects = sum(1 for w in self.workers.values() if w.state == "idle"
                       and w.heartbeat_s < w.suspect_since_s)
        starting = sum(1 for w in self.workers.values() if w.state == "starting") + suspects
        needed = 0
        for dep in self.deployments.values():
            live = [w for w in self.worlds.values()
                    if w.deployment == dep.config.name and w.state in ("forming", "serving")]
            missing = dep.desired - len(live)
            if missing > 0:
                if now < dep.retry_at_s or dep.quarantined:
                    continue
                stages = dep.config.stages
                shared, why = self._shareable(dep) if live else ({}, "")
                fresh = stages - len(shared)
                while missing > 0 and len(idle) >= fresh:
                    if shared:  # logged when used: reconcile runs on every tick
                        log.info("[controller] %s", why)
                    new, idle = idle[:fresh], idle[fresh:]
                    members = [shared[r] if r in shared else new.pop(0) for r in range(stages)]
                    self._form_world(dep, members)
                    missing -= 1
                needed += missing * fresh
            elif missing < 0:
                # Drop forming worlds first (nothing to drain), then the newest: the reverse
                # of the order they were added in (shared-worker worlds came last).
                ranked = sorted(live, key=lambda w: (w.state == "serving", -w.created_s))
                for world in ranked[:-missing]:
                    self._drain_world(world, f"scaled down to {dep.desired}")
        # Start what is missing; retire idle workers nobody needs. Workers still starting
        # count as supply: they will register and be used on a later pass.
        supply = len(idle) + starting
        wanted = needed + self.config.controller.warm_workers
        can_spawn = (self.launcher.can_spawn and not self.spawn_quarantined
                     and now >= self._spawn_retry_at_s)
        room = self.launcher.room()
        if wanted > supply and can_spawn and room <= 0 and not self._full_reported:
            self._full_reported = True
            log.warning("[controller] %d more workers wanted, but the launcher is full; raise "
                        "controller.max_local_workers or add remote workers", wanted - supply)
            self.event("launcher_full", wanted=wanted - supply)
        if room > 0:
            self._full_reported = False
        if wanted > supply and can_spawn:
            for _ in range(min(wanted - supply, max(0, room))):
                await self._spawn_worker()
        surplus = min(len(idle), supply - wanted)
        # Keep the idle workers worth most (stages loaded, longest warm); retire the others.
        by_value = sorted(idle, key=lambda w: (w.joined_once or w.preloaded, -w.since_s))
        for worker in by_value[:max(0, surplus)]:
            if worker.spawned_by_us:
                self._retire_worker(worker)
        if self.config.controller.preload_warm:
            for worker in idle:
                if worker.state == "idle" and not worker.preloaded:
                    self._preload(worker)
        for dep in self.deployments.values():
            self.routers[dep.config.name].set_unavailable(self.unavailable_reason(dep))

    def unavailable_reason(self, dep: DeploymentState) -> str:
        """Why no world of ``dep`` can form now ("" when one can, or one serves)."""
        if dep.quarantined:
            return f"quarantined after {dep.quarantined}"
        if self.spawn_quarantined and not any(
                w.deployment == dep.config.name and w.state in ("forming", "serving")
                for w in self.worlds.values()):
            return f"no worker can be started: {self.spawn_quarantined}"
        return ""

    def _preload(self, worker: WorkerInfo) -> None:
        """A warm worker loads every stage it may be asked for, so a later join only forms
        the group: re-forming after a failure then costs milliseconds, not a model load.
        At most ``max_idle_stages`` of them (more would only be dropped again), in config
        order."""
        worker.preloaded = True
        budget = self.config.controller.max_idle_stages
        for dep in self.deployments.values():
            if dep.quarantined:
                continue
            for rank in range(dep.config.stages):
                if budget <= 0:
                    return
                budget -= 1
                self._send(worker.id, Preload(deployment=dep.config.to_wire(), rank=rank,
                                              size=dep.config.stages))

    # -- commands -------------------------------------------------------------------------

    def _scale(self, cmd: Scale) -> dict[str, Any]:
        dep = self.deployments.get(cmd.deployment)
        if dep is None:
            raise BadRequest(f"no deployment named {cmd.deployment!r}")
        lo = dep.min_worlds if cmd.min_worlds is None else cmd.min_worlds
        hi = dep.max_worlds if cmd.max_worlds is None else cmd.max_worlds
        if lo < 0 or hi < 1 or lo > hi:
            raise BadRequest(
                f"bounds min={lo} max={hi} are invalid (need 0 <= min <= max, max >= 1)")
        desired = dep.desired if cmd.worlds is None else cmd.worlds
        if cmd.worlds is not None and not lo <= cmd.worlds <= hi:
            raise BadRequest(f"--worlds {cmd.worlds} lies outside [{lo}, {hi}]; "
                             "change --min/--max first")
        dep.min_worlds, dep.max_worlds = lo, hi
        before = dep.desired
        dep.desired = max(lo, min(hi, desired))
        if before != dep.desired:
            self.event("scaled", deployment=dep.config.name, to=dep.desired,
                       by="operator" if cmd.by_operator else "autoscaler",
                       reason=cmd.reason or "meshctl scale")
        if not cmd.by_operator:
            return {"deployment": dep.config.name, "worlds_desired": dep.desired}
        if dep.quarantined or self.spawn_quarantined:
            log.info("[controller] %s: quarantine lifted by operator", dep.config.name)
            dep.quarantined = ""
            dep.failures = 0
            dep.retry_at_s = 0.0
            self.spawn_quarantined = ""
            self._spawn_failures = 0
        log.info("[controller] %s scaled: desired %d worlds, bounds [%d, %d]", dep.config.name,
                 dep.desired, lo, hi)
        return {"deployment": dep.config.name, "worlds_desired": dep.desired,
                "min_worlds": lo, "max_worlds": hi}

    def _form_on(self, cmd: FormWorld) -> dict[str, Any]:
        dep = self.deployments.get(cmd.deployment)
        if dep is None:
            raise BadRequest(f"no deployment named {cmd.deployment!r}")
        if len(cmd.workers) != dep.config.stages:
            raise BadRequest(f"{cmd.deployment} has {dep.config.stages} stages; "
                             f"got {len(cmd.workers)} workers")
        if len(set(cmd.workers)) != len(cmd.workers):
            raise BadRequest("a worker can hold only one rank of a world")
        workers = []
        for wid in cmd.workers:
            worker = self.workers.get(wid)
            if worker is None or worker.state not in ("idle", "serving"):
                raise BadRequest(f"worker {wid!r} is not a live, idle or serving worker")
            workers.append(worker)
        live = sum(1 for w in self.worlds.values()
                   if w.deployment == cmd.deployment and w.state in ("forming", "serving"))
        if live + 1 > dep.max_worlds:
            raise BadRequest(f"{cmd.deployment} already has {live} worlds; max_worlds is "
                             f"{dep.max_worlds}")
        dep.desired = max(dep.desired, live + 1)
        world = self._form_world(dep, workers)
        return {"world": world.id, "epoch": world.epoch, "workers": list(world.workers)}

    def _drain_target(self, target: str) -> dict[str, Any]:
        worker = self.workers.get(target)
        if worker is not None and worker.state != "dead":
            for world_id in sorted(worker.worlds):
                world = self.worlds.get(world_id)
                if world is not None:
                    self._drain_world(world, f"worker {target} drained by operator")
            if not worker.worlds:
                self._retire_worker(worker)
            else:
                worker.state = "draining"
            return {"drained": "worker", "id": target}
        if target.isdigit() and int(target) in self.worlds:
            world_id = int(target)
            world = self.worlds[world_id]
            dep = self.deployments[world.deployment]
            # Draining a world gives its place back (down to min_worlds, where a replacement
            # is formed); draining a worker keeps the count and re-forms elsewhere.
            if dep.desired > dep.min_worlds:
                dep.desired -= 1
            self._drain_world(world, "drained by operator")
            return {"drained": "world", "id": world_id, "worlds_desired": dep.desired}
        raise BadRequest(f"no live worker or world named {target!r}")

    async def shutdown_workers(self, timeout_s: float) -> None:
        """Tell every worker to stop, then end the ones we started by PID."""
        self.stopping = True
        for worker in self.workers.values():
            if worker.state != "dead":
                self._on_forget(worker.id)
                self._send(worker.id, Shutdown(reason="controller stopping"))
        await self.launcher.aclose(timeout_s)
