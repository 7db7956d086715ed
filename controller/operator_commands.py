"""The WorldManager's answers to operators and the autoscaler: scale, latency target, form,
drain (a part of the WorldManager actor, in a module of its own; only the actor calls it, from
its mailbox). Each validates its arguments against the fleet and raises ``BadRequest`` (a
typed error for that caller alone) or changes the fleet and returns the result."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from controller.commands import FormWorld, Scale, SetSlo
from controller.fleet import (
    LIVE_WORLD,
    DeploymentState,
    EventLog,
    WorkerInfo,
    WorkerState,
    WorldInfo,
)
from mesh.errors import BadRequest, UnknownModel, excerpt
from mesh.logs import speaker

if TYPE_CHECKING:
    from controller.config import Config

log = speaker(logging.getLogger(__name__), "controller")


class OperatorCommands:
    # The WorldManager's state and helpers this part uses (see controller/world_manager.py).
    config: Config
    workers: dict[str, WorkerInfo]
    worlds: dict[int, WorldInfo]
    deployments: dict[str, DeploymentState]
    events: EventLog
    spawn_quarantined: str
    _spawn_failures: int

    def _form_world(self, dep: DeploymentState, workers: list[WorkerInfo]) -> WorldInfo:
        raise NotImplementedError  # the WorldManager's

    def _drain_world(self, world: WorldInfo, reason: str) -> None:
        raise NotImplementedError  # the WorldManager's

    def _retire_worker(self, worker: WorkerInfo) -> None:
        raise NotImplementedError  # the WorldManager's

    def _deployment(self, name: str) -> DeploymentState:
        dep = self.deployments.get(name)
        if dep is None:
            # The same answer as a request for it gets (the frontend's), with the names.
            raise UnknownModel(f"no deployment named {excerpt(name)}; serving "
                               f"{sorted(self.deployments)[:20]}")
        return dep

    def _scale(self, cmd: Scale) -> dict[str, Any]:
        dep = self._deployment(cmd.deployment)
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
            self.events.add("scaled", deployment=dep.config.name, to=dep.desired,
                            by="operator" if cmd.by_operator else "autoscaler",
                            reason=cmd.reason or "meshctl scale")
        if not cmd.by_operator:
            return {"deployment": dep.config.name, "worlds_desired": dep.desired}
        if dep.quarantined or self.spawn_quarantined:
            log.info("%s: quarantine lifted by operator", dep.config.name)
            dep.quarantined = ""
            dep.failures = 0
            dep.retry_at_s = 0.0
            self.spawn_quarantined = ""
            self._spawn_failures = 0
        log.info("%s scaled: desired %d worlds, bounds [%d, %d]", dep.config.name, dep.desired,
                 lo, hi)
        return {"deployment": dep.config.name, "worlds_desired": dep.desired,
                "min_worlds": lo, "max_worlds": hi}

    def _set_slo(self, cmd: SetSlo) -> dict[str, Any]:
        dep = self._deployment(cmd.deployment)
        if not 0 < cmd.p99_ms <= 3.6e6:
            raise BadRequest(f"p99_ms must be a positive number of milliseconds up to 3600000, "
                             f"got {cmd.p99_ms!r}")
        dep.slo_p99_ms = float(cmd.p99_ms)
        log.info("%s latency target set to p99 %.1f ms", dep.config.name, dep.slo_p99_ms)
        return {"deployment": dep.config.name, "slo_p99_ms": dep.slo_p99_ms}

    def _form_on(self, cmd: FormWorld) -> dict[str, Any]:
        dep = self._deployment(cmd.deployment)
        if len(cmd.workers) != dep.config.stages:
            raise BadRequest(f"{cmd.deployment} has {dep.config.stages} stages; "
                             f"got {len(cmd.workers)} workers")
        if len(set(cmd.workers)) != len(cmd.workers):
            raise BadRequest("a worker can hold only one rank of a world")
        workers = []
        for wid in cmd.workers:
            worker = self.workers.get(wid)
            if worker is None or worker.state not in (WorkerState.IDLE, WorkerState.SERVING):
                raise BadRequest(f"worker {wid!r} is not a live, idle or serving worker")
            workers.append(worker)
        same = next((w for w in self.worlds.values() if w.deployment == cmd.deployment
                     and w.state in LIVE_WORLD and w.workers == list(cmd.workers)), None)
        if same is not None:
            # Two identical worlds would only share every process: no capacity added.
            raise BadRequest(f"world {same.id} of {cmd.deployment} already runs on "
                             f"{list(cmd.workers)} ({same.state})")
        live = sum(1 for w in self.worlds.values()
                   if w.deployment == cmd.deployment and w.state in LIVE_WORLD)
        if live + 1 > dep.max_worlds:
            raise BadRequest(f"{cmd.deployment} already has {live} worlds; max_worlds is "
                             f"{dep.max_worlds}")
        dep.desired = max(dep.desired, live + 1)
        world = self._form_world(dep, workers)
        return {"world": world.id, "epoch": world.epoch, "workers": list(world.workers)}

    def _drain_target(self, target: str) -> dict[str, Any]:
        worker = self.workers.get(target)
        if worker is not None and worker.state != WorkerState.DEAD:
            for world_id in sorted(worker.worlds):
                world = self.worlds.get(world_id)
                if world is not None:
                    self._drain_world(world, f"worker {target} drained by operator")
            if not worker.worlds:
                self._retire_worker(worker)
            else:
                worker.state = WorkerState.DRAINING
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
