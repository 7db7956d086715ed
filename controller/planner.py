"""What the WorldManager should do next: a pure function of an immutable view of the fleet.

``plan(view) -> list[Action]`` holds every decision of the WorldManager, in the spirit of the
autoscaler's ``decide``: which worlds to form and on which workers, which to drain when a
deployment has too many, which forming worlds took too long, how many workers to start, which
idle ones to retire, which to preload, and which dead ones to forget. The actor (controller/
world_manager.py) builds the view after every event, applies the actions, and is the only one
to change the fleet. Tests drive ``plan`` on hand-made views with any clock.

The rules, in the order they run:

* a forming world older than ``form_timeout_s`` breaks (it is formed again, under a new id);
* a forming world's join is sent again, every ``join_resend_s``, to each member that has not
  answered it: a join lost on its way (a connection torn down after a partition heals) costs
  a second, not the formation timeout. A worker answers a join once per world and epoch
  however often it comes (worker/agent.py);
* a deployment below its desired count forms worlds from idle workers that are not suspect,
  sharing an existing worker for stages that are not the bottleneck (controller/sharing.py),
  unless it is quarantined or backing off;
* a deployment above it drains its newest worlds, forming ones first (nothing to drain);
* during a rollout (controller/fleet_apply.py) only the worlds of the current spec count; the
  old spec's worlds are drained as the current spec's serve, never below the desired count
  of serving worlds;
* workers: the ones still missing plus ``warm_workers`` spares are wanted; starting and suspect
  workers count as supply; the launcher starts the rest if it has room, or says it is full;
  idle workers beyond what is wanted are retired, least valuable first (never loaded, then the
  most recently idle);
* a worker whose worlds stalled too often is quarantined: never given a world, not counted
  as supply, and stopped if the launcher started it;
* idle workers preload the deployments' stages once (``preload_warm``);
* dead workers are forgotten after ``forget_dead_s``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controller.records import LIVE_WORLD, WorkerState, WorldState
from controller.sharing import shareable
from controller.view import View, WorkerView, WorldView

# -- actions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Form:
    deployment: str
    workers: tuple[str, ...]  # rank order; some may already serve other worlds (shared)
    why: str = ""  # the sharing decision, when workers are shared


@dataclass(frozen=True, slots=True)
class ResendJoin:
    world_id: int
    workers: tuple[str, ...]  # the members whose join has not been answered


@dataclass(frozen=True, slots=True)
class Drain:
    world_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Break:
    world_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Spawn:
    count: int


@dataclass(frozen=True, slots=True)
class LauncherFull:
    wanted: int  # workers wanted beyond what runs or starts


@dataclass(frozen=True, slots=True)
class Retire:
    worker_id: str


@dataclass(frozen=True, slots=True)
class Preload:
    worker_id: str


@dataclass(frozen=True, slots=True)
class Forget:
    worker_id: str


Action = Form | ResendJoin | Drain | Break | Spawn | LauncherFull | Retire | Preload | Forget


@dataclass
class _Pool:
    """Idle workers not yet given a place during this plan."""

    idle: list[WorkerView] = field(default_factory=list)

    def take(self, n: int) -> list[WorkerView]:
        taken, self.idle = self.idle[:n], self.idle[n:]
        return taken


def _roll(desired: int, live: list[WorldView], old: list[WorldView]) -> list[Action]:
    """A rollout: the old spec's worlds go as the current spec's serve, so the deployment
    never has fewer serving worlds than it wants while it moves (forming old ones first, then
    the newest)."""
    serving_new = sum(1 for w in live if w.state == WorldState.SERVING)
    surplus = len(old) - max(0, desired - serving_new)
    if surplus <= 0:
        return []
    ranked = sorted(old, key=lambda w: (w.state == WorldState.SERVING, -w.created_s, -w.id))
    return [Drain(w.id, "replaced by its deployment's new spec") for w in ranked[:surplus]]


def plan(view: View) -> list[Action]:
    actions: list[Action] = []
    now = view.now_s
    worlds = list(view.worlds)
    for world in worlds:
        if world.state == WorldState.FORMING and now - world.created_s > view.form_timeout_s:
            actions.append(Break(world.id, f"not formed within {view.form_timeout_s:.0f}s"))
    broken = {a.world_id for a in actions if isinstance(a, Break)}
    worlds = [w for w in worlds if w.id not in broken]
    actions += [ResendJoin(w.id, w.unanswered) for w in worlds
                if w.state == WorldState.FORMING and w.unanswered
                and now - w.joins_sent_s >= view.join_resend_s]

    workers = view.workers
    pool = _Pool([w for w in workers.values()
                  if w.state == WorkerState.IDLE and not w.suspect and not w.quarantined])
    suspects = sum(1 for w in workers.values() if w.state == WorkerState.IDLE and w.suspect)
    starting = sum(1 for w in workers.values() if w.state == WorkerState.STARTING) + suspects
    needed = 0
    for dep in view.deployments:
        mine = [w for w in worlds if w.deployment == dep.name and w.state in LIVE_WORLD]
        live = [w for w in mine if w.current]
        actions += _roll(dep.desired, live, [w for w in mine if not w.current])
        missing = dep.desired - len(live)
        if missing > 0:
            if now < dep.retry_at_s or dep.quarantined:
                continue
            serving = [w for w in live if w.state == WorldState.SERVING]
            shared, why = shareable(dep.stages, serving, workers) if live else ({}, "")
            fresh = dep.stages - len(shared)
            while missing > 0 and len(pool.idle) >= fresh:
                new = [w.id for w in pool.take(fresh)]
                members = tuple(shared[r] if r in shared else new.pop(0)
                                for r in range(dep.stages))
                actions.append(Form(dep.name, members, why if shared else ""))
                missing -= 1
            needed += missing * fresh
        elif missing < 0:
            # Forming worlds first (nothing to drain), then the newest: the reverse of the
            # order they were added in (shared-worker worlds came last).
            ranked = sorted(live, key=lambda w: (w.state == WorldState.SERVING, -w.created_s,
                                                 -w.id))
            actions += [Drain(w.id, f"scaled down to {dep.desired}") for w in ranked[:-missing]]

    # Start what is missing; retire idle workers nobody needs. Workers still starting count
    # as supply: they will register and be used on a later pass.
    supply = len(pool.idle) + starting
    wanted = needed + view.warm_workers
    if wanted > supply and view.can_spawn:
        if view.room > 0:
            actions.append(Spawn(min(wanted - supply, view.room)))
        else:
            actions.append(LauncherFull(wanted - supply))
    surplus = min(len(pool.idle), supply - wanted)
    # Keep the idle workers worth most (a model loaded, longest warm); retire the others.
    by_value = sorted(pool.idle, key=lambda w: (w.valued, -w.since_s))
    retired = {w.id for w in by_value[:max(0, surplus)] if w.spawned_by_us}
    # A quarantined worker of ours is stopped (a fresh one replaces it); one that joined by
    # itself stays, unused, for its operator to look at.
    retired |= {w.id for w in workers.values() if w.quarantined and w.spawned_by_us
                and w.state == WorkerState.IDLE}
    actions += [Retire(w) for w in sorted(retired)]
    if view.preload_warm:
        actions += [Preload(w.id) for w in pool.idle if w.id not in retired and not w.preloaded]
    actions += [Forget(w.id) for w in workers.values()
                if w.state == WorkerState.DEAD and now - w.since_s > view.forget_dead_s]
    return actions
