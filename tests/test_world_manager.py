"""The WorldManager actor applying its plans: messages in, records and worker messages out.

No processes and no sockets: workers are the messages they would send, the launcher is the real
``NoLauncher`` (workers join by themselves), the routers are real Routers whose sends are
recorded, and the clock is a number the test moves.
"""

from __future__ import annotations

from typing import Any

import pytest

from controller.commands import FromWorker, Scale, Tick, WorkerLost
from controller.config import Config, parse_config
from controller.fleet import WorkerState, WorldState
from controller.launcher import Launcher, LaunchError, NoLauncher
from controller.router import Router
from controller.worker_events import MAX_DEATHS
from controller.world_manager import WorldManager
from mesh.messages import (
    Heartbeat,
    Join,
    Joined,
    Leave,
    Message,
    Ping,
    Register,
    Shutdown,
    Welcome,
    WorldBroken,
)


def config(stages: int = 1, worlds: int = 1) -> Config:
    return parse_config({
        "controller": {"warm_workers": 0, "preload_warm": False, "launcher": "none"},
        "deployments": [{"name": "m", "model": "worker.models.mlp:build", "stages": stages,
                         "worlds": worlds, "min_worlds": 0}],
    })


class Fleet:
    """A WorldManager and what it sent to each worker."""

    def __init__(self, cfg: Config, launcher: Launcher | None = None) -> None:
        self.now = 100.0
        self.sent: list[tuple[str, Message]] = []
        self.watched: list[str] = []
        self.router = Router(cfg.deployments[0], send_client=lambda f: True,
                             send_worker=lambda f: True, next_rid=iter(range(1, 10**6)).__next__,
                             on_world_idle=lambda w: None, clock=lambda: self.now)
        self.wm = WorldManager(cfg, {"m": self.router}, launcher or NoLauncher(),
                               send_worker=self._send, on_watch=self.watched.append,
                               on_forget=lambda w: None, clock=lambda: self.now,
                               wall_clock=lambda: 1e9 + self.now)

    def _send(self, worker_id: str, message: Message) -> bool:
        self.sent.append((worker_id, message))
        return True

    def take(self, kind: type) -> list[tuple[str, Any]]:
        """Messages of ``kind`` sent since the last take (the others are kept)."""
        taken = [(w, m) for w, m in self.sent if isinstance(m, kind)]
        self.sent = [(w, m) for w, m in self.sent if not isinstance(m, kind)]
        return taken

    async def register(self, worker_id: str, pid: int) -> None:
        await self.wm.handle(FromWorker(worker_id, Register(
            worker_id=worker_id, pid=pid, host="h", device="cpu",
            store_addr=f"127.0.0.1:{pid}")))

    async def join_all(self) -> list[int]:
        """Every worker answers its pending joins; returns the world ids."""
        worlds = []
        for worker_id, join in self.take(Join):
            await self.wm.handle(FromWorker(worker_id, Joined(
                world_id=join.world_id, epoch=join.epoch,
                entry=f"{worker_id}/{join.world_id}" if join.rank == 0 else "")))
            worlds.append(join.world_id)
        return sorted(set(worlds))


async def test_registered_workers_are_welcomed_and_formed_into_a_serving_world() -> None:
    f = Fleet(config(stages=2))
    await f.register("a", 11)
    assert f.take(Welcome) == [("a", f.wm._welcome)] and f.take(Join) == []  # one is too few
    await f.register("b", 12)
    joins = f.take(Join)
    assert [(w, j.rank, j.size, j.deployment.name) for w, j in joins] == [
        ("a", 0, 2, "m"), ("b", 1, 2, "m")]
    assert joins[1][1].rendezvous == "127.0.0.1:11"  # rank 0's store
    f.sent += joins
    [world_id] = await f.join_all()
    assert f.wm.worlds[world_id].state == WorldState.SERVING
    assert f.router.worlds[world_id].entry == b"a/" + str(world_id).encode()
    assert {w.state for w in f.wm.workers.values()} == {WorkerState.SERVING}
    assert await f.wm.settled() == {}
    assert f.watched == ["a", "b"]


