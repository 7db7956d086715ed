"""The WorldManager, the Fleet's shell: it applies the Fleet's effects to real routers, a
launcher and a watcher, and tells the Fleet what they gave.

No processes and no sockets: workers are the messages they would send, the launcher is a fake
of the Launcher interface, the routers are the real ``Routers`` whose sends are recorded. What
the Fleet decides is tests/test_fleet.py's; here, that its decisions reach the world intact.
"""

from __future__ import annotations

from typing import Any

from controller.config import Config, parse_config
from controller.fleet import Fleet
from controller.launcher import LaunchError
from controller.mailbox import FromWorker, Tick, WorkerLost
from controller.records import WorkerState
from controller.routers import Routers
from controller.world_manager import WorldManager
from mesh.messages import FormArgs, Heartbeat, Join, Joined, Message, Ping, Register


def config(stages: int = 1, worlds: int = 1) -> Config:
    return parse_config({
        "controller": {"warm_workers": 0, "preload_warm": False, "launcher": "local"},
        "deployments": [{"name": "m", "model": "worker.models.mlp:build", "stages": stages,
                         "worlds": worlds, "min_worlds": 0}],
    })


class PodsLeftBehind:
    """The Launcher interface over pods a previous run of the controller left running
    (``left``: their worker ids), as the kubernetes launcher finds them after a restart;
    records what it is asked to start, and fails a start it is told to."""

    can_spawn = True

    def __init__(self, left: list[str], fail: tuple[str, ...] = ()) -> None:
        self.left = left
        self.fail = fail
        self.spawned: list[str] = []
        self.stopped: list[str] = []

    async def adopt(self, timeout_s: float) -> list[str]:
        return list(self.left)

    async def spawn(self, worker_id: str) -> int:
        if worker_id in self.left or worker_id in self.spawned or worker_id in self.fail:
            raise LaunchError(f"a pod for {worker_id} exists")
        self.spawned.append(worker_id)
        return 1000 + len(self.spawned)

    async def stop(self, worker_id: str, timeout_s: float) -> None:
        self.stopped.append(worker_id)

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


class Watcher:
    def __init__(self) -> None:
        self.watched: list[str] = []

    def watch(self, worker_id: str) -> None:
        self.watched.append(worker_id)

    def forget(self, worker_id: str) -> None:
        return None


class Shell:
    """A WorldManager over a Fleet, real routers and a fake launcher; what it sent workers."""

    def __init__(self, cfg: Config, launcher: PodsLeftBehind) -> None:
        self.sent: list[tuple[str, Message]] = []
        self.to_workers: list[list[Any]] = []
        self.told: list[Any] = []
        self.routers = Routers(cfg, send_client=lambda frames: True,
                               send_worker=self._to_worker, tell=self.told.append)
        self.launcher = launcher
        self.watcher = Watcher()
        self.wm = WorldManager(Fleet(cfg), launcher, self.routers, self.watcher,
                               send_worker=self._send)

    def _send(self, worker_id: str, message: Message) -> bool:
        self.sent.append((worker_id, message))
        return True

    def _to_worker(self, frames: list[Any]) -> bool:
        self.to_workers.append(frames)
        return True

    async def register(self, worker_id: str, pid: int) -> None:
        await self.wm.handle(FromWorker(worker_id, Register(
            worker_id=worker_id, pid=pid, host="h", device="cpu",
            store_addr=f"127.0.0.1:{pid}")))

    async def join_all(self) -> list[int]:
        joins = [(w, m) for w, m in self.sent if isinstance(m, Join)]
        self.sent = [(w, m) for w, m in self.sent if not isinstance(m, Join)]
        for worker_id, join in joins:
            await self.wm.handle(FromWorker(worker_id, Joined(
                world_id=join.world_id, epoch=join.epoch,
                entry=f"{worker_id}/{join.world_id}" if join.rank == 0 else "")))
        return sorted({j.world_id for _, j in joins})


async def test_a_restarted_controller_adopts_its_launchers_workers_and_starts_new_ids_above(
        ) -> None:
    launcher = PodsLeftBehind(["w3", "w7"])
    s = Shell(config(worlds=2), launcher)
    await s.wm.on_start()  # before the first plan: the pods are known before any is asked for
    assert launcher.spawned == []  # they are coming back: nothing new is started for them
    await s.wm.handle(FromWorker("w3", Heartbeat(seq=9)))
    assert s.sent == [("w3", Ping(register=True))]
    await s.register("w3", 1)
    await s.register("w7", 2)
    assert len(await s.join_all()) == 2 and s.watcher.watched == ["w3", "w7"]
    assert await s.wm.settled() == {}
    await s.wm.handle(WorkerLost("w7", "exited with -9"))
    assert launcher.spawned == ["w8"]  # a new id, above every adopted one
    assert s.wm.fleet.workers["w8"].pid == 1001  # what the launcher gave is recorded


async def test_a_start_that_fails_is_recorded_and_not_retried_in_a_loop() -> None:
    launcher = PodsLeftBehind([], fail=("w1",))
    s = Shell(config(), launcher)
    await s.wm.handle(Tick())
    w1 = s.wm.fleet.workers["w1"]
    assert w1.state == WorkerState.DEAD and w1.reason.startswith("launch failed: a pod")
    assert launcher.spawned == []  # not retried within the same message
    await s.wm.handle(Tick())
    assert launcher.spawned == ["w2"]  # the next one tries again, under a new id


async def test_requests_of_a_dead_shared_worker_are_not_re_sent_into_its_other_world() -> None:
    s = Shell(config(stages=2, worlds=1), PodsLeftBehind([]))
    await s.register("a", 11)
    await s.register("c", 13)
    [first] = await s.join_all()  # [a, c]
    for wid, pid in (("b", 12), ("d", 14), ("e", 15)):
        await s.register(wid, pid)  # idle spares
    result = await s.wm.handle(FormArgs("m", ["a", "d"]))  # a now serves two worlds
    [second] = await s.join_all()
    assert result["world"] == second
    await s.wm.handle(FormArgs("m", ["b", "e"]))
    [third] = await s.join_all()
    router = s.routers["m"]
    assert set(s.routers.by_world) == {first, second, third}
    for i in range(9):
        router.submit(b"c", i, "infer", b"h", [], 10_000)
    held = {p.world.world_id for p in router.pending.values() if p.world is not None}
    assert held == {first, second, third}
    await s.wm.handle(FromWorker("a", Heartbeat(seq=1)))
    await s.wm.handle(WorkerLost("a", "exited with -9"))
    # Every request of a's two worlds went straight to b's world: one attempt each on the way.
    for p in router.pending.values():
        assert p.world is not None and p.world.world_id == third
        assert p.attempts <= 2, "a re-send was spent on a world of the dead worker"
    assert set(s.routers.by_world) == {third}
    broken = [e for e in s.wm.fleet.events if e["event"] == "world_broken"]
    assert sorted(e["world"] for e in broken) == [first, second]
    assert sum(e["resent"] for e in broken) == 6  # the router's count, in the events
