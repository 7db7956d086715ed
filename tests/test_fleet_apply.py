"""Applying a catalog to the Fleet, with no processes: what a plan says, how a rollout moves
worlds from one spec to the next, how a failed one rolls back, how a removed deployment
goes, which settings an apply keeps, and the routes' split and the kept state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller import state
from controller.catalog import Catalog, RouteConfig, parse_catalog
from controller.config import parse_config
from controller.effects import (
    AddDeployment,
    Reconfigure,
    RemoveDeployment,
    RetireDeployment,
    SaveState,
    SendTo,
    SetRoutes,
)
from controller.fleet_apply import plan_apply, resumed
from controller.mailbox import FromWorker, Tick, WorldIdle
from controller.records import WorldState
from controller.routers import WeightedRoute
from mesh.errors import BadRequest, ConfigError
from mesh.messages import ApplyArgs, Join, JoinFailed, ScaleArgs
from mesh.spec import DeploymentSpec
from tests.test_fleet import Rig

MLP = {"name": "m", "model": "worker.models.mlp:build", "worlds": 1, "min_worlds": 0}


def config(*deployments: dict[str, Any], **controller: Any) -> Any:
    return parse_config({
        "controller": {"warm_workers": 0, "preload_warm": False, "launcher": "none",
                       **controller},
        "deployments": list(deployments) or [MLP]})


def serving_rig(*deployments: dict[str, Any], workers: int = 2, **controller: Any) -> Rig:
    f = Rig(config(*deployments, **controller))
    for i in range(workers):
        f.register(f"w{i}", 10 + i)
    f.join_all()
    return f


def apply(f: Rig, *deployments: dict[str, Any], routes: list[dict[str, Any]] | None = None,
          dry_run: bool = False) -> dict[str, Any]:
    document = {"deployments": list(deployments), "routes": routes or []}
    result: dict[str, Any] = f.handle(ApplyArgs(document=document, dry_run=dry_run))
    return result


def spec(**fields: Any) -> DeploymentSpec:
    return DeploymentSpec(**{**MLP, **fields})


# -- the plan -------------------------------------------------------------------------------


def test_a_plan_sorts_every_deployment_into_add_roll_update_remove_or_keep() -> None:
    running = {"a": spec(name="a"), "b": spec(name="b"), "c": spec(name="c"),
               "d": spec(name="d")}
    catalog = Catalog((spec(name="a"), spec(name="b", factory_kwargs={"seed": 1}),
                       spec(name="c", max_worlds=9, slo_p99_ms=5.0), spec(name="e")),
                      (RouteConfig("r", {"a": 1, "b": 1}),))
    plan = plan_apply(running, (), catalog).to_dict()
    assert plan["add"] == ["e"] and plan["remove"] == ["d"] and plan["unchanged"] == ["a"]
    assert plan["roll"] == [{"deployment": "b", "changed": ["factory_kwargs"]}]
    assert plan["update"] == [{"deployment": "c", "changed": ["max_worlds", "slo_p99_ms"]}]
    assert plan["routes"] == {"add": ["r"], "remove": [], "change": []}


def test_a_route_must_name_deployments_and_no_deployments_name() -> None:
    with pytest.raises(ConfigError, match=r"routes\[m\].name: 'm' names a deployment too"):
        parse_catalog({"deployments": [MLP], "routes": [{"name": "m", "to": {"m": 1}}]})
    with pytest.raises(ConfigError, match=r"routes\[r\].to: no deployment named 'x'"):
        parse_catalog({"deployments": [MLP], "routes": [{"name": "r", "to": {"x": 1}}]})
    with pytest.raises(ConfigError, match=r"routes\[r\].to"):
        parse_catalog({"deployments": [MLP], "routes": [{"name": "r", "to": {"m": 0}}]})


def test_a_dry_run_changes_nothing_and_a_bad_document_is_refused_by_name() -> None:
    f = serving_rig()
    f.effects.clear()
    answer = apply(f, {**MLP, "factory_kwargs": {"seed": 1}}, dry_run=True)
    assert answer["plan"]["roll"][0]["deployment"] == "m" and f.effects == []
    assert f.fleet.deployments["m"].revision == 1
    with pytest.raises(BadRequest, match=r"deployments\[m\].stages"):
        apply(f, {**MLP, "stages": 0})
    with pytest.raises(BadRequest, match="unknown top-level key 'nope'"):
        f.handle(ApplyArgs(document={"nope": 1}))
    # A document with no deployments (a wrong or truncated file) takes nothing down.
    for empty in ({}, {"deployments": []}, {"routes": []}):
        with pytest.raises(BadRequest, match="'deployments' is empty"):
            f.handle(ApplyArgs(document=empty))
    assert not f.fleet.deployments["m"].removing and f.effects == []


# -- rollouts -------------------------------------------------------------------------------


def test_a_roll_forms_the_new_spec_first_and_drains_the_old_only_once_it_serves() -> None:
    f = serving_rig()
    [old] = list(f.fleet.worlds)
    f.effects.clear()
    answer = apply(f, {**MLP, "factory_kwargs": {"seed": 1}})
    assert answer["revisions"] == {"m": 2}
    assert [e.spec.factory_kwargs for e in f.took(Reconfigure)] == [{"seed": 1}]
    [(worker, join)] = f.take(Join)
    assert join.deployment.factory_kwargs == {"seed": 1} and worker != "w0"
    assert f.fleet.worlds[old].state == WorldState.SERVING  # still serving meanwhile
    f.effects.append(SendTo(worker, join))  # the worker answers it
    [new] = f.join_all()
    assert f.fleet.worlds[new].revision == 2
    assert f.fleet.worlds[old].state == WorldState.DRAINING  # now it goes
    assert f.fleet.deployments["m"].rollout.state == "rolling"  # until it is released
    f.handle(WorldIdle(old))
    assert f.fleet.deployments["m"].rollout.state == "done"
    assert f.events()[-1] == "rollout_done"


def test_a_new_spec_that_fails_to_load_rolls_back_and_the_old_one_keeps_serving() -> None:
    f = serving_rig()
    [old] = list(f.fleet.worlds)
    apply(f, {**MLP, "checkpoint": "/no/such.pt"})
    [(worker, join)] = f.take(Join)
    f.handle(FromWorker(worker, JoinFailed(world_id=join.world_id, epoch=1,
                                           error="no such file: /no/such.pt")))
    dep = f.fleet.deployments["m"]
    assert dep.rollout.state == "failed" and "no such file" in dep.rollout.reason
    assert dep.revision == 1 and dep.config.checkpoint == "" and not dep.quarantined
    assert f.took(Reconfigure)[-1].spec.checkpoint == ""  # the router reads the old one
    assert f.fleet.worlds[old].state == WorldState.SERVING and list(f.fleet.worlds) == [old]
    f.handle(Tick())
    assert f.take(Join) == []  # nothing formed again for the failed spec
    # The next apply is revision 3: a failed revision number is not used twice.
    apply(f, {**MLP, "factory_kwargs": {"seed": 2}})
    assert f.fleet.deployments["m"].revision == 3


def test_an_update_in_place_takes_a_revision_and_forms_nothing() -> None:
    f = serving_rig()
    [world] = list(f.fleet.worlds)
    f.take(Join)
    apply(f, {**MLP, "max_queue": 10, "slo_p99_ms": 42.0})
    dep = f.fleet.deployments["m"]
    assert dep.revision == 2 and dep.slo_p99_ms == 42.0 and dep.rollout is None
    assert f.fleet.worlds[world].revision == 2 and f.take(Join) == []
    assert f.took(Reconfigure)[-1].spec.max_queue == 10


def test_an_operators_scale_survives_an_apply_that_does_not_change_it() -> None:
    f = serving_rig(workers=3)
    f.handle(ScaleArgs("m", worlds=2, max_worlds=3))
    apply(f, {**MLP, "max_queue": 10})  # the file still says worlds = 1, max_worlds = 4
    dep = f.fleet.deployments["m"]
    assert (dep.desired, dep.max_worlds) == (2, 3)
    apply(f, {**MLP, "max_queue": 10, "worlds": 3})  # the file changed it: the file wins
    assert f.fleet.deployments["m"].desired == 3


# -- adding and removing --------------------------------------------------------------------


def test_a_removed_deployment_stops_taking_requests_drains_and_goes() -> None:
    other = {**MLP, "name": "n"}
    f = serving_rig(MLP, other, workers=2)
    m_worlds = [w.id for w in f.fleet.worlds.values() if w.deployment == "m"]
    f.effects.clear()
    apply(f, other)
    assert f.took(RetireDeployment) == [RetireDeployment("m")]
    assert [f.fleet.worlds[w].state for w in m_worlds] == [WorldState.DRAINING]
    with pytest.raises(Exception, match="no deployment named 'm'"):
        f.handle(ScaleArgs("m", worlds=1))
    f.handle(WorldIdle(m_worlds[0]))
    assert "m" not in f.fleet.deployments and f.took(RemoveDeployment) == [RemoveDeployment("m")]
    assert f.events()[-1] == "deployment_removed"


def test_an_added_deployment_gets_a_router_and_its_worlds() -> None:
    f = serving_rig(workers=2)
    f.effects.clear()
    apply(f, MLP, {**MLP, "name": "n"}, routes=[{"name": "r", "to": {"m": 3, "n": 1}}])
    assert [e.spec.name for e in f.took(AddDeployment)] == ["n"]
    assert [w for w, j in f.take(Join) if j.deployment.name == "n"] == ["w1"]
    [routes] = f.took(SetRoutes)
    assert routes.routes == (RouteConfig("r", {"m": 3, "n": 1}),)


def test_a_route_splits_exactly_by_its_weights_and_interleaves() -> None:
    route = WeightedRoute(RouteConfig("r", {"a": 80, "b": 20}))
    picks = [route.pick() for _ in range(1000)]
    assert picks.count("b") == 200 and route.sent == {"a": 800, "b": 200}
    assert max(len(run) for run in "".join(picks).split("b")) <= 4  # never long runs of a


# -- kept state -----------------------------------------------------------------------------


def test_with_a_state_dir_every_change_is_kept_and_a_restart_resumes_from_it(
        tmp_path: Path) -> None:
    f = serving_rig(state_dir=str(tmp_path))
    apply(f, {**MLP, "factory_kwargs": {"seed": 1}}, {**MLP, "name": "n"},
          routes=[{"name": "r", "to": {"m": 1, "n": 1}}])
    f.handle(ScaleArgs("m", worlds=0))
    saved = f.took(SaveState)
    assert len(saved) == 2  # the apply, then the operator's scale
    state.save(str(tmp_path), saved[-1].state)
    original = config(state_dir=str(tmp_path))  # started again on its original file
    resumed_config, live = state.resume(original)
    assert [d.name for d in resumed_config.deployments] == ["m", "n"]
    assert resumed_config.deployment("m").factory_kwargs == {"seed": 1}
    assert [r.name for r in resumed_config.routes] == ["r"]
    dep = resumed(resumed_config.deployment("m"), live["m"])
    assert (dep.desired, dep.revision) == (0, 2)


def test_without_a_state_dir_nothing_is_kept(tmp_path: Path) -> None:
    f = serving_rig()
    apply(f, {**MLP, "factory_kwargs": {"seed": 1}})
    assert f.took(SaveState) == []
    assert state.resume(config()) == (config(), {})
    (tmp_path / state.STATE_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read the kept state"):
        state.resume(config(state_dir=str(tmp_path)))
