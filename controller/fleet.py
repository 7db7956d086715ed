"""The Fleet: the one owner of the workers, worlds and deployments' live settings, as a
synchronous core with no sockets, tasks or processes.

``handle(message)`` takes one event or command (controller/mailbox.py; an operator's admin
arguments, mesh/messages.py), changes the records (controller/records.py), asks the planner
what to do next (``plan(view)``, controller/planner.py, a pure function), carries that out on
the records, and returns what the rest of the controller must do as data (controller/
effects.py): messages to workers, routes added or removed, workers to start or stop. The
WorldManager (controller/world_manager.py) feeds it and applies its effects; tests read them
(tests/test_fleet.py). What it does with workers (their reports and their lifecycle) is
controller/fleet_workers.py, its answers to operators and the autoscaler controller/
fleet_commands.py: plain functions of the Fleet, called from it only.

A world is a list of workers in rank order (rank = pipeline stage); it serves once every rank
has joined. World ids are never reused; a world re-formed after a failure is a new world.
Worker ids (``w1``, ``w2``, ...) are never reused within a run, and a restarted controller
first takes back the workers its launcher still runs (``Adopted``), then numbers new ones
above theirs.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controller import fleet_apply, fleet_commands, fleet_workers
from controller.config import Config
from controller.effects import (
    DrainRoute,
    Effect,
    RouteWorld,
    SendTo,
    Settled,
    SetUnavailable,
    Step,
    UnrouteWorld,
)
from controller.mailbox import (
    Adopted,
    FromWorker,
    Started,
    StartFailed,
    Stopping,
    Tick,
    Unrouted,
    WorkerLost,
    WorldIdle,
    WorldStalled,
    WorldUnreachable,
)
from controller.placement import Placement, world_backend
from controller.planner import (
    Action,
    Break,
    Drain,
    Forget,
    Form,
    LauncherFull,
    Preload,
    ResendJoin,
    Retire,
    Spawn,
    plan,
)
from controller.records import (
    LIVE_WORLD,
    DeploymentState,
    EventLog,
    WorkerInfo,
    WorkerState,
    WorldInfo,
    WorldState,
)
from controller.view import View, snapshot
from mesh.logs import speaker
from mesh.messages import Heartbeat, Join, Leave, Message, Ping

log = speaker(logging.getLogger(__name__), "controller")


@dataclass(frozen=True, slots=True)
class LauncherRoom:
    """What the launcher can do now, as the Fleet needs to know it for one event."""

    can_spawn: bool = False  # it starts workers at all
    room: int = 0  # workers it may start now


NO_LAUNCHER = LauncherRoom()
PING = Ping()


class Fleet:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 resumed: dict[str, dict[str, Any]] | None = None) -> None:
        """``resumed``: each deployment's live settings as a run before kept them."""
        self.config = config
        self.clock = clock
        self.workers: dict[str, WorkerInfo] = {}
        self.worlds: dict[int, WorldInfo] = {}
        self.deployments: dict[str, DeploymentState] = {
            d.name: fleet_apply.resumed(d, (resumed or {}).get(d.name))
            for d in config.deployments}
        self.events = EventLog(wall_clock)
        self.world_ids = itertools.count(1)
        self.worker_ids = itertools.count(1)
        # Workers that die before registering (a broken environment, an import error) make
        # the launcher back off, and stop after max_load_failures in a row.
        self.spawn_failures = 0
        self.spawn_retry_at_s = 0.0
        self.spawn_quarantined = ""
        # (worker id, pid) of processes declared dead: the same process must never come back,
        # but a new process may reuse the id (a remote worker restarted by its operator).
        self.fenced: set[tuple[str, int]] = set()
        # Unknown workers asked to register (a previous controller's fleet), and when.
        self.asked: dict[str, float] = {}
        self.foreign_messages = 0  # about worlds their sender is not a member of (dropped)
        self.workers_died = 0  # since the start: worker churn, for metrics
        self.worlds_broken = 0
        self.stopping = False
        self.welcome = fleet_workers.welcome(config.controller)
        self._out: list[Effect] = []
        self._launcher = NO_LAUNCHER
        self._full_reported = False
        self._unavailable: dict[str, str] = {name: "" for name in self.deployments}
        self.settled: dict[str, str] | None = None  # set once: the ready line
        self.routes = config.routes
        self._broken_events: dict[int, dict[str, Any]] = {}  # awaiting their re-send count

    # -- the one entry ----------------------------------------------------------------------

    def handle(self, message: Any, launcher: LauncherRoom = NO_LAUNCHER) -> Step:
        """Apply one message; plan; return the result and what to do. A command that is
        refused raises its typed error (mesh.errors) before changing anything."""
        self._out = []
        self._launcher = launcher
        if launcher.room > 0:
            self._full_reported = False
        # Every message ends with a plan, so what it changed (a replacement, a spare, a
        # drain) acts now, before an operator command's result goes back. A heartbeat plans
        # only when it cleared a suspect (it may take a place in a new world now).
        act = True
        result: Any = None
        match message:
            case FromWorker(worker_id, Heartbeat() as hb, received_s):
                act = fleet_workers.heartbeat(self, worker_id, hb, received_s or self.clock())
            case FromWorker(worker_id, report):
                fleet_workers.from_worker(self, worker_id, report)
            case WorkerLost(worker_id, reason, kill):
                fleet_workers.worker_died(self, worker_id, reason, kill=kill)
            case WorldIdle(world_id):
                self.release_world(world_id)
            case WorldUnreachable(world_id):
                self._break_live(world_id, "its stage-0 worker's data socket is unreachable")
            case WorldStalled(world_id, reason):
                self._break_live(world_id, reason, stalled=True)
            case Started(worker_id, pid):
                worker = self.workers.get(worker_id)
                if worker is not None and worker.pid == 0:
                    worker.pid = pid
                act = False
            case StartFailed(worker_id, error):
                fleet_workers.start_failed(self, worker_id, error)
            case Unrouted(world_id, resent):
                self._unrouted(world_id, resent)
                act = False
            case Adopted(worker_ids):
                fleet_workers.adopt(self, worker_ids)
            case Stopping():
                fleet_workers.stop_all(self)
            case Tick():
                # Liveness for the workers: each exits when these stop (controller_timeout_ms).
                for worker_id in self.live_workers():
                    self.send(worker_id, PING)
            case _:
                result = fleet_commands.run(self, message)
        if act:
            self._act()
        return Step(result, self._out)

    def took_room(self) -> None:
        """One worker was asked of the launcher: one place less for this event's plan."""
        self._launcher = LauncherRoom(self._launcher.can_spawn, self._launcher.room - 1)

    def emit(self, effect: Effect) -> None:
        self._out.append(effect)

    def send(self, worker_id: str, message: Message) -> None:
        self._out.append(SendTo(worker_id, message))

    # -- plan and apply ---------------------------------------------------------------------

    def view(self) -> View:
        """An immutable snapshot of the fleet, for the planner."""
        now = self.clock()
        can_spawn = (self._launcher.can_spawn and not self.spawn_quarantined
                     and now >= self.spawn_retry_at_s)
        return snapshot(self.config.controller, now, self.deployments,
                        self.workers.values(), self.worlds.values(), can_spawn=can_spawn,
                        room=self._launcher.room)

    def _act(self) -> None:
        if self.stopping:
            return
        # A break frees its workers: plan once more so their replacement forms now, not on
        # the next message (a few passes at most; a plan without breaks settles it).
        for _ in range(3):
            actions = plan(self.view())
            for action in actions:
                self._apply(action)
            if not any(isinstance(a, Break) for a in actions):
                break
        fleet_apply.progress(self)
        down = {}
        for name, dep in self.deployments.items():
            reason = self.unavailable_reason(dep)
            if reason != self._unavailable.get(name, ""):
                self._unavailable[name] = reason
                self.emit(SetUnavailable(name, reason))
            if reason:
                down[name] = reason
        if self.settled is None and all(name in down or self.serving(name) >= dep.desired
                                        for name, dep in self.deployments.items()):
            self.settled = down
            self.emit(Settled(dict(down)))

    def _apply(self, action: Action) -> None:
        match action:
            case Form(deployment, workers, why):
                if why:
                    log.info("%s %s", deployment, why)
                self.form_world(self.deployments[deployment], [self.workers[w] for w in workers])
            case ResendJoin(world_id, workers):
                if world_id in self.worlds:
                    self._resend_joins(self.worlds[world_id], workers)
            case Drain(world_id, reason):
                if world_id in self.worlds:
                    self.drain_world(self.worlds[world_id], reason)
            case Break(world_id, reason):
                if world_id in self.worlds:
                    self.break_world(self.worlds[world_id], reason)
            case Spawn(count):
                for _ in range(min(count, self._launcher.room)):
                    fleet_workers.start_worker(self)
            case LauncherFull(wanted):
                if not self._full_reported:
                    self._full_reported = True
                    log.warning("%d more workers wanted, but the launcher is full; raise "
                                "controller.max_local_workers or add remote workers", wanted)
                    self.events.add("launcher_full", wanted=wanted)
            case Retire(worker_id):
                fleet_workers.retire_worker(self, self.workers[worker_id])
            case Preload(worker_id):
                fleet_workers.preload(self, self.workers[worker_id])
            case Forget(worker_id):
                self.workers.pop(worker_id, None)

    def unavailable_reason(self, dep: DeploymentState) -> str:
        """Why no world of ``dep`` can form now ("" when one can, or one serves)."""
        if dep.quarantined:
            return f"quarantined after {dep.quarantined}"
        if self.spawn_quarantined and not any(
                w.deployment == dep.config.name and w.state in LIVE_WORLD
                for w in self.worlds.values()):
            return f"no worker can be started: {self.spawn_quarantined}"
        return ""

    def serving(self, deployment: str) -> int:
        return sum(1 for w in self.worlds.values()
                   if w.deployment == deployment and w.state == WorldState.SERVING)

    def live_workers(self) -> list[str]:
        """Workers that registered and are not dead (the ones to ping)."""
        return [w.id for w in self.workers.values()
                if w.state not in (WorkerState.DEAD, WorkerState.STARTING)]

    # -- worlds -----------------------------------------------------------------------------

    def form_world(self, dep: DeploymentState, workers: list[WorkerInfo]) -> WorldInfo:
        backend, why = world_backend([Placement(w.host, w.device, w.device_uuid)
                                      for w in workers])
        now = self.clock()
        world = WorldInfo(id=next(self.world_ids), deployment=dep.config.name, epoch=1,
                          workers=[w.id for w in workers], created_s=now,
                          backend=backend, token=secrets.token_hex(8), joins_sent_s=now,
                          revision=dep.revision)
        self.worlds[world.id] = world
        for rank, worker in enumerate(workers):
            worker.worlds.add(world.id)
            worker.state = WorkerState.SERVING
            join = Join(
                world_id=world.id, epoch=world.epoch, rank=rank, size=len(workers),
                deployment=dep.config, rendezvous=workers[0].store_addr,
                world_timeout_ms=dep.config.world_timeout_ms,
                form_timeout_ms=self.config.controller.world_form_timeout_ms,
                peers=list(world.workers), backend="" if backend == "local" else backend,
                token=world.token)
            world.joins[worker.id] = join
            self.send(worker.id, join)
        log.info("forming world %d/%d of %s on %s (%s: %s)", world.id, world.epoch,
                 dep.config.name, world.workers, backend, why)
        return world

    def _resend_joins(self, world: WorldInfo, workers: tuple[str, ...]) -> None:
        """Send the same joins again: a worker answers each world and epoch once, so a repeat
        that reaches it while it forms the world, or after it joined, changes nothing."""
        now = self.clock()
        # Only the first at INFO: a member that loads a large model answers late, and gets
        # the join once a second meanwhile.
        log.log(logging.INFO if world.join_resends == 0 else logging.DEBUG,
                "world %d/%d: join sent again to %s, unanswered for %.1fs (lost on the way, "
                "or still loading)", world.id, world.epoch, list(workers),
                now - world.joins_sent_s)
        world.joins_sent_s = now
        world.join_resends += 1
        for wid in workers:
            if wid in world.joins:
                self.send(wid, world.joins[wid])

    def world_serving(self, world: WorldInfo) -> None:
        world.state = WorldState.SERVING
        world.ready_s = self.clock()
        self.events.add("world_serving", world=world.id, epoch=world.epoch,
                        deployment=world.deployment, workers=list(world.workers),
                        formed_ms=round((world.ready_s - world.created_s) * 1000, 1),
                        load_ms=round(world.load_ms, 1), form_ms=round(world.form_ms, 1))
        dep = self.deployments[world.deployment]
        dep.failures = 0
        dep.last_error = ""
        self.emit(RouteWorld(world.deployment, world.id, world.epoch, world.entry.encode(),
                             world.member_sockets(), world.packed_dispatches,
                             bool(dep.description.get("generative", False))))
        log.info("world %d/%d of %s serving (formed in %.0f ms)", world.id, world.epoch,
                 world.deployment, (world.ready_s - world.created_s) * 1000)

    def drain_world(self, world: WorldInfo, reason: str) -> None:
        if world.state == WorldState.FORMING:
            self.release_world(world.id)
            return
        if world.state != WorldState.SERVING:
            return
        world.state = WorldState.DRAINING
        world.reason = reason
        log.info("draining world %d/%d of %s: %s", world.id, world.epoch, world.deployment,
                 reason)
        self.emit(DrainRoute(world.deployment, world.id))  # WorldIdle once it is idle

    def release_world(self, world_id: int) -> None:
        world = self.worlds.pop(world_id, None)
        if world is None:
            return
        self.emit(UnrouteWorld(world.deployment, world_id, "released"))
        self._leave(world, abort=False)
        log.info("released world %d/%d of %s", world.id, world.epoch, world.deployment)

    def _break_live(self, world_id: int, reason: str, *, stalled: bool = False) -> None:
        world = self.worlds.get(world_id)
        if world is not None and world.state in (WorldState.SERVING, WorldState.DRAINING):
            if stalled:
                fleet_workers.count_stall(self, world)
            self.break_world(world, reason)

    def break_world(self, world: WorldInfo, reason: str) -> None:
        if self.worlds.pop(world.id, None) is None:
            return
        world.state = WorldState.BROKEN
        self.worlds_broken += 1
        self.events.add("world_broken", world=world.id, epoch=world.epoch,
                        deployment=world.deployment, reason=reason, resent=0)
        self._broken_events[world.id] = self.events.last()
        self.emit(UnrouteWorld(world.deployment, world.id, reason))  # answered by Unrouted
        self._leave(world, abort=True)

    def _unrouted(self, world_id: int, resent: int) -> None:
        """A broken world's requests went elsewhere: say how many, in its event and the log."""
        event = self._broken_events.pop(world_id, None)
        if event is None:
            return
        event["resent"] = resent
        (log.info if self.stopping else log.warning)(
            "world %d/%d of %s broken: %s (%d requests re-sent)", world_id, event["epoch"],
            event["deployment"], event["reason"], resent)

    def _leave(self, world: WorldInfo, *, abort: bool) -> None:
        for wid in world.workers:
            worker = self.workers.get(wid)
            if worker is None or worker.state == WorkerState.DEAD:
                continue
            self.send(wid, Leave(world_id=world.id, epoch=world.epoch, abort=abort))
            worker.worlds.discard(world.id)
            fleet_workers.settle_worker(self, worker)
