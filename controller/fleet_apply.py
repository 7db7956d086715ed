"""Models that change while traffic flows: ``meshctl apply`` (and SIGHUP) makes a catalog of
deployments and routes (controller/catalog.py) the running set. Functions of the Fleet
(controller/fleet.py), called from it only.

``plan_apply`` compares what runs with what is asked, as a pure function: deployments to add,
to remove, to roll (a field the workers read changed: a new spec's worlds must form), to
update in place (only what the controller reads changed: bounds, targets, deadlines), and
the ones left alone. ``apply`` carries the plan out:

* an added deployment gets a router and its worlds form;
* a removed one stops taking requests at once (its name answers ``unknown_model``), its worlds
  drain and it goes when the last is released (``deployment_removed``);
* a rolled one takes the next revision: its worlds of the new spec form and serve, and the
  planner drains the old spec's as they do, never below the desired count of serving worlds
  (controller/planner.py); the rollout is done when no world of the old spec is left;
* a new spec that fails to load (a bad checkpoint, an import error) rolls back: the previous
  spec is current again, its worlds never stopped serving, and the deployment shows
  ``rollout_failed`` with the reason;
* an updated one takes its new settings in place (a revision, no new world);
* the scale bounds and latency target a file states win only where the file changed them:
  what an operator set at run time (``meshctl scale``, ``slo``) stays otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from controller.catalog import Catalog, RouteConfig, parse_catalog
from controller.effects import (
    AddDeployment,
    Reconfigure,
    RemoveDeployment,
    RetireDeployment,
    SaveState,
    SetRoutes,
)
from controller.records import DeploymentState, Rollout, WorldInfo, spec_hash
from mesh.errors import BadRequest, ConfigError
from mesh.logs import speaker
from mesh.messages import ApplyArgs
from mesh.spec import DeploymentSpec

if TYPE_CHECKING:
    from controller.fleet import Fleet

log = speaker(logging.getLogger(__name__), "controller")

# A change to only these fields is taken in place: the controller reads them, the workers
# do not (anything else is a new spec for the workers: a rollout).
IN_PLACE = frozenset({
    "worlds", "min_worlds", "max_worlds", "slo_p99_ms", "max_queue", "admit_by_deadline",
    "max_inflight_per_world", "default_timeout_ms", "max_timeout_ms", "upscale_delay_s",
    "downscale_delay_s", "slo_ttft_p99_ms", "slo_tpot_p50_ms"})
# The live settings an operator may change at run time (the file's value wins only when the
# file changed it).
LIVE = ("worlds", "min_worlds", "max_worlds", "slo_p99_ms")


@dataclass
class ApplyPlan:
    add: list[DeploymentSpec] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    roll: list[tuple[DeploymentSpec, tuple[str, ...]]] = field(default_factory=list)
    update: list[tuple[DeploymentSpec, tuple[str, ...]]] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    routes: dict[str, list[str]] = field(default_factory=dict)
    not_applied: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"add": [d.name for d in self.add], "remove": self.remove,
                "roll": [{"deployment": d.name, "changed": list(c)} for d, c in self.roll],
                "update": [{"deployment": d.name, "changed": list(c)} for d, c in self.update],
                "unchanged": self.unchanged, "routes": self.routes,
                "not_applied": self.not_applied}


def changed_fields(old: DeploymentSpec, new: DeploymentSpec) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(DeploymentSpec)
                 if getattr(old, f.name) != getattr(new, f.name))


def plan_apply(running: dict[str, DeploymentSpec], routes: tuple[RouteConfig, ...],
               catalog: Catalog) -> ApplyPlan:
    """What applying ``catalog`` changes, against the deployments and routes that run."""
    plan = ApplyPlan()
    for spec in catalog.deployments:
        old = running.get(spec.name)
        if old is None:
            plan.add.append(spec)
            continue
        changed = changed_fields(old, spec)
        if not changed:
            plan.unchanged.append(spec.name)
        elif set(changed) <= IN_PLACE:
            plan.update.append((spec, changed))
        else:
            plan.roll.append((spec, changed))
    asked = {d.name for d in catalog.deployments}
    plan.remove = [name for name in running if name not in asked]
    before = {r.name: r for r in routes}
    after = {r.name: r for r in catalog.routes}
    plan.routes = {"add": sorted(set(after) - set(before)),
                   "remove": sorted(set(before) - set(after)),
                   "change": sorted(n for n in set(after) & set(before)
                                    if after[n] != before[n])}
    return plan


def apply(fleet: Fleet, args: ApplyArgs) -> dict[str, Any]:
    """Make the document's deployments and routes the running set (or, dry, say how)."""
    from controller.config import TABLES

    unknown = set(args.document) - TABLES
    if unknown:
        raise BadRequest(f"unknown top-level key {sorted(unknown)[0]!r}")
    try:
        # A document without deployments is refused, not read as "remove them all": a wrong
        # or truncated file must not take every model down (a config file needs one too).
        catalog = parse_catalog(args.document)
    except ConfigError as exc:
        raise BadRequest(str(exc)) from None
    running = {name: d.config for name, d in fleet.deployments.items() if not d.removing}
    plan = plan_apply(running, fleet.routes, catalog)
    plan.not_applied = [f"[{name}] is read when the controller starts: restart it to change "
                        "that table" for name in sorted(set(args.document) - {
                            "deployments", "routes"})]
    if args.dry_run:
        return {"plan": plan.to_dict(), "dry_run": True}
    for spec in plan.add:
        _add(fleet, spec)
    for name in plan.remove:
        _remove(fleet, fleet.deployments[name])
    for spec, changed in plan.update:
        _update(fleet, fleet.deployments[spec.name], spec, changed)
    for spec, changed in plan.roll:
        _roll(fleet, fleet.deployments[spec.name], spec, changed)
    if catalog.routes != fleet.routes:
        fleet.routes = catalog.routes
        fleet.emit(SetRoutes(catalog.routes))
        fleet.events.add("routes_applied", routes=[r.name for r in catalog.routes])
    save(fleet)
    return {"plan": plan.to_dict(), "revisions": {
        name: d.revision for name, d in fleet.deployments.items() if not d.removing}}


