"""The WorldManager: the one owner of the fleet (workers, worlds, deployments' live settings).

It turns events into changes of the fleet (controller/fleet.py) and, after each, asks the
planner what to do (``plan(view)``, controller/planner.py, a pure function) and applies the
answer: form, drain, break, spawn, retire, preload, forget. Nothing else changes a world's or a
worker's state. Events arrive as messages in its mailbox (controller/commands.py); it tells
the routers which worlds to route to, and they answer with messages of their own.

A world is a list of workers in rank order (rank = pipeline stage); it serves once every rank
has joined. World ids are never reused; a world re-formed after a failure is a new world.
Worker ids (``w1``, ``w2``, ...) are never reused within a run, and a restarted controller
first takes back the workers its launcher still runs (``on_start``), then numbers new ones
above theirs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from controller.commands import (
    DrainTarget,
    FormWorld,
    FromWorker,
    Scale,
    SetSlo,
    Tick,
    WorkerLost,
    WorldIdle,
    WorldStalled,
    WorldUnreachable,
)
from controller.config import Config
from controller.fleet import (
    LIVE_WORLD,
    DeploymentState,
    EventLog,
    WorkerInfo,
    WorkerState,
    WorldInfo,
    WorldState,
)
from controller.launcher import Launcher, LaunchError
from controller.operator_commands import OperatorCommands
from controller.placement import Placement, world_backend
from controller.planner import (
    Action,
    Break,
    DeploymentView,
    Drain,
    Forget,
    Form,
    LauncherFull,
    Preload,
    ResendJoin,
    Retire,
    Spawn,
    View,
    WorkerView,
    WorldView,
    plan,
)
from controller.router import Router
from controller.worker_events import WorkerEvents
from mesh.actor import Actor
from mesh.logs import speaker
from mesh.messages import Heartbeat, Join, Leave, Message, Shutdown, Welcome
from mesh.messages import Preload as PreloadMsg

log = speaker(logging.getLogger(__name__), "controller")

SendWorker = Callable[[str, Message], bool]
# How long a starting controller waits for its launcher to say which workers it already runs.
ADOPT_TIMEOUT_S = 30.0


class WorldManager(WorkerEvents, OperatorCommands, Actor):
    def __init__(
        self,
        config: Config,
        routers: dict[str, Router],
        launcher: Launcher,
        *,
        send_worker: SendWorker,
        on_watch: Callable[[str], None],
        on_forget: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__("world-manager")
        self.config = config
        self.routers = routers
        self.launcher = launcher
        self._send = send_worker
        self._on_watch = on_watch
        self._on_forget = on_forget
        self._clock = clock
        self.workers: dict[str, WorkerInfo] = {}
        self.worlds: dict[int, WorldInfo] = {}
        self.deployments: dict[str, DeploymentState] = {
            d.name: DeploymentState.of(d) for d in config.deployments}
        self._world_ids = itertools.count(1)
        self._worker_ids = itertools.count(1)
        # Workers that die before registering (a broken environment, an import error) make
        # the launcher back off, and stop after max_load_failures in a row.
        self._spawn_failures = 0
        self._spawn_retry_at_s = 0.0
        self.spawn_quarantined = ""
        self._full_reported = False
        # (worker id, pid) of processes declared dead: the same process must never come back,
        # but a new process may reuse the id (a remote worker restarted by its operator).
        self._fenced: set[tuple[str, int]] = set()
        # Messages from registered workers about worlds they are not members of (dropped).
        self.foreign_messages = 0
        self.workers_died = 0  # since the start: worker churn, for metrics
        self.worlds_broken = 0
        # Unknown workers asked to register (a previous controller's fleet), and when.
        self._asked: dict[str, float] = {}
        self.stopping = False
        self.events = EventLog(wall_clock)
        # Set once every deployment serves its desired worlds or cannot (the ready line).
        self._settled = asyncio.Event()
        self._down: dict[str, str] = {}
        c = config.controller
        self._welcome = Welcome(heartbeat_interval_ms=c.heartbeat_interval_ms,
                                controller_timeout_ms=c.controller_timeout_ms,
                                max_idle_stages=c.max_idle_stages, packed_replies=True)

    async def on_start(self) -> None:
        """Before the first plan: the workers the launcher still runs from a previous run of
        this controller (a restart under the kubernetes launcher) are ours again, expected
        to register, and new ids start above theirs, so nothing is started for them and no
        new worker asks for an id, or a pod, that one of them holds."""
        adopted = await self.launcher.adopt(timeout_s=ADOPT_TIMEOUT_S)
        now = self._clock()
        for worker_id in adopted:
            self.workers[worker_id] = WorkerInfo(worker_id, since_s=now, spawned_by_us=True,
                                                 adopted=True)
        numbers = [int(w[1:]) for w in adopted if w[:1] == "w" and w[1:].isdigit()]
        self._worker_ids = itertools.count(max(numbers, default=0) + 1)

    # -- the mailbox ----------------------------------------------------------------------

    async def handle(self, message: Any) -> Any:
        # Every message ends with a plan, so what it changed (a replacement, a spare, a
        # drain) acts now, before an operator command's result goes back. A heartbeat plans
        # only when it cleared a suspect (it may take a place in a new world now).
        result: Any = None
        act = True
        if isinstance(message, FromWorker):
            if isinstance(message.message, Heartbeat):
                act = self._heartbeat(message.worker_id, message.message,
                                      message.received_s or self._clock())
            else:
                self._from_worker(message.worker_id, message.message)
        elif isinstance(message, WorkerLost):
            self._worker_died(message.worker_id, message.reason, kill=message.kill)
        elif isinstance(message, WorldIdle):
            self._release_world(message.world_id)
        elif isinstance(message, WorldUnreachable | WorldStalled):
            world = self.worlds.get(message.world_id)
            if world is not None and world.state in (WorldState.SERVING, WorldState.DRAINING):
                if isinstance(message, WorldStalled):
                    self._count_stall(world)
                self._break_world(world, message.reason if isinstance(message, WorldStalled)
                                  else "its stage-0 worker's data socket is unreachable")
        elif isinstance(message, Scale):
            result = self._scale(message)
        elif isinstance(message, SetSlo):
            result = self._set_slo(message)
        elif isinstance(message, DrainTarget):
            result = self._drain_target(message.target)
        elif isinstance(message, FormWorld):
            result = self._form_on(message)
        elif not isinstance(message, Tick):
            log.warning("dropped an unknown mailbox message %r", type(message).__name__)
        if act:
            await self._act()
        return result

    # -- plan and apply -------------------------------------------------------------------

    def view(self) -> View:
        """An immutable snapshot of the fleet, for the planner."""
        c = self.config.controller
        now = self._clock()
        room = self.launcher.room()
        if room > 0:
            self._full_reported = False
        return View(
            now_s=now,
            deployments=tuple(
                DeploymentView(name, d.config.stages, d.desired, bool(d.quarantined),
                               d.retry_at_s) for name, d in self.deployments.items()),
            workers={w.id: WorkerView(
                w.id, w.state, w.since_s, frozenset(w.worlds), suspect=w.suspect,
                quarantined=bool(w.quarantined), spawned_by_us=w.spawned_by_us,
                valued=w.joined_once or w.preloaded, preloaded=w.preloaded,
                util=w.load.util, cost_ms=w.load.cost_ms)
                for w in self.workers.values()},
            worlds=tuple(WorldView(w.id, w.deployment, w.state, tuple(w.workers), w.created_s,
                                   unanswered=tuple(m for m in w.workers if m not in w.joined),
                                   joins_sent_s=w.joins_sent_s)
                         for w in self.worlds.values()),
            warm_workers=c.warm_workers, preload_warm=c.preload_warm,
            form_timeout_s=c.world_form_timeout_ms / 1000.0,
            can_spawn=(self.launcher.can_spawn and not self.spawn_quarantined
                       and now >= self._spawn_retry_at_s),
            room=room)

    async def _act(self) -> None:
        if self.stopping:
            return
        # A break frees its workers: plan once more so their replacement forms now, not on
        # the next message (a few passes at most; a plan without breaks settles it).
        for _ in range(3):
            actions = plan(self.view())
            for action in actions:
                await self._apply(action)
            if not any(isinstance(a, Break) for a in actions):
                break
        down = {}
        for name, dep in self.deployments.items():
            reason = self.unavailable_reason(dep)
            self.routers[name].set_unavailable(reason)
            if reason:
                down[name] = reason
        if not self._settled.is_set() and all(
                name in down or self.serving(name) >= dep.desired
                for name, dep in self.deployments.items()):
            self._down = down
            self._settled.set()

    async def settled(self) -> dict[str, str]:
        """Return once every deployment serves its desired worlds or cannot; for the latter,
        why."""
        await self._settled.wait()
        return dict(self._down)

    def serving(self, deployment: str) -> int:
        return sum(1 for w in self.worlds.values()
                   if w.deployment == deployment and w.state == WorldState.SERVING)

    def live_workers(self) -> list[str]:
        """Workers that registered and are not dead (the ones to ping)."""
        return [w.id for w in self.workers.values()
                if w.state not in (WorkerState.DEAD, WorkerState.STARTING)]

    async def _apply(self, action: Action) -> None:
        if isinstance(action, Form):
            if action.why:
                log.info("%s %s", action.deployment, action.why)
            self._form_world(self.deployments[action.deployment],
                             [self.workers[w] for w in action.workers])
        elif isinstance(action, ResendJoin):
            world = self.worlds.get(action.world_id)
            if world is not None:
                self._resend_joins(world, action.workers)
        elif isinstance(action, Drain):
            world = self.worlds.get(action.world_id)
            if world is not None:
                self._drain_world(world, action.reason)
        elif isinstance(action, Break):
            world = self.worlds.get(action.world_id)
            if world is not None:
                self._break_world(world, action.reason)
        elif isinstance(action, Spawn):
            for _ in range(action.count):
                await self._spawn_worker()
        elif isinstance(action, LauncherFull):
            if not self._full_reported:
                self._full_reported = True
                log.warning("%d more workers wanted, but the launcher is full; raise "
                            "controller.max_local_workers or add remote workers", action.wanted)
                self.events.add("launcher_full", wanted=action.wanted)
        elif isinstance(action, Retire):
            self._retire_worker(self.workers[action.worker_id])
        elif isinstance(action, Preload):
            self._preload(self.workers[action.worker_id])
        elif isinstance(action, Forget):
            self.workers.pop(action.worker_id, None)

    def unavailable_reason(self, dep: DeploymentState) -> str:
        """Why no world of ``dep`` can form now ("" when one can, or one serves)."""
        if dep.quarantined:
            return f"quarantined after {dep.quarantined}"
        if self.spawn_quarantined and not any(
                w.deployment == dep.config.name and w.state in LIVE_WORLD
                for w in self.worlds.values()):
            return f"no worker can be started: {self.spawn_quarantined}"
        return ""

    # -- worlds ---------------------------------------------------------------------------

    def _form_world(self, dep: DeploymentState, workers: list[WorkerInfo]) -> WorldInfo:
        backend, why = world_backend([Placement(w.host, w.device, w.device_uuid)
                                      for w in workers])
        world = WorldInfo(id=next(self._world_ids), deployment=dep.config.name, epoch=1,
                          workers=[w.id for w in workers], created_s=self._clock(),
                          backend=backend, token=secrets.token_hex(8))
        self.worlds[world.id] = world
        spec = dep.config
        for rank, worker in enumerate(workers):
            worker.worlds.add(world.id)
            worker.state = WorkerState.SERVING
            join = Join(
                world_id=world.id, epoch=world.epoch, rank=rank, size=len(workers),
                deployment=spec, rendezvous=workers[0].store_addr,
                world_timeout_ms=dep.config.world_timeout_ms,
                form_timeout_ms=self.config.controller.world_form_timeout_ms,
                peers=list(world.workers), backend="" if backend == "local" else backend,
                token=world.token)
            world.joins[worker.id] = join
            self._send(worker.id, join)
        world.joins_sent_s = world.created_s
        log.info("forming world %d/%d of %s on %s (%s: %s)", world.id, world.epoch,
                 dep.config.name, world.workers, backend, why)
        return world

    def _resend_joins(self, world: WorldInfo, workers: tuple[str, ...]) -> None:
        """Send the same joins again: a worker answers each world and epoch once, so a repeat
        that reaches it while it forms the world, or after it joined, changes nothing."""
        now = self._clock()
        # Only the first at INFO: a member that loads a large model answers late, and gets
        # the join once a second meanwhile.
        log.log(logging.INFO if world.join_resends == 0 else logging.DEBUG,
                "world %d/%d: join sent again to %s, unanswered for %.1fs (lost on the way, "
                "or still loading)", world.id, world.epoch, list(workers),
                now - world.joins_sent_s)
        world.joins_sent_s = now
        world.join_resends += 1
        for wid in workers:
            join = world.joins.get(wid)
            if join is not None:
                self._send(wid, join)

    def _world_serving(self, world: WorldInfo) -> None:
        world.state = WorldState.SERVING
        world.ready_s = self._clock()
        self.events.add("world_serving", world=world.id, epoch=world.epoch,
                        deployment=world.deployment, workers=list(world.workers),
                        formed_ms=round((world.ready_s - world.created_s) * 1000, 1),
                        load_ms=round(world.load_ms, 1), form_ms=round(world.form_ms, 1))
        dep = self.deployments[world.deployment]
        dep.failures = 0
        dep.last_error = ""
        self.routers[world.deployment].add_world(world.id, world.epoch, world.entry.encode(),
                                                 world.member_sockets(),
                                                 packed=world.packed_dispatches,
                                                 generative=bool(dep.description.get(
                                                     "generative", False)))
        log.info("world %d/%d of %s serving (formed in %.0f ms)", world.id, world.epoch,
                 world.deployment, (world.ready_s - world.created_s) * 1000)

    def _drain_world(self, world: WorldInfo, reason: str) -> None:
        if world.state == WorldState.FORMING:
            self._release_world(world.id)
            return
        if world.state != WorldState.SERVING:
            return
        world.state = WorldState.DRAINING
        world.reason = reason
        log.info("draining world %d/%d of %s: %s", world.id, world.epoch, world.deployment,
                 reason)
        self.routers[world.deployment].drain_world(world.id)  # WorldIdle once it is idle

    def _release_world(self, world_id: int) -> None:
        world = self.worlds.pop(world_id, None)
        if world is None:
            return
        self.routers[world.deployment].remove_world(world_id, "released")
        self._leave(world, abort=False)
        log.info("released world %d/%d of %s", world.id, world.epoch, world.deployment)

    def _break_world(self, world: WorldInfo, reason: str) -> None:
        if self.worlds.pop(world.id, None) is None:
            return
        world.state = WorldState.BROKEN
        self.worlds_broken += 1
        resent = self.routers[world.deployment].remove_world(world.id, reason)
        self.events.add("world_broken", world=world.id, epoch=world.epoch,
                        deployment=world.deployment, reason=reason, resent=resent)
        (log.info if self.stopping else log.warning)(
            "world %d/%d of %s broken: %s (%d requests re-sent)", world.id, world.epoch,
            world.deployment, reason, resent)
        self._leave(world, abort=True)

    def _leave(self, world: WorldInfo, *, abort: bool) -> None:
        for wid in world.workers:
            worker = self.workers.get(wid)
            if worker is None or worker.state == WorkerState.DEAD:
                continue
            self._send(wid, Leave(world_id=world.id, epoch=world.epoch, abort=abort))
            worker.worlds.discard(world.id)
            self._settle_worker(worker)

    # -- workers --------------------------------------------------------------------------

    def _settle_worker(self, worker: WorkerInfo) -> None:
        if worker.worlds or worker.state == WorkerState.DEAD:
            return
        if worker.state == WorkerState.DRAINING:
            if not worker.retiring:
                self._retire_worker(worker)
            return
        worker.state = WorkerState.IDLE
        worker.since_s = self._clock()

    def _retire_worker(self, worker: WorkerInfo) -> None:
        worker.state = WorkerState.DRAINING
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
        while worker_id in self.workers:  # one that joined by itself under this name
            worker_id = f"w{next(self._worker_ids)}"
        info = WorkerInfo(worker_id, since_s=self._clock(), spawned_by_us=True)
        self.workers[worker_id] = info
        try:
            info.pid = await self.launcher.spawn(worker_id)
        except (LaunchError, OSError) as exc:
            log.error("cannot start a worker: %s", exc)
            info.state = WorkerState.DEAD
            info.reason = f"launch failed: {exc}"

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
                self._send(worker.id, PreloadMsg(deployment=dep.config, rank=rank,
                                                 size=dep.config.stages))

    async def shutdown_workers(self, timeout_s: float) -> None:
        """Tell every worker to stop, then end the ones we started by PID."""
        self.stopping = True
        for worker in self.workers.values():
            if worker.state != WorkerState.DEAD:
                self._on_forget(worker.id)
                self._send(worker.id, Shutdown(reason="controller stopping"))
        await self.launcher.aclose(timeout_s)
