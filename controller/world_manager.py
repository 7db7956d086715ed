"""The WorldManager: the actor around the Fleet (controller/fleet.py), its shell.

It takes the Fleet's events and commands from its mailbox one at a time, hands each to the
Fleet, and applies what the Fleet answers (controller/effects.py): messages to workers, routes
added, drained or removed, workers started, stopped or killed, Health told whom to watch. The
decisions are the Fleet's; this only acts on them, and tells the Fleet what its acts gave (a
started worker's pid, the requests a removed world re-sent).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from controller import state
from controller.catalog import RouteConfig
from controller.effects import (
    AddDeployment,
    DrainRoute,
    Effect,
    ForgetWorker,
    HoldRoute,
    KillWorker,
    Reconfigure,
    RemoveDeployment,
    RetireDeployment,
    RouteWorld,
    SaveState,
    SendTo,
    SetRoutes,
    Settled,
    SetUnavailable,
    StartWorker,
    StopWorker,
    UnrouteWorld,
    WatchWorker,
)
from controller.fleet import Fleet, LauncherRoom
from controller.launcher import Launcher, LaunchError
from controller.mailbox import Adopted, Started, StartFailed, Stopping, Unrouted
from mesh.actor import Actor, Mailbox
from mesh.logs import speaker
from mesh.messages import Message
from mesh.spec import DeploymentSpec

log = speaker(logging.getLogger(__name__), "controller")

# How long a starting controller waits for its launcher to say which workers it already runs.
ADOPT_TIMEOUT_S = 30.0


class RouteTable(Protocol):
    """What the WorldManager does to the routers (controller/routers.py ``Routers``)."""

    def add_world(self, effect: RouteWorld) -> None: ...
    def drain_world(self, deployment: str, world_id: int) -> None: ...
    def hold_world(self, deployment: str, world_id: int) -> None: ...
    def remove_world(self, deployment: str, world_id: int, reason: str) -> int: ...
    def set_unavailable(self, deployment: str, reason: str) -> None: ...
    def add_deployment(self, spec: DeploymentSpec) -> None: ...
    def reconfigure(self, spec: DeploymentSpec) -> None: ...
    def retire(self, name: str) -> None: ...
    def remove(self, name: str) -> None: ...
    def set_routes(self, routes: Iterable[RouteConfig]) -> None: ...


class Watcher(Protocol):
    """What the WorldManager tells Health (controller/health.py)."""

    def watch(self, worker_id: str) -> None: ...
    def forget(self, worker_id: str) -> None: ...


class WorldManager(Actor):
    def __init__(self, fleet: Fleet, launcher: Launcher, routes: RouteTable, health: Watcher,
                 *, send_worker: Callable[[str, Message], bool],
                 mailbox: Mailbox | None = None) -> None:
        super().__init__("world-manager", mailbox)
        self.fleet = fleet
        self._launcher = launcher
        self._routes = routes
        self._health = health
        self._send = send_worker
        self._settled = asyncio.Event()
        self._down: dict[str, str] = {}

    async def on_start(self) -> None:
        """Before the first plan: the workers the launcher still runs from a previous run of
        this controller are ours again (controller/fleet.py ``Adopted``)."""
        adopted = await self._launcher.adopt(timeout_s=ADOPT_TIMEOUT_S)
        await self._step(Adopted(tuple(adopted)))

    async def handle(self, message: Any) -> Any:
        return await self._step(message)

    async def _step(self, message: Any) -> Any:
        room = LauncherRoom(self._launcher.can_spawn, self._launcher.room())
        step = self.fleet.handle(message, room)
        for effect in step.effects:
            await self._apply(effect)
        return step.result

    async def _apply(self, effect: Effect) -> None:
        match effect:
            case SendTo(worker_id, message):
                self._send(worker_id, message)
            case RouteWorld():
                self._routes.add_world(effect)
            case DrainRoute(deployment, world_id):
                self._routes.drain_world(deployment, world_id)
            case HoldRoute(deployment, world_id):
                self._routes.hold_world(deployment, world_id)
            case UnrouteWorld(deployment, world_id, reason):
                resent = self._routes.remove_world(deployment, world_id, reason)
                self.fleet.handle(Unrouted(world_id, resent))
            case SetUnavailable(deployment, reason):
                self._routes.set_unavailable(deployment, reason)
            case StartWorker(worker_id):
                await self._start(worker_id)
            case StopWorker(worker_id):
                self.spawn(self._launcher.stop(worker_id, timeout_s=10.0),
                           name=f"{self.name}.stop.{worker_id}")
            case KillWorker(worker_id):
                self._launcher.kill(worker_id)
            case WatchWorker(worker_id):
                self._health.watch(worker_id)
            case ForgetWorker(worker_id):
                self._health.forget(worker_id)
            case Settled(down):
                self._down = down
                self._settled.set()
            case AddDeployment(spec):
                self._routes.add_deployment(spec)
            case Reconfigure(spec):
                self._routes.reconfigure(spec)
            case RetireDeployment(name):
                self._routes.retire(name)
            case RemoveDeployment(name):
                self._routes.remove(name)
            case SetRoutes(routes):
                self._routes.set_routes(routes)
            case SaveState(kept):
                self._save(kept)

    def _save(self, kept: dict[str, Any]) -> None:
        try:
            state.save(self.fleet.config.controller.state_dir, kept)
        except OSError as exc:
            # Serving goes on; a restart would resume from the last state that was kept.
            log.error("cannot keep the state in %s: %s", self.fleet.config.controller.state_dir,
                      exc)

    async def _start(self, worker_id: str) -> None:
        try:
            pid = await self._launcher.spawn(worker_id)
        except (LaunchError, OSError) as exc:
            answer: Any = StartFailed(worker_id, str(exc))
        else:
            answer = Started(worker_id, pid)
        # What it gave is the Fleet's to record. A failure is planned on with no room to start
        # another at once (a launcher that keeps failing must not loop here): the next
        # message's plan tries again.
        for effect in self.fleet.handle(answer).effects:
            await self._apply(effect)

    async def settled(self) -> dict[str, str]:
        """Return once every deployment serves its desired worlds or cannot; for the latter,
        why."""
        await self._settled.wait()
        return dict(self._down)

    async def shutdown_workers(self, timeout_s: float) -> None:
        """Tell every worker to stop, then end the ones we started by PID."""
        for effect in self.fleet.handle(Stopping()).effects:
            await self._apply(effect)
        await self._launcher.aclose(timeout_s)