def _add(fleet: Fleet, spec: DeploymentSpec) -> None:
    old = fleet.deployments.get(spec.name)  # applied away, still draining: it comes back
    dep = DeploymentState.of(spec, revision=(old.top_revision + 1) if old else 1)
    if old is not None:
        for world in fleet.worlds.values():
            if world.deployment == spec.name:
                world.revision = 0  # the old spec's: drained as the new one's serve
    fleet.deployments[spec.name] = dep
    fleet.emit(AddDeployment(spec))
    fleet.events.add("deployment_added", deployment=spec.name, revision=dep.revision,
                     spec=dep.spec_hash)
    log.info("%s added (revision %d)", spec.name, dep.revision)


def _remove(fleet: Fleet, dep: DeploymentState) -> None:
    dep.removing = True
    dep.desired = dep.min_worlds = 0
    fleet.emit(RetireDeployment(dep.config.name))
    fleet.events.add("deployment_removing", deployment=dep.config.name)
    log.info("%s applied away: its worlds drain, its name answers unknown_model",
             dep.config.name)


def _live_settings(dep: DeploymentState, old: DeploymentSpec, new: DeploymentSpec) -> None:
    """The file's bounds and target where it changed them; the run-time ones otherwise."""
    if new.min_worlds != old.min_worlds:
        dep.min_worlds = new.min_worlds
    if new.max_worlds != old.max_worlds:
        dep.max_worlds = new.max_worlds
    if new.worlds != old.worlds:
        dep.desired = new.worlds
    if new.slo_p99_ms != old.slo_p99_ms:
        dep.slo_p99_ms = new.slo_p99_ms
    dep.desired = max(dep.min_worlds, min(dep.max_worlds, dep.desired))


def _next_revision(fleet: Fleet, dep: DeploymentState, spec: DeploymentSpec) -> None:
    dep.top_revision += 1
    dep.revision = dep.top_revision
    dep.config = spec
    dep.spec_hash = spec_hash(spec)
    fleet.emit(Reconfigure(spec))


def _update(fleet: Fleet, dep: DeploymentState, spec: DeploymentSpec,
            changed: tuple[str, ...]) -> None:
    _live_settings(dep, dep.config, spec)
    _next_revision(fleet, dep, spec)
    for world in fleet.worlds.values():
        if world.deployment == spec.name:
            world.revision = dep.revision  # nothing the workers read changed
    fleet.events.add("deployment_updated", deployment=spec.name, revision=dep.revision,
                     changed=list(changed))


