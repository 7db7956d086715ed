"""What the planner sees: an immutable snapshot of the fleet, built by the Fleet after every
event (controller/records.py ``Fleet.view``), read by ``plan`` (controller/planner.py) and by
worker-granular sharing (controller/sharing.py)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from controller.records import (
    DeploymentState,
    WorkerInfo,
    WorkerState,
    WorldInfo,
    WorldState,
)

if TYPE_CHECKING:
    from controller.config import ControllerConfig


@dataclass(frozen=True, slots=True)
class WorkerView:
    id: str
    state: WorkerState
    since_s: float
    worlds: frozenset[int] = frozenset()
    suspect: bool = False
    quarantined: bool = False  # its worlds stalled too often: never given a world again
    spawned_by_us: bool = False
    valued: bool = False  # it holds a model (served or preloaded): worth keeping when idle
    preloaded: bool = False
    util: float = 0.0
    cost_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class WorldView:
    id: int
    deployment: str
    state: WorldState
    workers: tuple[str, ...]
    created_s: float
    unanswered: tuple[str, ...] = ()  # forming: members whose join has not been answered
    joins_sent_s: float = 0.0  # forming: when its joins were last sent
    current: bool = True  # of its deployment's current spec (False: a rollout replaces it)


@dataclass(frozen=True, slots=True)
class DeploymentView:
    name: str
    stages: int
    desired: int
    quarantined: bool = False
    retry_at_s: float = 0.0


@dataclass(frozen=True, slots=True)
class View:
    now_s: float
    deployments: tuple[DeploymentView, ...]
    workers: Mapping[str, WorkerView]
    worlds: tuple[WorldView, ...]
    warm_workers: int = 0
    preload_warm: bool = False
    form_timeout_s: float = 120.0
    join_resend_s: float = 1.0
    forget_dead_s: float = 60.0
    can_spawn: bool = False  # a launcher that starts workers, not quarantined, not backing off
    room: int = 0  # workers the launcher may start now


def snapshot(c: ControllerConfig, now: float, deployments: Mapping[str, DeploymentState],
             workers: Iterable[WorkerInfo], worlds: Iterable[WorldInfo], *, can_spawn: bool,
             room: int) -> View:
    """The fleet's records as the planner sees them at ``now``."""
    revision = {name: d.revision for name, d in deployments.items()}
    return View(
        now_s=now,
        deployments=tuple(
            DeploymentView(d.config.name, d.config.stages, d.desired, bool(d.quarantined),
                           d.retry_at_s) for d in deployments.values()),
        workers={w.id: WorkerView(
            w.id, w.state, w.since_s, frozenset(w.worlds), suspect=w.suspect,
            quarantined=bool(w.quarantined), spawned_by_us=w.spawned_by_us,
            valued=w.joined_once or w.preloaded, preloaded=w.preloaded,
            util=w.load.util, cost_ms=w.load.cost_ms)
            for w in workers},
        worlds=tuple(WorldView(w.id, w.deployment, w.state, tuple(w.workers), w.created_s,
                               unanswered=tuple(m for m in w.workers if m not in w.joined),
                               joins_sent_s=w.joins_sent_s,
                               current=w.revision == revision.get(w.deployment, w.revision))
                     for w in worlds),
        warm_workers=c.warm_workers, preload_warm=c.preload_warm,
        form_timeout_s=c.world_form_timeout_ms / 1000.0, can_spawn=can_spawn, room=room)
