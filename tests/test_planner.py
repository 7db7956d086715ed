"""The Fleet's decisions, driven through ``plan`` on hand-made views: no processes, no
sockets, any clock. Each test builds the fleet as the actor would see it at one moment."""

from __future__ import annotations

from controller.planner import (
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
from controller.records import WorkerState, WorldState
from controller.view import DeploymentView, View, WorkerView, WorldView

IDLE, SERVING, STARTING, DEAD = (WorkerState.IDLE, WorkerState.SERVING, WorkerState.STARTING,
                                 WorkerState.DEAD)


def worker(wid: str, state: WorkerState = IDLE, *, since: float = 0.0, **kw: object
           ) -> WorkerView:
    return WorkerView(wid, state, since, **kw)  # type: ignore[arg-type]


def view(*, now: float = 100.0, deployments: tuple[DeploymentView, ...],
         workers: tuple[WorkerView, ...] | list[WorkerView] = (),
         worlds: tuple[WorldView, ...] | list[WorldView] = (), **kw: object) -> View:
    return View(now_s=now, deployments=deployments, workers={w.id: w for w in workers},
                worlds=tuple(worlds), **kw)  # type: ignore[arg-type]


def dep(name: str = "mlp", stages: int = 1, desired: int = 1, **kw: object) -> DeploymentView:
    return DeploymentView(name, stages, desired, **kw)  # type: ignore[arg-type]


def of(actions: list, kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


# -- formation ---------------------------------------------------------------------------


def test_a_deployment_below_its_count_forms_worlds_from_idle_workers_in_rank_order() -> None:
    actions = plan(view(deployments=(dep("pipe", stages=2, desired=2),),
                        workers=[worker("w1"), worker("w2"), worker("w3"), worker("w4")]))
    assert actions == [Form("pipe", ("w1", "w2")), Form("pipe", ("w3", "w4"))]


def test_no_world_forms_on_too_few_workers_and_the_missing_ones_are_started() -> None:
    actions = plan(view(deployments=(dep("pipe", stages=2, desired=1),),
                        workers=[worker("w1")], can_spawn=True, room=8))
    assert of(actions, Form) == []
    assert of(actions, Spawn) == [Spawn(1)]  # one more with the idle one makes a world


def test_workers_still_starting_count_as_supply_so_nothing_is_started_twice() -> None:
    actions = plan(view(deployments=(dep(desired=2),),
                        workers=[worker("w1", STARTING), worker("w2", STARTING)],
                        can_spawn=True, room=8))
    assert actions == []


def test_a_full_launcher_is_said_instead_of_a_spawn() -> None:
    actions = plan(view(deployments=(dep(desired=3),), can_spawn=True, room=0))
    assert actions == [LauncherFull(3)]
    # And spawns are capped by the room left.
    assert plan(view(deployments=(dep(desired=3),), can_spawn=True, room=2)) == [Spawn(2)]


def test_without_a_launcher_that_spawns_nothing_is_started() -> None:
    assert plan(view(deployments=(dep(desired=3),), can_spawn=False, room=0)) == []


def test_two_deployments_take_idle_workers_in_config_order() -> None:
    actions = plan(view(deployments=(dep("a"), dep("b")), workers=[worker("w1")],
                        can_spawn=True, room=4))
    assert of(actions, Form) == [Form("a", ("w1",))]
    assert of(actions, Spawn) == [Spawn(1)]


# -- breakage and timeouts ---------------------------------------------------------------


def test_a_broken_world_is_replaced_on_idle_workers() -> None:
    # The actor removed the broken world and its survivor went back to idle; the dead worker
    # is not a candidate.
    actions = plan(view(deployments=(dep("pipe", stages=2),),
                        workers=[worker("w1"), worker("w2", DEAD, since=99.0),
                                 worker("w3")]))
    assert actions == [Form("pipe", ("w1", "w3"))]


def test_a_forming_world_past_its_timeout_breaks_and_is_formed_again() -> None:
    forming = WorldView(7, "mlp", WorldState.FORMING, ("w1",), created_s=0.0)
    fleet = dict(deployments=(dep(),), workers=[worker("w1", SERVING, worlds=frozenset({7})),
                                               worker("w2")], worlds=[forming],
                 form_timeout_s=30.0)
    assert plan(view(now=29.0, **fleet)) == []  # type: ignore[arg-type]
    actions = plan(view(now=31.0, **fleet))  # type: ignore[arg-type]
    assert actions[0] == Break(7, "not formed within 30s")
    assert of(actions, Form) == [Form("mlp", ("w2",))]  # the replacement, at once


def test_a_forming_worlds_join_goes_again_each_second_to_the_members_that_did_not_answer(
        ) -> None:
    forming = WorldView(7, "pipe", WorldState.FORMING, ("w1", "w2"), created_s=10.0,
                        unanswered=("w2",), joins_sent_s=10.0)
    fleet = dict(deployments=(dep("pipe", stages=2),),
                 workers=[worker("w1", SERVING, worlds=frozenset({7})),
                          worker("w2", SERVING, worlds=frozenset({7}))],
                 worlds=[forming], join_resend_s=1.0, form_timeout_s=30.0)
    assert of(plan(view(now=10.9, **fleet)), ResendJoin) == []  # type: ignore[arg-type]
    assert plan(view(now=11.0, **fleet)) == [ResendJoin(7, ("w2",))]  # type: ignore[arg-type]
    # Past the formation timeout it is given up on instead.
    actions = plan(view(now=41.0, **fleet))  # type: ignore[arg-type]
    assert of(actions, ResendJoin) == [] and of(actions, Break) == [
        Break(7, "not formed within 30s")]


def test_suspect_workers_are_not_given_a_new_world_until_they_heartbeat() -> None:
    actions = plan(view(deployments=(dep(),), workers=[worker("w1", suspect=True)],
                        can_spawn=True, room=4))
    # No world on the suspect, and none started for it either: it counts as supply.
    assert actions == []


def test_dead_workers_are_forgotten_after_forget_dead_s() -> None:
    workers = [worker("w1", DEAD, since=50.0), worker("w2", DEAD, since=90.0)]
    actions = plan(view(now=115.0, deployments=(), workers=workers, forget_dead_s=60.0))
    assert actions == [Forget("w1")]


# -- quarantine and backoff --------------------------------------------------------------


def test_a_deployment_backing_off_forms_nothing_until_its_retry_time() -> None:
    d = dep(retry_at_s=105.0)
    assert of(plan(view(now=100.0, deployments=(d,), workers=[worker("w1")])), Form) == []
    assert plan(view(now=105.0, deployments=(d,), workers=[worker("w1")])) == [
        Form("mlp", ("w1",))]


def test_a_quarantined_deployment_forms_nothing_and_wants_no_workers() -> None:
    actions = plan(view(deployments=(dep(quarantined=True, desired=4),), workers=[],
                        can_spawn=True, room=8))
    assert actions == []


def test_a_quarantined_deployment_leaves_its_idle_workers_to_the_others() -> None:
    actions = plan(view(deployments=(dep("bad", quarantined=True), dep("good")),
                        workers=[worker("w1")]))
    assert actions == [Form("good", ("w1",))]


# -- scaling down, retiring, preloading --------------------------------------------------


def test_above_its_count_a_deployment_drains_forming_worlds_first_then_the_newest() -> None:
    worlds = [WorldView(1, "mlp", WorldState.SERVING, ("w1",), created_s=1.0),
              WorldView(2, "mlp", WorldState.SERVING, ("w2",), created_s=2.0),
              WorldView(3, "mlp", WorldState.FORMING, ("w3",), created_s=3.0),
              WorldView(4, "mlp", WorldState.DRAINING, ("w4",), created_s=0.5)]
    workers = [worker(f"w{i}", SERVING, worlds=frozenset({i})) for i in range(1, 5)]
    actions = plan(view(deployments=(dep(desired=1),), workers=workers, worlds=worlds))
    assert actions == [Drain(3, "scaled down to 1"), Drain(2, "scaled down to 1")]


def test_idle_workers_beyond_the_warm_spares_are_retired_the_least_valuable_first() -> None:
    workers = [worker("w1", since=10.0, spawned_by_us=True, valued=True),
               worker("w2", since=20.0, spawned_by_us=True),
               worker("w3", since=30.0, spawned_by_us=True, valued=True),
               worker("w4", since=5.0, spawned_by_us=False)]
    actions = plan(view(deployments=(), workers=workers, warm_workers=1))
    # Three surplus: never-loaded w2 first, then the most recently idle of the loaded ones
    # (w3). w4 came by itself: it is not ours to stop.
    assert actions == [Retire("w2"), Retire("w3")]


def test_idle_workers_are_preloaded_once_when_preload_warm_is_set() -> None:
    workers = [worker("w1", spawned_by_us=True), worker("w2", preloaded=True,
                                                         spawned_by_us=True)]
    actions = plan(view(deployments=(), workers=workers, warm_workers=2, preload_warm=True))
    assert actions == [Preload("w1")]
    assert plan(view(deployments=(), workers=workers, warm_workers=2)) == []


def test_a_worker_retired_in_this_plan_is_not_preloaded() -> None:
    workers = [worker("w1", spawned_by_us=True), worker("w2", spawned_by_us=True,
                                                         valued=True)]
    actions = plan(view(deployments=(), workers=workers, warm_workers=1, preload_warm=True))
    assert actions == [Retire("w1"), Preload("w2")]


# -- sharing -----------------------------------------------------------------------------


def _pipeline(util: float, costs: tuple[float, float]) -> tuple[list[WorkerView],
                                                                  list[WorldView]]:
    workers = [worker("a0", SERVING, worlds=frozenset({1}), util=util, cost_ms=costs[0]),
               worker("a1", SERVING, worlds=frozenset({1}), util=util, cost_ms=costs[1]),
               worker("f1"), worker("f2")]
    return workers, [WorldView(1, "pipe", WorldState.SERVING, ("a0", "a1"), 0.0)]


def test_a_cheap_stage_with_headroom_is_shared_and_only_the_bottleneck_is_added() -> None:
    workers, worlds = _pipeline(util=0.3, costs=(1.0, 9.0))
    actions = plan(view(deployments=(dep("pipe", stages=2, desired=2),), workers=workers,
                        worlds=worlds))
    [form] = of(actions, Form)
    assert form.workers == ("a0", "f1")  # rank 0 shared, rank 1 on a fresh worker
    assert "sharing {0: 'a0'}" in form.why


def test_nothing_is_shared_when_the_cheap_stage_is_busy_or_costs_are_unknown() -> None:
    for util, costs in ((0.9, (1.0, 9.0)), (0.3, (0.0, 9.0)), (0.3, (8.0, 9.0))):
        workers, worlds = _pipeline(util, costs)
        [form] = of(plan(view(deployments=(dep("pipe", stages=2, desired=2),),
                              workers=workers, worlds=worlds)), Form)
        assert form.workers == ("f1", "f2"), (util, costs)
        assert form.why == ""


def test_a_world_of_only_shared_workers_is_never_formed() -> None:
    # Both stages cheap relative to... each other: one of them is the bottleneck, so at most
    # one stage is shared.
    workers, worlds = _pipeline(util=0.1, costs=(1.0, 1.0))
    [form] = of(plan(view(deployments=(dep("pipe", stages=2, desired=2),), workers=workers,
                          worlds=worlds)), Form)
    assert set(form.workers) & {"f1", "f2"}


def test_a_shared_world_needs_fewer_fresh_workers_so_fewer_are_started() -> None:
    workers, worlds = _pipeline(util=0.3, costs=(1.0, 9.0))
    workers = workers[:2]  # no idle worker at all
    actions = plan(view(deployments=(dep("pipe", stages=2, desired=3),), workers=workers,
                        worlds=worlds, can_spawn=True, room=8))
    assert actions == [Spawn(2)]  # two new worlds, one fresh worker each


def test_worlds_created_in_the_same_instant_drain_the_highest_id_first() -> None:
    worlds = [WorldView(i, "mlp", WorldState.SERVING, (f"w{i}",), created_s=5.0)
              for i in (3, 1, 2)]
    workers = [worker(f"w{i}", SERVING, worlds=frozenset({i})) for i in (1, 2, 3)]
    actions = plan(view(deployments=(dep(desired=1),), workers=workers, worlds=worlds))
    assert actions == [Drain(3, "scaled down to 1"), Drain(2, "scaled down to 1")]


def test_a_quarantined_worker_gets_no_world_is_stopped_if_ours_and_is_replaced() -> None:
    workers = [worker("w1", quarantined=True, spawned_by_us=True),
               worker("w2", quarantined=True, spawned_by_us=False)]
    actions = plan(view(deployments=(dep(),), workers=workers, can_spawn=True, room=4))
    assert of(actions, Form) == []
    assert of(actions, Retire) == [Retire("w1")]  # w2 joined by itself: left to its operator
    assert of(actions, Spawn) == [Spawn(1)]  # neither counts as supply
