"""The Fleet's answers to operators and the autoscaler: scale, latency target, form, drain,
fault. An operator command arrives as its admin arguments (mesh/messages.py ``ADMIN_ARGS``),
already decoded and range-checked by the Admin socket; ``run`` has the one ``match`` that
dispatches them. Each validates its arguments against the fleet and raises ``BadRequest`` (a
typed error for that caller alone) before changing anything, or changes the fleet and returns
the result ``meshctl`` prints.

Adding an admin command (docs/architecture.md walks through one): its arguments in
mesh/messages.py, a ``case`` and a function here (or in controller/admin.py when it is about
the controller process rather than the fleet), and its verb in mesh/cli/admin.py.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from controller import fleet_apply, fleet_workers
from controller.mailbox import AutoScale
from controller.records import LIVE_WORLD, DeploymentState, WorkerState
from mesh.errors import BadRequest, UnknownModel, excerpt
from mesh.logs import speaker
from mesh.messages import (
    ApplyArgs,
    DrainArgs,
    Fault,
    FaultArgs,
    FormArgs,
    ScaleArgs,
    SloArgs,
    UnquarantineArgs,
)

if TYPE_CHECKING:
    from controller.fleet import Fleet

log = speaker(logging.getLogger(__name__), "controller")


def run(fleet: Fleet, command: Any) -> Any:
    match command:
        case ScaleArgs(deployment, worlds, min_worlds, max_worlds):
            return scale(fleet, deployment, worlds, min_worlds, max_worlds)
        case AutoScale(deployment, worlds, reason):
            return scale(fleet, deployment, worlds, None, None, by="autoscaler", reason=reason)
        case SloArgs(deployment, p99_ms):
            return set_slo(fleet, deployment, p99_ms)
        case FormArgs(deployment, workers):
            return form(fleet, deployment, tuple(workers))
        case DrainArgs(target):
            return drain(fleet, target)
        case FaultArgs():
            return fault(fleet, command)
        case UnquarantineArgs(worker):
            return unquarantine(fleet, worker)
        case ApplyArgs():
            return fleet_apply.apply(fleet, command)
    raise BadRequest(f"the fleet has no command {type(command).__name__}")


def deployment(fleet: Fleet, name: str) -> DeploymentState:
    dep = fleet.deployments.get(name)
    if dep is None or dep.removing:
        # The same answer as a request for it gets (the frontend's), with the names.
        raise UnknownModel(f"no deployment named {excerpt(name)}; serving "
                           f"{sorted(fleet.deployments)[:20]}")
    return dep


def scale(fleet: Fleet, name: str, worlds: int | None, min_worlds: int | None,
          max_worlds: int | None, *, by: str = "operator",
          reason: str = "meshctl scale") -> dict[str, Any]:
    dep = deployment(fleet, name)
    lo = dep.min_worlds if min_worlds is None else min_worlds
    hi = dep.max_worlds if max_worlds is None else max_worlds
    if lo < 0 or hi < 1 or lo > hi:
        raise BadRequest(
            f"bounds min={lo} max={hi} are invalid (need 0 <= min <= max, max >= 1)")
    desired = dep.desired if worlds is None else worlds
    if worlds is not None and not lo <= worlds <= hi:
        raise BadRequest(f"--worlds {worlds} lies outside [{lo}, {hi}]; "
                         "change --min/--max first")
    dep.min_worlds, dep.max_worlds = lo, hi
    before = dep.desired
    dep.desired = max(lo, min(hi, desired))
    if before != dep.desired:
        fleet.events.add("scaled", deployment=dep.config.name, to=dep.desired, by=by,
                         reason=reason)
    if by != "operator":
        return {"deployment": dep.config.name, "worlds_desired": dep.desired}
    if dep.quarantined or fleet.spawn_quarantined:
        log.info("%s: quarantine lifted by operator", dep.config.name)
        dep.quarantined = ""
        dep.failures = 0
        dep.retry_at_s = 0.0
        fleet.spawn_quarantined = ""
        fleet.spawn_failures = 0
    log.info("%s scaled: desired %d worlds, bounds [%d, %d]", dep.config.name, dep.desired,
             lo, hi)
    fleet_apply.save(fleet)
    return {"deployment": dep.config.name, "worlds_desired": dep.desired,
            "min_worlds": lo, "max_worlds": hi}


def set_slo(fleet: Fleet, name: str, p99_ms: float) -> dict[str, Any]:
    dep = deployment(fleet, name)
    dep.slo_p99_ms = float(p99_ms)  # its range is SloArgs's
    log.info("%s latency target set to p99 %.1f ms", dep.config.name, dep.slo_p99_ms)
    fleet_apply.save(fleet)
    return {"deployment": dep.config.name, "slo_p99_ms": dep.slo_p99_ms}


def form(fleet: Fleet, name: str, worker_ids: tuple[str, ...]) -> dict[str, Any]:
    """Form a world of ``name`` on exactly these workers (rank order); they may already serve
    other worlds: a worker shared between worlds is the MultiWorld idea."""
    dep = deployment(fleet, name)
    if len(worker_ids) != dep.config.stages:
        raise BadRequest(f"{name} has {dep.config.stages} stages; got {len(worker_ids)} workers")
    if len(set(worker_ids)) != len(worker_ids):
        raise BadRequest("a worker can hold only one rank of a world")
    workers = []
    for wid in worker_ids:
        worker = fleet.workers.get(wid)
        if worker is None or worker.state not in (WorkerState.IDLE, WorkerState.SERVING):
            raise BadRequest(f"worker {wid!r} is not a live, idle or serving worker")
        workers.append(worker)
    live = [w for w in fleet.worlds.values() if w.deployment == name and w.state in LIVE_WORLD]
    same = next((w for w in live if w.workers == list(worker_ids)), None)
    if same is not None:
        # Two identical worlds would only share every process: no capacity added.
        raise BadRequest(f"world {same.id} of {name} already runs on {list(worker_ids)} "
                         f"({same.state})")
    if len(live) + 1 > dep.max_worlds:
        raise BadRequest(f"{name} already has {len(live)} worlds; max_worlds is "
                         f"{dep.max_worlds}")
    dep.desired = max(dep.desired, len(live) + 1)
    world = fleet.form_world(dep, workers)
    return {"world": world.id, "epoch": world.epoch, "workers": list(world.workers)}


def drain(fleet: Fleet, target: str) -> dict[str, Any]:
    """Drain a worker (its worlds re-form elsewhere, then it stops) or a world (its place is
    given back, down to min_worlds)."""
    worker = fleet.workers.get(target)
    if worker is not None and worker.state != WorkerState.DEAD:
        for world_id in sorted(worker.worlds):
            if world_id in fleet.worlds:
                fleet.drain_world(fleet.worlds[world_id], f"worker {target} drained by operator")
        if not worker.worlds:
            fleet_workers.retire_worker(fleet, worker)
        else:
            worker.state = WorkerState.DRAINING
        return {"drained": "worker", "id": target}
    if target.isdigit() and int(target) in fleet.worlds:
        world = fleet.worlds[int(target)]
        dep = fleet.deployments[world.deployment]
        # Draining a world gives its place back (down to min_worlds, where a replacement is
        # formed); draining a worker keeps the count and re-forms elsewhere.
        if dep.desired > dep.min_worlds:
            dep.desired -= 1
        fleet.drain_world(world, "drained by operator")
        return {"drained": "world", "id": world.id, "worlds_desired": dep.desired}
    raise BadRequest(f"no live worker or world named {target!r}")


def fault(fleet: Fleet, args: FaultArgs) -> dict[str, Any]:
    """Fault injection on a worker: slower computations, dropped joins (tests)."""
    worker = fleet.workers.get(args.worker)
    if worker is None or worker.state in (WorkerState.DEAD, WorkerState.STARTING):
        raise BadRequest(f"worker {excerpt(args.worker)} is not live")
    fleet.send(args.worker, Fault(delay_ms=args.delay_ms, drop_joins=args.drop_joins))
    log.warning("fault injected: worker %s computes %.0f ms slower%s", args.worker,
                args.delay_ms, f" and drops its next {args.drop_joins} join(s)"
                if args.drop_joins else "")
    return {"worker": args.worker, "delay_ms": args.delay_ms, "drop_joins": args.drop_joins}


def unquarantine(fleet: Fleet, worker_id: str) -> dict[str, Any]:
    """Give a quarantined worker worlds again (its operator fixed what made it stall or
    drop off): its record of stalls and deaths starts afresh."""
    worker = fleet.workers.get(worker_id)
    if worker is None or not worker.quarantined:
        raise BadRequest(f"worker {excerpt(worker_id)} is not quarantined")
    was = worker.quarantined
    worker.quarantined = ""
    worker.stalls.clear()
    worker.deaths.clear()
    if worker.state != WorkerState.DEAD:
        worker.reason = ""
    fleet.events.add("worker_unquarantined", worker=worker_id, was=was)
    log.info("worker %s: quarantine lifted by operator (was: %s)", worker_id, was)
    return {"worker": worker_id, "was": was}