async def test_a_dead_worker_is_fenced_its_world_broken_and_a_replacement_formed() -> None:
    f = Fleet(config())
    await f.register("a", 11)
    [first] = await f.join_all()
    await f.register("b", 12)  # a spare
    await f.wm.handle(WorkerLost("a", "exited with -9"))
    assert first not in f.wm.worlds
    assert f.wm.workers["a"].state == WorkerState.DEAD
    assert [e["event"] for e in f.wm.events] == ["world_serving", "worker_dead", "world_broken"]
    [second] = await f.join_all()  # formed at once on the spare, under a new id
    assert second > first and f.wm.worlds[second].workers == ["b"]
    # The same process speaks again (its host was cut off, or it paused): it can join no
    # world of its old life, and is asked to leave them all and register again.
    await f.wm.handle(FromWorker("a", Heartbeat(seq=5)))
    await f.wm.handle(FromWorker("a", Joined(world_id=second, epoch=1)))
    assert f.wm.worlds[second].workers == ["b"]
    assert f.wm.workers["a"].state == WorkerState.DEAD
    assert f.take(Ping) == [("a", Ping(register=True))] and f.take(Shutdown) == []
    # Registering means it left them: it is the same worker again, not a conflict.
    await f.register("a", 11)
    assert f.wm.workers["a"].state == WorkerState.IDLE and f.take(Shutdown) == []
    assert [e["event"] for e in f.wm.events][-1] == "worker_rejoined"
    # A new process under the same id (restarted by its operator) is a new worker too.
    await f.wm.handle(WorkerLost("a", "no heartbeat for 1500 ms"))
    await f.register("a", 99)
    assert f.wm.workers["a"].state == WorkerState.IDLE and f.take(Shutdown) == []


async def test_operator_commands_name_unknown_deployments_and_refuse_an_identical_world(
        ) -> None:
    from controller.commands import FormWorld
    from mesh.errors import BadRequest, UnknownModel

    f = Fleet(config())
    await f.register("a", 11)
    [first] = await f.join_all()
    with pytest.raises(UnknownModel, match=r"no deployment named 'nope'; serving \['m'\]"):
        await f.wm.handle(Scale("nope", worlds=1))
    with pytest.raises(BadRequest, match=f"world {first} of m already runs on \\['a'\\]"):
        await f.wm.handle(FormWorld("m", ("a",)))


async def test_a_worker_that_keeps_dropping_off_is_quarantined_when_it_comes_back() -> None:
    f = Fleet(config())
    for _ in range(MAX_DEATHS):
        await f.register("a", 11)
        await f.join_all()
        assert not f.wm.workers["a"].quarantined
        await f.wm.handle(WorkerLost("a", "no heartbeat for 1500 ms"))
    await f.register("a", 11)
    a = f.wm.workers["a"]
    assert a.state == WorkerState.IDLE and a.quarantined.startswith("declared dead 3 times")
    assert f.take(Join) == []  # never given a world again
    assert "worker_quarantined" in [e["event"] for e in f.wm.events]


async def test_a_released_worker_ending_is_not_a_death_that_counts() -> None:
    f = Fleet(config())
    for _ in range(MAX_DEATHS):
        await f.register("a", 11)
        f.wm.workers["a"].retiring = True  # drained and released, then it went away
        await f.wm.handle(WorkerLost("a", "no heartbeat for 1500 ms"))
    await f.register("a", 11)
    assert not f.wm.workers["a"].quarantined and f.wm.workers["a"].deaths == []
    assert f.wm.workers_died == 0


async def test_our_own_worker_declared_dead_is_told_to_stop_if_it_speaks_again() -> None:
    f = Fleet(config())
    await f.register("a", 11)
    f.wm.workers["a"].spawned_by_us = True  # started by this controller's launcher
    await f.join_all()
    await f.wm.handle(WorkerLost("a", "no heartbeat for 1500 ms"))
    # Resumed after a pause, it registers again (directly, or asked to by a heartbeat
    # the controller no longer places): it was replaced, so it is told to stop.
    await f.register("a", 11)
    assert f.take(Shutdown) == [("a", Shutdown(reason="fenced: declared dead earlier"))]
    assert f.wm.workers.get("a") is None or f.wm.workers["a"].state == WorkerState.DEAD


async def test_a_broken_world_report_makes_the_peers_suspect_until_they_heartbeat() -> None:
    f = Fleet(config(stages=2))
    await f.register("a", 11)
    await f.register("b", 12)
    [world] = await f.join_all()
    f.take(Ping)
    await f.wm.handle(FromWorker("a", WorldBroken(world_id=world, epoch=1, reason="peer lost",
                                                  peer_lost=True)))
    assert world not in f.wm.worlds and world not in f.router.worlds
    assert f.take(Ping) == [("b", Ping(reply=True))]  # alive?
    assert sorted(w for w, m in f.take(Leave) if m.abort) == ["a", "b"]
    assert f.take(Join) == []  # b may be the one that died: no world on it yet
    f.now += 0.1
    await f.wm.handle(FromWorker("b", Heartbeat(seq=1)))
    assert [w for w, _ in f.take(Join)] == ["a", "b"]