def _roll(fleet: Fleet, dep: DeploymentState, spec: DeploymentSpec,
          changed: tuple[str, ...]) -> None:
    previous, from_revision = dep.config, dep.revision
    _live_settings(dep, previous, spec)
    _next_revision(fleet, dep, spec)
    dep.rollout = Rollout(from_revision, dep.revision, previous, fleet.clock(), changed)
    # A new spec is a new chance: a quarantine for the old one's failures is lifted.
    dep.quarantined, dep.failures, dep.retry_at_s, dep.last_error = "", 0, 0.0, ""
    fleet.events.add("rollout_started", deployment=spec.name, revision=dep.revision,
                     changed=list(changed))
    log.info("%s rolling to revision %d (%s)", spec.name, dep.revision, ", ".join(changed))


def progress(fleet: Fleet) -> None:
    """After each plan: rollouts whose old worlds are all gone are done; deployments applied
    away whose worlds are all gone go."""
    for name, dep in list(fleet.deployments.items()):
        mine = [w for w in fleet.worlds.values() if w.deployment == name]
        if dep.removing and not mine:
            del fleet.deployments[name]
            fleet.emit(RemoveDeployment(name))
            fleet.events.add("deployment_removed", deployment=name)
            log.info("%s removed", name)
            continue
        rollout = dep.rollout
        if rollout is not None and rollout.state == "rolling" and \
                all(w.revision == dep.revision for w in mine) and fleet.serving(name) > 0:
            rollout.state, rollout.finished_s = "done", fleet.clock()
            fleet.events.add("rollout_done", deployment=name, revision=dep.revision,
                             seconds=round(rollout.finished_s - rollout.started_s, 3))
            log.info("%s serves revision %d only", name, dep.revision)


def load_failed(fleet: Fleet, world: WorldInfo, error: str) -> bool:
    """A world failed to load. True when it was a rollout's new spec: the rollout is rolled
    back (the previous spec is current again) rather than retried."""
    dep = fleet.deployments.get(world.deployment)
    rollout = dep.rollout if dep is not None else None
    if dep is None or rollout is None or rollout.state != "rolling" or \
            world.revision != rollout.to_revision:
        return False
    rollout.state, rollout.reason, rollout.finished_s = "failed", error, fleet.clock()
    dep.revision = rollout.from_revision
    dep.config = rollout.previous
    dep.spec_hash = spec_hash(rollout.previous)
    fleet.emit(Reconfigure(rollout.previous))
    fleet.events.add("rollout_failed", deployment=dep.config.name,
                     revision=rollout.to_revision, reason=error)
    log.error("%s: revision %d failed to load (%s); revision %d keeps serving",
              dep.config.name, rollout.to_revision, error, rollout.from_revision)
    save(fleet)
    return True


def save(fleet: Fleet) -> None:
    """What a restarted controller resumes from (with ``state_dir``; controller/state.py)."""
    if not fleet.config.controller.state_dir:
        return
    fleet.emit(SaveState({
        "deployments": [d.config.to_wire() for d in fleet.deployments.values()
                        if not d.removing],
        "routes": [dataclasses.asdict(r) for r in fleet.routes],
        "live": {name: {"desired": d.desired, "min_worlds": d.min_worlds,
                        "max_worlds": d.max_worlds, "slo_p99_ms": d.slo_p99_ms,
                        "revision": d.revision, "top_revision": d.top_revision}
                 for name, d in fleet.deployments.items() if not d.removing}}))


def resumed(spec: DeploymentSpec, kept: dict[str, Any] | None) -> DeploymentState:
    """A deployment as a previous run of the controller left it (its live settings and
    revision), where one did; as its spec says otherwise."""
    dep = DeploymentState.of(spec)
    if not isinstance(kept, dict):
        return dep
    try:
        lo, hi = int(kept["min_worlds"]), int(kept["max_worlds"])
        desired, slo = int(kept["desired"]), float(kept["slo_p99_ms"])
        revision, top = int(kept["revision"]), int(kept["top_revision"])
    except (KeyError, TypeError, ValueError):
        log.warning("%s: the kept live settings are unreadable; using its spec's", spec.name)
        return dep
    if 0 <= lo <= hi and hi >= 1 and 0 < slo <= 3.6e6 and 1 <= revision <= top:
        dep.min_worlds, dep.max_worlds, dep.slo_p99_ms = lo, hi, slo
        dep.desired = max(lo, min(hi, desired))
        dep.revision, dep.top_revision = revision, top
    return dep
