"""The Fleet, the controller's core: events and commands in, records and effects out.

No processes, sockets, tasks or event loop: workers are the messages they would send, the
launcher is the room it reports, the clock is a number the test moves, and what the Fleet
asks of the world (messages to workers, routes, workers to start) is read from its answer.
"""

from __future__ import annotations

from typing import Any

import pytest

from controller.config import Config, parse_config
from controller.effects import (
    DrainRoute,
    Effect,
    ForgetWorker,
    HoldRoute,
    KillWorker,
    RouteWorld,
    SendTo,
    Settled,
    SetUnavailable,
    StartWorker,
    StopWorker,
    UnrouteWorld,
    WatchWorker,
)
from controller.fleet import NO_LAUNCHER, Fleet, LauncherRoom
from controller.fleet_workers import MAX_DEATHS
from controller.mailbox import (
    Adopted,
    AutoScale,
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
from controller.records import WorkerState, WorldState
from mesh.errors import BadRequest, UnknownModel
from mesh.messages import (
    DrainArgs,
    Fault,
    FaultArgs,
    FormArgs,
    Heartbeat,
    Join,
    Joined,
    JoinFailed,
    Leave,
    Left,
    Message,
    Ping,
    Preload,
    Register,
    ScaleArgs,
    Shutdown,
    SloArgs,
    UnquarantineArgs,
    Welcome,
    WorldBroken,
)
from mesh.testing.clock import FakeClock


def config(stages: int = 1, worlds: int = 1, **controller: Any) -> Config:
    return parse_config({
        "controller": {"warm_workers": 0, "preload_warm": False, "launcher": "none",
                       **controller},
        "deployments": [{"name": "m", "model": "worker.models.mlp:build", "stages": stages,
                         "worlds": worlds, "min_worlds": 0}],
    })


class Rig:
    """A Fleet, the effects it returned so far, and a clock the test moves."""

    def __init__(self, cfg: Config, launcher: LauncherRoom = NO_LAUNCHER) -> None:
        self.clock = FakeClock(100.0)
        self.fleet = Fleet(cfg, clock=self.clock, wall_clock=lambda: 1e9 + self.clock())
        self.launcher = launcher
        self.effects: list[Effect] = []

    def handle(self, message: Any) -> Any:
        step = self.fleet.handle(message, self.launcher)
        self.effects += step.effects
        return step.result

    def take(self, kind: type[Message]) -> list[tuple[str, Any]]:
        """Messages of ``kind`` sent to workers since the last take (the rest are kept)."""
        taken = [(e.worker_id, e.message) for e in self.effects
                 if isinstance(e, SendTo) and isinstance(e.message, kind)]
        self.effects = [e for e in self.effects
                        if not (isinstance(e, SendTo) and isinstance(e.message, kind))]
        return taken

    def took(self, kind: type[Any]) -> list[Any]:
        """Effects of ``kind`` since the last look (the rest are kept)."""
        taken = [e for e in self.effects if isinstance(e, kind)]
        self.effects = [e for e in self.effects if not isinstance(e, kind)]
        return taken

    def register(self, worker_id: str, pid: int) -> None:
        self.handle(FromWorker(worker_id, Register(worker_id=worker_id, pid=pid, host="h",
                                                   device="cpu",
                                                   store_addr=f"127.0.0.1:{pid}")))

    def join_all(self) -> list[int]:
        """Every worker answers its pending joins; returns the world ids."""
        worlds = []
        for worker_id, join in self.take(Join):
            self.handle(FromWorker(worker_id, Joined(
                world_id=join.world_id, epoch=join.epoch,
                entry=f"{worker_id}/{join.world_id}" if join.rank == 0 else "")))
            worlds.append(join.world_id)
        return sorted(set(worlds))

    def events(self) -> list[str]:
        return [e["event"] for e in self.fleet.events]


# -- forming, serving, settling -------------------------------------------------------------


def test_registered_workers_are_welcomed_and_formed_into_a_serving_world() -> None:
    f = Rig(config(stages=2))
    f.register("a", 11)
    assert f.take(Welcome) == [("a", f.fleet.welcome)] and f.take(Join) == []  # too few
    assert f.took(Settled) == []
    f.register("b", 12)
    joins = f.take(Join)
    assert [(w, j.rank, j.size, j.deployment.name) for w, j in joins] == [
        ("a", 0, 2, "m"), ("b", 1, 2, "m")]
    assert joins[1][1].rendezvous == "127.0.0.1:11"  # rank 0's store
    f.effects += [SendTo(w, j) for w, j in joins]
    [world_id] = f.join_all()
    assert f.fleet.worlds[world_id].state == WorldState.SERVING
    [route] = f.took(RouteWorld)
    assert (route.world_id, route.entry, route.deployment) == (
        world_id, b"a/" + str(world_id).encode(), "m")
    assert {w.state for w in f.fleet.workers.values()} == {WorkerState.SERVING}
    assert f.took(Settled) == [Settled({})]  # the ready line, once
    f.handle(Tick())
    assert f.took(Settled) == []
    assert f.took(WatchWorker) == [WatchWorker("a"), WatchWorker("b")]


def test_a_tick_pings_every_registered_live_worker() -> None:
    f = Rig(config())
    f.register("a", 11)
    f.register("b", 12)
    f.handle(WorkerLost("b", "exited with -9"))
    f.take(Ping)
    f.handle(Tick())
    assert f.take(Ping) == [("a", Ping())]


def test_a_join_failure_backs_off_then_quarantines_the_deployment_until_scaled() -> None:
    f = Rig(config(max_load_failures=2))
    f.register("a", 11)
    [(_, join)] = f.take(Join)
    f.handle(FromWorker("a", JoinFailed(world_id=join.world_id, epoch=1, error="no module x")))
    assert join.world_id not in f.fleet.worlds and f.take(Join) == []  # backing off 0.5 s
    assert f.fleet.deployments["m"].last_error == "no module x"
    f.clock.advance(0.6)
    f.handle(Tick())
    [(_, again)] = f.take(Join)
    f.handle(FromWorker("a", JoinFailed(world_id=again.world_id, epoch=1, error="no module x")))
    assert f.fleet.deployments["m"].quarantined.startswith("2 formation failures in a row")
    assert f.took(SetUnavailable) == [SetUnavailable("m", "quarantined after " +
                                                     f.fleet.deployments["m"].quarantined)]
    assert f.took(Settled) == [Settled({"m": f.fleet.unavailable_reason(
        f.fleet.deployments["m"])})]
    f.clock.advance(100.0)
    f.handle(Tick())
    assert f.take(Join) == []
    f.handle(ScaleArgs("m", worlds=1))  # the operator lifts it
    assert f.took(SetUnavailable) == [SetUnavailable("m", "")]
    assert len(f.take(Join)) == 1


# -- deaths, fencing, quarantine ------------------------------------------------------------


def test_a_dead_worker_is_fenced_its_world_broken_and_a_replacement_formed() -> None:
    f = Rig(config())
    f.register("a", 11)
    [first] = f.join_all()
    f.register("b", 12)  # a spare
    f.handle(WorkerLost("a", "exited with -9"))
    assert first not in f.fleet.worlds
    assert f.fleet.workers["a"].state == WorkerState.DEAD
    assert f.events() == ["world_serving", "worker_dead", "world_broken"]
    assert f.took(UnrouteWorld) == [UnrouteWorld("m", first, "worker a exited with -9")]
    assert ForgetWorker("a") in f.took(ForgetWorker) and f.took(KillWorker) == []
    [second] = f.join_all()  # formed at once on the spare, under a new id
    assert second > first and f.fleet.worlds[second].workers == ["b"]
    # The same process speaks again (its host was cut off, or it paused): it can join no
    # world of its old life, and is asked to leave them all and register again.
    f.handle(FromWorker("a", Heartbeat(seq=5)))
    f.handle(FromWorker("a", Joined(world_id=second, epoch=1)))
    assert f.fleet.worlds[second].workers == ["b"]
    assert f.fleet.workers["a"].state == WorkerState.DEAD
    assert f.take(Ping) == [("a", Ping(register=True))] and f.take(Shutdown) == []
    # Registering means it left them: it is the same worker again, not a conflict.
    f.register("a", 11)
    assert f.fleet.workers["a"].state == WorkerState.IDLE and f.take(Shutdown) == []
    assert f.events()[-1] == "worker_rejoined"
    # A new process under the same id (restarted by its operator) is a new worker too.
    f.handle(WorkerLost("a", "no heartbeat for 1500 ms", kill=True))
    assert f.took(KillWorker) == [KillWorker("a")]
    f.register("a", 99)
    assert f.fleet.workers["a"].state == WorkerState.IDLE and f.take(Shutdown) == []


def test_a_broken_worlds_event_and_log_get_its_re_sent_requests_from_the_router() -> None:
    f = Rig(config())
    f.register("a", 11)
    [world] = f.join_all()
    f.handle(WorldUnreachable(world))
    [unroute] = f.took(UnrouteWorld)
    assert unroute.reason == "its stage-0 worker's data socket is unreachable"
    assert list(f.fleet.events)[-1]["resent"] == 0
    f.effects.clear()
    f.handle(Unrouted(world, 7))
    assert f.effects == []  # nothing to plan: only the figure comes in
    assert list(f.fleet.events)[-1]["resent"] == 7
    f.handle(Unrouted(world, 9))  # told once; a second answer changes nothing
    assert list(f.fleet.events)[-1]["resent"] == 7


def test_a_worker_that_keeps_dropping_off_is_quarantined_when_it_comes_back() -> None:
    f = Rig(config())
    for _ in range(MAX_DEATHS):
        f.register("a", 11)
        f.join_all()
        assert not f.fleet.workers["a"].quarantined
        f.handle(WorkerLost("a", "no heartbeat for 1500 ms"))
    f.register("a", 11)
    a = f.fleet.workers["a"]
    assert a.state == WorkerState.IDLE and a.quarantined.startswith("declared dead 3 times")
    assert f.take(Join) == []  # never given a world again
    assert "worker_quarantined" in f.events()


def test_a_released_worker_ending_is_not_a_death_that_counts() -> None:
    f = Rig(config())
    for _ in range(MAX_DEATHS):
        f.register("a", 11)
        f.fleet.workers["a"].retiring = True  # drained and released, then it went away
        f.handle(WorkerLost("a", "no heartbeat for 1500 ms"))
    f.register("a", 11)
    assert not f.fleet.workers["a"].quarantined and f.fleet.workers["a"].deaths == []
    assert f.fleet.workers_died == 0


def test_our_own_worker_declared_dead_is_told_to_stop_if_it_speaks_again() -> None:
    f = Rig(config())
    f.register("a", 11)
    f.fleet.workers["a"].spawned_by_us = True  # started by this controller's launcher
    f.join_all()
    f.handle(WorkerLost("a", "no heartbeat for 1500 ms"))
    # Resumed after a pause, it registers again (directly, or asked to by a heartbeat the
    # controller no longer places): it was replaced, so it is told to stop.
    f.register("a", 11)
    assert f.take(Shutdown) == [("a", Shutdown(reason="fenced: declared dead earlier"))]
    assert f.fleet.workers["a"].state == WorkerState.DEAD


def test_a_broken_world_report_makes_the_peers_suspect_until_they_heartbeat() -> None:
    f = Rig(config(stages=2))
    f.register("a", 11)
    f.register("b", 12)
    [world] = f.join_all()
    f.take(Ping)
    f.handle(FromWorker("a", WorldBroken(world_id=world, epoch=1, reason="peer lost",
                                         peer_lost=True)))
    assert world not in f.fleet.worlds and [u.world_id for u in f.took(UnrouteWorld)] == [world]
    assert f.take(Ping) == [("b", Ping(reply=True))]  # alive?
    assert sorted(w for w, m in f.take(Leave) if m.abort) == ["a", "b"]
    assert f.take(Join) == []  # b may be the one that died: no world on it yet
    f.clock.advance(0.1)
    f.handle(FromWorker("b", Heartbeat(seq=1)))
    assert [w for w, _ in f.take(Join)] == ["a", "b"]


def test_a_report_from_an_earlier_epoch_or_a_stranger_world_changes_nothing() -> None:
    f = Rig(config())
    f.register("a", 11)
    f.register("zz", 12)
    [world] = f.join_all()
    f.handle(FromWorker("a", WorldBroken(world_id=world, epoch=2, reason="old")))
    f.handle(FromWorker("a", WorldBroken(world_id=world + 7, epoch=1, reason="?")))
    f.handle(FromWorker("zz", WorldBroken(world_id=world, epoch=1, reason="stranger")))
    assert f.fleet.worlds[world].state == WorldState.SERVING
    assert f.fleet.foreign_messages == 1


def test_a_worker_whose_worlds_keep_stalling_is_quarantined_and_not_picked_again() -> None:
    f = Rig(config())
    f.register("a", 11)
    for _ in range(3):
        [world] = f.join_all()
        assert f.fleet.worlds[world].workers == ["a"]
        f.clock.advance(30.0)
        f.handle(WorldStalled(world, "no progress for 10.0s with 5 requests in flight"))
        f.take(Leave)
    assert f.fleet.workers["a"].quarantined.startswith("3 of its worlds stalled")
    assert f.take(Join) == []  # not picked again
    f.register("b", 12)
    [world] = f.join_all()
    assert f.fleet.worlds[world].workers == ["b"]
    assert f.events().count("worker_quarantined") == 1


def test_a_dead_shared_workers_worlds_are_all_held_before_the_first_is_removed() -> None:
    """Requests re-sent from the first world must not be sent into the next one, which is
    also dead: every route of the worker's worlds is held before any is removed."""
    f = Rig(config(stages=2, worlds=1))
    f.register("a", 11)
    f.register("c", 13)
    [first] = f.join_all()  # [a, c]
    for wid, pid in (("b", 12), ("d", 14), ("e", 15)):
        f.register(wid, pid)  # idle spares
    result = f.handle(FormArgs("m", ["a", "d"]))  # a now serves two worlds
    [second] = f.join_all()
    assert result["world"] == second and f.fleet.workers["a"].worlds == {first, second}
    f.effects.clear()
    f.handle(WorkerLost("a", "exited with -9"))
    routes = [e for e in f.effects if isinstance(e, HoldRoute | UnrouteWorld)]
    assert [(type(e).__name__, e.world_id) for e in routes] == [
        ("HoldRoute", first), ("HoldRoute", second),
        ("UnrouteWorld", first), ("UnrouteWorld", second)]


# -- formation timeouts and lost joins ------------------------------------------------------


def test_a_formation_that_times_out_breaks_and_forms_again_under_a_new_id() -> None:
    f = Rig(config())
    f.register("a", 11)
    [(_, join)] = f.take(Join)
    f.clock.advance(121.0)  # world_form_timeout_ms is 120 s
    f.handle(Tick())
    assert join.world_id not in f.fleet.worlds
    [(_, again)] = f.take(Join)
    assert again.world_id > join.world_id
    assert list(f.fleet.events)[-1]["reason"].startswith("not formed within")


def test_a_join_without_an_answer_is_sent_again_each_second_until_it_is_answered() -> None:
    f = Rig(config(stages=2))
    f.register("a", 11)
    f.register("b", 12)
    (_, join_a), (_, join_b) = f.take(Join)
    f.handle(FromWorker("a", Joined(world_id=join_a.world_id, epoch=1, entry="a/1")))
    f.clock.advance(0.9)
    f.handle(Tick())
    assert f.take(Join) == []
    f.clock.advance(0.2)
    f.handle(Tick())
    assert f.take(Join) == [("b", join_b)]  # the same join, to the one that did not answer
    world = f.fleet.worlds[join_a.world_id]
    assert world.join_resends == 1 and world.state == WorldState.FORMING
    f.clock.advance(1.0)
    f.handle(Tick())
    assert f.take(Join) == [("b", join_b)]
    f.handle(FromWorker("b", Joined(world_id=join_b.world_id, epoch=1)))
    assert world.state == WorldState.SERVING
    # The answer to a repeat comes again: it changes nothing, and nothing is sent again.
    f.handle(FromWorker("b", Joined(world_id=join_b.world_id, epoch=1)))
    f.clock.advance(5.0)
    f.handle(Tick())
    assert world.state == WorldState.SERVING and f.take(Join) == [] and f.take(Leave) == []


def test_a_world_joined_after_it_was_given_up_on_is_left_at_once() -> None:
    f = Rig(config())
    f.register("a", 11)
    [(_, join)] = f.take(Join)
    f.clock.advance(121.0)  # world_form_timeout_ms is 120 s: broken, and formed again
    f.handle(Tick())
    assert f.take(Leave) == [("a", Leave(world_id=join.world_id, epoch=1, abort=True))]
    f.take(Join)
    # The first join's answer, late: the worker holds a world nobody will route to.
    f.handle(FromWorker("a", Joined(world_id=join.world_id, epoch=1, entry="a/1")))
    assert f.take(Leave) == [("a", Leave(world_id=join.world_id, epoch=1, abort=True))]


# -- operators and the autoscaler -----------------------------------------------------------


def test_operator_commands_name_unknown_deployments_and_refuse_an_identical_world() -> None:
    f = Rig(config())
    f.register("a", 11)
    [first] = f.join_all()
    f.effects.clear()
    with pytest.raises(UnknownModel, match=r"no deployment named 'nope'; serving \['m'\]"):
        f.handle(ScaleArgs("nope", worlds=1))
    with pytest.raises(BadRequest, match=f"world {first} of m already runs on \\['a'\\]"):
        f.handle(FormArgs("m", ["a"]))
    with pytest.raises(BadRequest, match="lies outside"):
        f.handle(ScaleArgs("m", worlds=9))
    assert f.effects == []  # a refused command changes nothing and does nothing


def test_scaling_down_drains_the_newest_world_and_scaling_up_forms_on_idle_ones() -> None:
    f = Rig(config(worlds=2))
    for i, w in enumerate("abc"):
        f.register(w, 10 + i)
    worlds = f.join_all()
    assert len(worlds) == 2
    result = f.handle(ScaleArgs("m", worlds=1))
    assert result["worlds_desired"] == 1
    newest = max(worlds)
    assert f.fleet.worlds[newest].state == WorldState.DRAINING
    assert f.took(DrainRoute) == [DrainRoute("m", newest)]
    f.handle(ScaleArgs("m", worlds=2))
    [third] = f.join_all()  # on the idle worker c, not the draining world's
    assert f.fleet.worlds[third].workers == ["c"]
    members = list(f.fleet.worlds[newest].workers)
    f.take(Leave)
    f.handle(WorldIdle(newest))  # the drained world answered its last request
    assert newest not in f.fleet.worlds
    assert f.took(UnrouteWorld)[-1] == UnrouteWorld("m", newest, "released")
    assert f.take(Leave) == [(w, Leave(world_id=newest, epoch=1, abort=False)) for w in members]
    assert all(f.fleet.workers[w].state == WorkerState.IDLE for w in members)


def test_the_autoscaler_moves_the_target_within_the_bounds_the_operator_set() -> None:
    f = Rig(config(worlds=1))
    f.handle(ScaleArgs("m", min_worlds=1, max_worlds=3))
    assert f.handle(AutoScale("m", 3, "p99 over target")) == {"deployment": "m",
                                                              "worlds_desired": 3}
    scaled = [e for e in f.fleet.events if e["event"] == "scaled"]
    assert scaled[-1]["by"] == "autoscaler" and scaled[-1]["reason"] == "p99 over target"
    assert f.handle(SloArgs("m", 250.0)) == {"deployment": "m", "slo_p99_ms": 250.0}
    assert f.fleet.deployments["m"].slo_p99_ms == 250.0


def test_draining_a_worker_moves_its_world_and_then_stops_it() -> None:
    f = Rig(config())
    f.register("a", 11)
    f.register("b", 12)
    [world] = f.join_all()
    owner = f.fleet.worlds[world].workers[0]
    assert f.handle(DrainArgs(owner)) == {"drained": "worker", "id": owner}
    assert f.fleet.workers[owner].state == WorkerState.DRAINING
    f.handle(WorldIdle(world))
    assert f.take(Shutdown) == [(owner, Shutdown(reason="released"))]
    with pytest.raises(BadRequest, match="no live worker or world named 'x'"):
        f.handle(DrainArgs("x"))


def test_a_fault_goes_to_a_live_worker_only() -> None:
    f = Rig(config())
    f.register("a", 11)
    f.handle(FaultArgs("a", delay_ms=5.0, drop_joins=1))
    assert f.take(Fault) == [("a", Fault(delay_ms=5.0, drop_joins=1))]
    with pytest.raises(BadRequest, match="is not live"):
        f.handle(FaultArgs("nobody", delay_ms=5.0))


# -- the launcher ---------------------------------------------------------------------------


def test_missing_workers_are_started_under_new_ids_and_a_failed_start_is_recorded() -> None:
    f = Rig(config(stages=2, warm_workers=1, launcher="local"),
            LauncherRoom(can_spawn=True, room=2))
    f.handle(Tick())
    assert f.took(StartWorker) == [StartWorker("w1"), StartWorker("w2")]  # room for two
    assert {w.state for w in f.fleet.workers.values()} == {WorkerState.STARTING}
    f.handle(Started("w1", 4242))
    assert f.fleet.workers["w1"].pid == 4242
    f.launcher = LauncherRoom(can_spawn=True, room=0)
    f.handle(StartFailed("w2", "no room on the host"))
    assert f.fleet.workers["w2"].state == WorkerState.DEAD
    assert f.fleet.workers["w2"].reason == "launch failed: no room on the host"
    assert "launcher_full" in f.events()  # wanted 2 + 1 warm, running 1, no room


def test_workers_that_die_before_registering_back_off_then_stop_the_launcher() -> None:
    f = Rig(config(max_load_failures=2, launcher="local"), LauncherRoom(True, 4))
    f.handle(Tick())
    [first] = f.took(StartWorker)
    f.handle(WorkerLost(first.worker_id, "exited with 1"))
    assert f.took(StartWorker) == []  # backing off 0.5 s
    f.clock.advance(0.6)
    f.handle(Tick())
    [second] = f.took(StartWorker)
    f.handle(WorkerLost(second.worker_id, "exited with 1"))
    assert f.fleet.spawn_quarantined.startswith("2 workers in a row died before registering")
    assert f.took(SetUnavailable)[-1].reason.startswith("no worker can be started")
    f.clock.advance(100.0)
    f.handle(Tick())
    assert f.took(StartWorker) == []


def test_idle_workers_beyond_the_warm_pool_are_retired_and_stopped() -> None:
    f = Rig(config(worlds=0, launcher="local"), LauncherRoom(True, 4))
    f.register("w1", 11)
    f.fleet.workers["w1"].spawned_by_us = True
    f.handle(Tick())
    assert f.take(Shutdown) == [("w1", Shutdown(reason="released"))]
    assert f.took(StopWorker) == [StopWorker("w1")]
    assert ForgetWorker("w1") in f.took(ForgetWorker)  # its silence is no hang


def test_a_warm_worker_preloads_every_stage_once() -> None:
    f = Rig(config(stages=2, worlds=0, warm_workers=1, preload_warm=True))
    f.register("a", 11)
    assert [(w, p.rank) for w, p in f.take(Preload)] == [("a", 0), ("a", 1)]
    f.handle(Tick())
    assert f.take(Preload) == []


def test_a_restarted_controller_adopts_its_launchers_workers_and_numbers_new_ones_above(
        ) -> None:
    f = Rig(config(worlds=2, launcher="local"), LauncherRoom(True, 8))
    f.handle(Adopted(("w3", "w7")))  # before the first plan
    adopted = [f.fleet.workers[w] for w in ("w3", "w7")]
    assert all(w.state == WorkerState.STARTING and w.spawned_by_us for w in adopted)
    assert f.took(StartWorker) == []  # they are coming back: nothing new is started
    # An adopted worker still speaks of its old life: it is asked to register again.
    f.handle(FromWorker("w3", Heartbeat(seq=9)))
    assert f.take(Ping) == [("w3", Ping(register=True))]
    f.register("w3", 1)
    f.register("w7", 2)
    assert len(f.join_all()) == 2
    f.handle(WorkerLost("w7", "exited with -9"))
    assert f.took(StartWorker) == [StartWorker("w8")]  # a new id, above every adopted one


def test_adopted_workers_that_end_before_registering_are_no_launch_failures() -> None:
    f = Rig(config(launcher="local"), LauncherRoom(True, 8))
    f.handle(Adopted(("w1", "w2", "w3", "w4")))
    for worker_id in ("w1", "w2", "w3", "w4"):  # the previous run's, ending as it restarted
        f.handle(WorkerLost(worker_id, "exited with 0"))
    assert f.fleet.spawn_quarantined == ""
    assert f.took(StartWorker) == [StartWorker("w5")]


def test_stopping_tells_every_live_worker_and_plans_nothing_more() -> None:
    f = Rig(config(launcher="local"), LauncherRoom(True, 8))
    f.register("a", 11)
    f.register("b", 12)
    f.handle(WorkerLost("b", "exited with -9"))
    f.effects.clear()
    f.handle(Stopping())
    assert f.take(Shutdown) == [("a", Shutdown(reason="controller stopping"))]
    f.handle(WorkerLost("a", "exited with 0"))
    assert f.took(StartWorker) == [] and f.fleet.workers_died == 1  # b's death only
    f.handle(FromWorker("c", Left(world_id=1, epoch=1)))
    assert f.take(Ping) == []  # nobody is asked to register while stopping


def test_an_operator_gives_a_quarantined_worker_worlds_again() -> None:
    f = Rig(config())
    f.register("a", 11)
    for _ in range(3):
        [world] = f.join_all()
        f.clock.advance(30.0)
        f.handle(WorldStalled(world, "no progress for 10.0s with 5 requests in flight"))
    assert f.fleet.workers["a"].quarantined and f.take(Join) == []
    with pytest.raises(BadRequest, match="worker 'b' is not quarantined"):
        f.handle(UnquarantineArgs("b"))
    result = f.handle(UnquarantineArgs("a"))
    assert result == {"worker": "a", "was": "3 of its worlds stalled within 600s"}
    assert f.events()[-1] == "worker_unquarantined"
    assert [w for w, _ in f.take(Join)] == ["a"]  # picked again at once
    assert f.fleet.workers["a"].stalls == []