async def test_a_report_from_an_earlier_epoch_or_a_stranger_world_changes_nothing() -> None:
    f = Fleet(config())
    await f.register("a", 11)
    [world] = await f.join_all()
    await f.wm.handle(FromWorker("a", WorldBroken(world_id=world, epoch=2, reason="old")))
    await f.wm.handle(FromWorker("a", WorldBroken(world_id=world + 7, epoch=1, reason="?")))
    await f.wm.handle(FromWorker("zz", WorldBroken(world_id=world, epoch=1, reason="stranger")))
    assert f.wm.worlds[world].state == WorldState.SERVING


async def test_a_formation_that_times_out_breaks_and_forms_again_under_a_new_id() -> None:
    f = Fleet(config())
    await f.register("a", 11)
    [(_, join)] = f.take(Join)
    f.now += 121.0  # world_form_timeout_ms is 120 s
    await f.wm.handle(Tick())
    assert join.world_id not in f.wm.worlds
    [(_, again)] = f.take(Join)
    assert again.world_id > join.world_id
    assert f.wm.events and list(f.wm.events)[-1]["reason"].startswith("not formed within")


async def test_a_join_without_an_answer_is_sent_again_each_second_until_it_is_answered(
        ) -> None:
    f = Fleet(config(stages=2))
    await f.register("a", 11)
    await f.register("b", 12)
    (_, join_a), (_, join_b) = f.take(Join)
    await f.wm.handle(FromWorker("a", Joined(world_id=join_a.world_id, epoch=1, entry="a/1")))
    f.now += 0.9
    await f.wm.handle(Tick())
    assert f.take(Join) == []
    f.now += 0.2
    await f.wm.handle(Tick())
    assert f.take(Join) == [("b", join_b)]  # the same join, to the one that did not answer
    world = f.wm.worlds[join_a.world_id]
    assert world.join_resends == 1 and world.state == WorldState.FORMING
    f.now += 1.0
    await f.wm.handle(Tick())
    assert f.take(Join) == [("b", join_b)]
    await f.wm.handle(FromWorker("b", Joined(world_id=join_b.world_id, epoch=1)))
    assert world.state == WorldState.SERVING
    # The answer to a repeat comes again: it changes nothing, and nothing is sent again.
    await f.wm.handle(FromWorker("b", Joined(world_id=join_b.world_id, epoch=1)))
    f.now += 5.0
    await f.wm.handle(Tick())
    assert world.state == WorldState.SERVING and f.take(Join) == [] and f.take(Leave) == []


async def test_a_world_joined_after_it_was_given_up_on_is_left_at_once() -> None:
    f = Fleet(config())
    await f.register("a", 11)
    [(_, join)] = f.take(Join)
    f.now += 121.0  # world_form_timeout_ms is 120 s: broken, and formed again
    await f.wm.handle(Tick())
    assert f.take(Leave) == [("a", Leave(world_id=join.world_id, epoch=1, abort=True))]
    f.take(Join)
    # The first join's answer, late: the worker holds a world nobody will route to.
    await f.wm.handle(FromWorker("a", Joined(world_id=join.world_id, epoch=1, entry="a/1")))
    assert f.take(Leave) == [("a", Leave(world_id=join.world_id, epoch=1, abort=True))]


async def test_scaling_down_drains_the_newest_world_and_scaling_up_forms_on_idle_ones() -> None:
    f = Fleet(config(worlds=2))
    for i, w in enumerate("abc"):
        await f.register(w, 10 + i)
    worlds = await f.join_all()
    assert len(worlds) == 2
    result = await f.wm.handle(Scale("m", worlds=1))
    assert result["worlds_desired"] == 1
    newest = max(worlds)
    assert f.wm.worlds[newest].state == WorldState.DRAINING
    assert not f.router.worlds[newest].routable
    await f.wm.handle(Scale("m", worlds=2))
    [third] = await f.join_all()  # on the idle worker c, not the draining world's
    assert f.wm.worlds[third].workers == ["c"]


