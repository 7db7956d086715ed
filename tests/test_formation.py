"""Formations that go wrong: a join lost on its way, and a join that comes twice.

The worker's answers to repeated joins are tested on the agent itself, its link a fake that
records what it sends. The fault runs with real processes and real gloo: a join lost used to
leave its world forming until ``world_form_timeout_ms`` (120 s by default; 60 s here, so code
that waits it out fails the 5 s check, not the test's timeout). The test injects the fault (a
join dropped by the worker's test-only ``drop_joins`` fault hook), checks that it happened, and
asserts the promise: the deployment serves again within 5 s, every request answered once.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from typing import Any

import pytest

from controller.admin_client import admin_call
from controller.config import parse_config
from mesh.messages import Join, Joined, Leave, Left, Message
from tests.cluster import Cluster, alive
from tests.conftest import StartCluster
from tests.load import LedgerClient, Load
from worker.agent import WorkerAgent

PIPELINE = """
[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
factory_kwargs = { hidden = 128 }
stages = 2
worlds = 1
max_worlds = 2
default_timeout_ms = 15000
"""
# Long enough that waiting it out fails the tests' 5 s checks; every recovery tested here
# must come from something else.
FORM_TIMEOUT = "world_form_timeout_ms = 60000"
RECOVERY_S = 5.0


# -- a worker answers a join once per world and epoch ------------------------------------


class RecordingLink:
    """The agent's link to the controller, reduced to what it sends."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send(self, message: Message) -> None:
        self.sent.append(message)


@pytest.fixture
def agent() -> Any:
    """A worker agent that is never started: its joins are driven by hand."""
    agent = WorkerAgent(controller="tcp://127.0.0.1:9", worker_id="w1", device="cpu")
    agent._link.close()
    agent._link = RecordingLink()  # type: ignore[assignment]
    yield agent
    agent._loader_pool.shutdown()
    agent._form_pool.shutdown()
    agent._context.term()


def join(world_id: int = 5, epoch: int = 1) -> Join:
    deployment = parse_config({"deployments": [
        {"name": "m", "model": "worker.models.mlp:build", "stages": 2}]}).deployments[0]
    return Join(world_id=world_id, epoch=epoch, rank=1, size=2, deployment=deployment)


async def test_a_join_repeated_while_its_world_forms_is_neither_formed_again_nor_answered(
        agent: Any) -> None:
    agent._joining[5, 1] = False  # the first join of world 5/1 is loading or forming
    await agent._join(join())
    assert agent._link.sent == []  # answered once, when the formation ends
    assert len(agent._stages) == 0  # nothing loaded, nothing formed for the repeat


async def test_a_join_repeated_after_the_world_was_joined_gets_the_same_answer_again(
        agent: Any) -> None:
    from types import SimpleNamespace

    first = Joined(world_id=5, epoch=1, load_ms=12.0, describe={"outputs": {"y": {}}},
                   entry="w1/5.1.t")
    agent._runners[5] = SimpleNamespace(world=SimpleNamespace(epoch=1))
    agent._joined[5] = first
    await agent._join(join())
    assert agent._link.sent == [first]  # with its description: the first may have been lost


async def test_a_join_that_arrives_after_its_leave_is_answered_left_and_never_formed(
        agent: Any) -> None:
    await agent._leave(Leave(world_id=5, epoch=1, abort=True))
    await agent._join(join())
    assert agent._link.sent == [Left(world_id=5, epoch=1)] * 2
    assert len(agent._stages) == 0


# -- the faults, with real processes -------------------------------------------------------


def worker(status: dict[str, Any], worker_id: str) -> dict[str, Any]:
    return next(w for w in status["workers"] if w["id"] == worker_id)


def idle_preloaded(status: dict[str, Any], n: int) -> bool:
    """``n`` idle workers that have preloaded both stages (a world forms on them in ms)."""
    return sum(w["state"] == "idle" and w["stages_loaded"] == 2
               for w in status["workers"]) >= n


async def wait_for_log(cluster: Cluster, pattern: str, timeout_s: float) -> str:
    """The first line of the controller's log (its workers write there too) that matches."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = re.search(pattern, cluster.log_path.read_text(errors="replace"))
        if found:
            return found.group(0)
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line matching {pattern!r} within {timeout_s}s; "
                                 f"log tail:\n{cluster.log_tail()}")
        await asyncio.sleep(0.1)


async def test_a_join_dropped_once_is_sent_again_and_the_deployment_serves_within_five_seconds(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(PIPELINE, controller=f"warm_workers = 2\n{FORM_TIMEOUT}")
    status = await cluster.wait_for(lambda s: idle_preloaded(s, 2), what="two warm workers")
    (world,) = status["worlds"]
    victim = world["workers"][1]
    pid = worker(status, victim)["pid"]
    # Every worker the replacement world may be formed on loses the first join it receives.
    survivors = [w["id"] for w in status["workers"] if w["id"] != victim]
    for wid in survivors:
        await admin_call(cluster.admin, "fault", {"worker": wid, "drop_joins": 1})
    async with LedgerClient(cluster.client) as client:
        async with Load(client, callers=2) as load:
            await asyncio.sleep(0.5)
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            status = await cluster.wait_for(
                lambda s: any(w["state"] == "serving" and victim not in w["workers"]
                              for w in s["worlds"]),
                timeout_s=RECOVERY_S, what="a replacement world serving")
            recovered_s = time.monotonic() - killed_at
            assert not alive(pid)
            (replacement,) = [w for w in status["worlds"] if w["state"] == "serving"]
            # The fault really fired: the replacement's joins were lost and sent again.
            await wait_for_log(cluster, rf"join of world {replacement['id']}/1 dropped", 1.0)
            assert replacement["join_resends"] >= 1, replacement
            await asyncio.sleep(0.5)
    print(f"serving again {recovered_s:.2f}s after the kill, "
          f"{replacement['join_resends']} join re-send(s)")
    load.assert_exactly_once()
    assert load.errors == [], load.errors[:3]