async def test_a_worker_whose_worlds_keep_stalling_is_quarantined_and_not_picked_again() -> None:
    from controller.commands import WorldStalled

    f = Fleet(config())
    await f.register("a", 11)
    for _ in range(3):
        [world] = await f.join_all()
        assert f.wm.worlds[world].workers == ["a"]
        f.now += 30.0
        await f.wm.handle(WorldStalled(world, "no progress for 10.0s with 5 requests in flight"))
        f.take(Leave)
    assert f.wm.workers["a"].quarantined.startswith("3 of its worlds stalled")
    assert f.take(Join) == []  # not picked again
    await f.register("b", 12)
    [world] = await f.join_all()
    assert f.wm.worlds[world].workers == ["b"]
    assert [e["event"] for e in f.wm.events].count("worker_quarantined") == 1


async def test_requests_of_a_dead_shared_worker_are_not_re_sent_into_its_other_world() -> None:
    from controller.commands import FormWorld

    f = Fleet(config(stages=2, worlds=1))
    await f.register("a", 11)
    await f.register("c", 13)
    [first] = await f.join_all()  # [a, c]
    for wid, pid in (("b", 12), ("d", 14), ("e", 15)):
        await f.register(wid, pid)  # idle spares
    result = await f.wm.handle(FormWorld("m", ("a", "d")))  # a now serves two worlds
    [second] = await f.join_all()
    assert result["world"] == second and f.wm.workers["a"].worlds == {first, second}
    await f.wm.handle(FormWorld("m", ("b", "e")))
    [third] = await f.join_all()
    f.router._send_worker = lambda frames: True
    for i in range(9):
        f.router.submit(b"c", i, "infer", b"h", [], 10_000)
    held = {p.world.world_id for p in f.router.pending.values() if p.world is not None}
    assert held == {first, second, third}
    await f.wm.handle(WorkerLost("a", "exited with -9"))
    # Every request of a's two worlds went straight to b's world: one attempt each on the way.
    for p in f.router.pending.values():
        assert p.world is not None and p.world.world_id == third
        assert p.attempts <= 2, "a re-send was spent on a world of the dead worker"


class PodsLeftBehind:
    """The Launcher interface over pods a previous run of the controller left running
    (``left``: their worker ids), as the kubernetes launcher finds them after a restart;
    records what it is asked to start."""

    can_spawn = True

    def __init__(self, left: list[str]) -> None:
        self.left = left
        self.spawned: list[str] = []

    async def adopt(self, timeout_s: float) -> list[str]:
        return list(self.left)

    async def spawn(self, worker_id: str) -> int:
        if worker_id in self.left or worker_id in self.spawned:
            raise LaunchError(f"a pod for {worker_id} exists")
        self.spawned.append(worker_id)
        return 0

    async def stop(self, worker_id: str, timeout_s: float) -> None:
        return None

    def kill(self, worker_id: str, sig: int = 9) -> bool:
        return False

    def pids(self) -> dict[str, int]:
        return {w: 0 for w in [*self.left, *self.spawned]}

    def room(self) -> int:
        return 8

    def host(self) -> dict[str, int]:
        return {}

    async def aclose(self, timeout_s: float) -> None:
        return None


async def test_a_restarted_controller_adopts_its_launchers_workers_and_starts_new_ids_above(
        ) -> None:
    launcher = PodsLeftBehind(["w3", "w7"])
    f = Fleet(config(worlds=2), launcher)
    await f.wm.on_start()  # before the first plan: the pods are known before any is asked for
    adopted = [f.wm.workers[w] for w in ("w3", "w7")]
    assert all(w.state == WorkerState.STARTING and w.spawned_by_us for w in adopted)
    await f.wm.handle(Tick())
    assert launcher.spawned == []  # they are coming back: nothing new is started for them
    # An adopted worker still speaks of its old life: it is asked to register again.
    await f.wm.handle(FromWorker("w3", Heartbeat(seq=9)))
    assert f.take(Ping) == [("w3", Ping(register=True))]
    await f.register("w3", 1)
    await f.register("w7", 1)
    assert len(await f.join_all()) == 2
    await f.wm.handle(WorkerLost("w7", "exited with -9"))
    assert launcher.spawned == ["w8"]  # a new id, above every adopted one


async def test_adopted_workers_that_end_before_registering_are_no_launch_failures() -> None:
    launcher = PodsLeftBehind(["w1", "w2", "w3", "w4"])
    f = Fleet(config(), launcher)
    await f.wm.on_start()
    for worker_id in launcher.left:  # pods of the previous run, ending as it restarted
        await f.wm.handle(WorkerLost(worker_id, "exited with 0"))
    assert f.wm.spawn_quarantined == ""
    assert launcher.spawned == ["w5"]
