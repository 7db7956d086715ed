"""Fault tolerance with real processes: crashes, hangs, shared workers, streams, crash loops.

Every test injects its fault for real (SIGKILL, SIGSTOP), checks that it happened, and asserts
the promise from the client's own ledger: every request answered exactly once, and no error
while another world could answer.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mesh.testing.cluster import Cluster
from mesh.testing.configs import write_config
from mesh.testing.ledger import LedgerClient
from mesh.testing.ports import free_ports
from mesh.testing.processes import alive
from mesh.testing.waits import until
from tests.cluster import dies_with_pytest
from tests.conftest import StartCluster
from tests.load import Load

pytestmark = pytest.mark.integration

PIPELINE = """
[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
factory_kwargs = { hidden = 128 }
stages = 2
worlds = 2
max_worlds = 4
default_timeout_ms = 15000
"""


def declared_dead(status: dict[str, Any], worker_id: str) -> bool:
    """Whether the controller has declared this worker dead."""
    return any(e["event"] == "worker_dead" and e["worker"] == worker_id
               for e in status["events"])


async def form_shared_world(cluster: Cluster) -> tuple[str, dict[str, Any]]:
    """Add a world that reuses world A's stage-0 worker; returns (shared worker, status)."""
    status = await cluster.wait_for(
        lambda s: sum(w["state"] == "serving" for w in s["worlds"]) >= 2
        and any(w["state"] == "idle" for w in s["workers"]), what="2 worlds and a warm worker")
    shared = status["worlds"][0]["workers"][0]
    idle = next(w["id"] for w in status["workers"] if w["state"] == "idle")
    proc = await asyncio.to_thread(cluster.meshctl, "form", "mlp", shared, idle)
    assert proc.returncode == 0, proc.stderr
    status = await cluster.wait_for(
        lambda s: sum(w["state"] == "serving" for w in s["worlds"]) == 3, what="3 worlds")
    return shared, status


async def test_chaos_three_kills_answer_every_request_exactly_once(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(PIPELINE, controller="warm_workers = 1")
    shared, status = await form_shared_world(cluster)
    by_id = {w["id"]: w for w in status["workers"]}
    assert len(by_id[shared]["worlds"]) == 2
    rng = random.Random(11)
    killed: list[int] = []
    async with LedgerClient(cluster.client) as client:
        async with Load(client) as load:
            await load.answered(80)
            for round_ in range(3):
                status = await cluster.status()
                candidates = [w for w in status["workers"] if w["state"] == "serving"]
                # The first kill takes the shared worker: two worlds break at once.
                victim = (next(w for w in candidates if w["id"] == shared) if round_ == 0
                          else rng.choice(candidates))
                os.kill(victim["pid"], signal.SIGKILL)
                killed.append(victim["pid"])
                await until(lambda v=victim: not alive(v["pid"]), 0.5, "the victim gone")
                # The next kill lands on a fleet that has noticed this one, re-formed its
                # worlds, and serves again.
                await cluster.wait_for(
                    lambda s, v=victim: declared_dead(s, v["id"])
                    and sum(w["state"] == "serving" for w in s["worlds"]) >= 3,
                    timeout_s=30, what="the kill noticed and the worlds re-formed")
                await load.answered(80)
    load.assert_exactly_once()
    assert load.errors == [], load.errors[:3]
    assert load.ok > 200
    status = await cluster.status()
    broken = [e for e in status["events"] if e["event"] == "world_broken"]
    assert len(broken) >= 4  # the shared worker alone broke two worlds
    # Kills land under load: the broken worlds had requests in flight, re-sent elsewhere
    # (and, per the ledger above, answered once).
    assert sum(e["resent"] for e in broken) >= 1


async def test_killing_the_shared_worker_breaks_both_its_worlds_and_both_are_reformed(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(PIPELINE, controller="warm_workers = 1")
    shared, status = await form_shared_world(cluster)
    shared_worlds = {w["id"] for w in status["worlds"] if shared in w["workers"]}
    other = next(w["id"] for w in status["worlds"] if shared not in w["workers"])
    assert len(shared_worlds) == 2
    pid = next(w["pid"] for w in status["workers"] if w["id"] == shared)
    async with LedgerClient(cluster.client) as client:
        async with Load(client) as load:
            await load.answered(50)
            os.kill(pid, signal.SIGKILL)
            status = await cluster.wait_for(
                lambda s: shared_worlds <= {e["world"] for e in s["events"]
                                            if e["event"] == "world_broken"},
                timeout_s=5, what="both shared worlds broken")
            assert other not in {e["world"] for e in status["events"]
                                 if e["event"] == "world_broken"}
            assert other in {w["id"] for w in status["worlds"]}  # untouched, still serving
            await cluster.wait_for(
                lambda s: sum(w["state"] == "serving" for w in s["worlds"]) == 3,
                timeout_s=30, what="both re-formed")
            await load.answered(50)
    load.assert_exactly_once()
    assert load.errors == []


async def test_killing_a_non_shared_worker_breaks_only_its_world(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(PIPELINE, controller="warm_workers = 0")
    status = await cluster.status()
    world_a, world_b = status["worlds"]
    victim = world_a["workers"][1]
    pid = next(w["pid"] for w in status["workers"] if w["id"] == victim)
    async with LedgerClient(cluster.client) as client:
        async with Load(client) as load:
            await load.answered(50)
            os.kill(pid, signal.SIGKILL)
            await cluster.wait_for(
                lambda s: any(e["event"] == "world_broken" and e["world"] == world_a["id"]
                              for e in s["events"]), timeout_s=5, what="world A broken")
            served_b = next(w["served"] for w in (await cluster.status())["worlds"]
                            if w["id"] == world_b["id"])
            # World B never stopped answering: it serves more after A broke.
            status = await cluster.wait_for(
                lambda s: any(w["id"] == world_b["id"] and w["served"] > served_b
                              for w in s["worlds"]), timeout_s=1.0, what="world B answering")
            assert not any(e["event"] == "world_broken" and e["world"] == world_b["id"]
                           for e in status["events"])
    load.assert_exactly_once()
    assert load.errors == []


async def test_a_stopped_stage_is_detected_within_two_seconds_and_resuming_it_duplicates_nothing(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(PIPELINE)  # default heartbeat settings
    status = await cluster.status()
    world = status["worlds"][0]
    victim = world["workers"][1]
    pid = next(w["pid"] for w in status["workers"] if w["id"] == victim)
    async with LedgerClient(cluster.client) as client:
        load = Load(client)
        load.start()
        try:
            await load.answered(50)
            os.kill(pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            await cluster.wait_for(
                lambda s: any(e["event"] == "worker_dead" and e["worker"] == victim
                              for e in s["events"]), timeout_s=5, what="the hang detected")
            detected_s = time.monotonic() - stopped_at
            assert detected_s < 2.0 + 0.3, detected_s  # 0.3 s: status polling granularity
        finally:
            if alive(pid):  # resumed once declared dead (its requests were re-sent)
                os.kill(pid, signal.SIGCONT)
        # Fenced: the hung process is ended.
        await until(lambda: not alive(pid), 2.5, "the hung process ended")
        # Whatever the resumed process still had must not surface: the load goes on, and
        # the ledger finds every request answered once.
        await load.answered(50)
        await load.stop()
    load.assert_exactly_once()
    assert load.errors == []


async def test_a_stream_whose_world_dies_completes_with_exactly_the_reference_tokens(
        cluster_factory: StartCluster) -> None:
    from worker.models.tinygpt import generate

    cluster = await cluster_factory("""
[[deployments]]
name = "tinygpt"
model = "worker.models.tinygpt:build"
stages = 2
worlds = 2
max_batch_size = 1
""")
    prompt, n = "fault tolerant", 120
    async with LedgerClient(cluster.client) as client:
        stream = client.stream("tinygpt", {"prompt": prompt}, max_tokens=n, timeout_s=60)
        chunks: list[str] = []
        killed = False
        async for chunk in stream:
            chunks.append(chunk["text"])
            if len(chunks) == 20 and not killed:
                status = await cluster.status()
                world = max(status["worlds"], key=lambda w: w["in_flight"])
                assert world["in_flight"] == 1
                pid = next(w["pid"] for w in status["workers"] if w["id"] == world["workers"][1])
                os.kill(pid, signal.SIGKILL)
                killed = True
    assert killed
    assert "".join(chunks) == generate(prompt, n)
    status = await cluster.status()
    assert status["deployments"][0]["resent"] >= 1
    assert sum(client.ledger.chunks.values()) == n  # every token exactly once


async def test_a_worker_that_crashes_while_loading_is_not_restarted_forever(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory("""
[[deployments]]
name = "faulty"
model = "worker.models.faulty:build"
factory_kwargs = { mode = "exit" }
""", controller="max_load_failures = 3", wait_serving=False)
    status = await cluster.wait_for(lambda s: s["deployments"][0]["quarantined"] != "",
                                    timeout_s=30, what="the deployment quarantined")
    dep = status["deployments"][0]
    assert "3 formation failures" in dep["quarantined"] and "exited with code 3" in dep[
        "quarantined"]
    assert dep["worlds_current"] == 0
    started = {w["id"] for w in status["workers"]}
    await asyncio.sleep(3.0)  # no tight loop: nothing new is started
    status = await cluster.status()
    assert {w["id"] for w in status["workers"]} - started == set()
    assert sum(1 for e in status["events"] if e["event"] == "worker_dead") == 3
    table = await asyncio.to_thread(cluster.meshctl, "status", "--json")
    assert "quarantined" in table.stdout


async def test_a_drained_worker_that_joined_by_itself_ends_dead(tmp_path: Path) -> None:
    # launcher = "none": no launcher sees this worker exit, so the heartbeat check must.
    ports = free_ports("client", "admin", "worker")
    config = tmp_path / "none.toml"
    write_config(config, ports, '[[deployments]]\nname = "echo"\n'
                 'model = "worker.models.echo:build"\n', 'launcher = "none"')
    log = tmp_path / "controller.log"
    with open(log, "wb") as out:
        procs = [subprocess.Popen([sys.executable, "-m", "mesh.cli", "controller",
                                   "--config", str(config)],
                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  preexec_fn=dies_with_pytest)]
    cluster = Cluster(procs[0], f"tcp://127.0.0.1:{ports['client']}",
                      f"tcp://127.0.0.1:{ports['admin']}", f"tcp://127.0.0.1:{ports['worker']}",
                      config, log)
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "worker", "--controller",
             cluster.workers_endpoint, "--worker-id", "remote1"], stdin=subprocess.DEVNULL,
            preexec_fn=dies_with_pytest))
        await cluster.wait_for(lambda s: any(w["id"] == "remote1" and w["state"] == "serving"
                                             for w in s["workers"]), what="remote1 serving")
        drained = await asyncio.to_thread(cluster.meshctl, "drain", "remote1")
        assert drained.returncode == 0, drained.stderr
        status = await cluster.wait_for(
            lambda s: [w["state"] for w in s["workers"] if w["id"] == "remote1"] == ["dead"],
            what="the drained worker declared dead")
        (worker,) = status["workers"]
        # It exited, so its connection closed: found out within half a second, not the
        # heartbeat timeout (controller.health).
        assert worker["reason"].startswith("connection closed"), worker
        assert procs[1].wait(timeout=10) == 0  # it did exit when told to
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


async def test_a_controller_stalled_for_three_seconds_gets_no_healthy_worker_killed(
        cluster_factory: StartCluster) -> None:
    # A synchronous call blocks the controller's loop for 3 s: heartbeats pile up unread, and
    # when it returns its health check runs before they are read (timers come first), so it
    # must credit the stall to the workers instead of declaring them silent.
    cluster = await cluster_factory(PIPELINE)  # default heartbeat timeout: 1.5 s
    before = await cluster.status()
    pids = {w["id"]: w["pid"] for w in before["workers"]}
    worlds = {w["id"] for w in before["worlds"]}
    async with LedgerClient(cluster.client) as client:
        async with Load(client, callers=4, timeout_s=20) as load:
            await asyncio.sleep(1.0)
            proc = await asyncio.to_thread(cluster.meshctl, "fault", "controller",
                                           "--stall-ms", "3000")
            assert proc.returncode == 0, proc.stderr
            await asyncio.sleep(6.0)
    load.assert_exactly_once()
    assert load.errors == []
    status = await cluster.status()
    assert not [e for e in status["events"] if e["event"] in ("worker_dead", "world_broken")]
    assert {w["id"]: w["pid"] for w in status["workers"]} == pids
    assert all(alive(pid) for pid in pids.values())
    assert {w["id"] for w in status["worlds"]} == worlds
    assert status["controller"]["loop_stall_max_s"] > 2.5  # the stall was seen, and credited


POSTING = """
[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
factory_kwargs = { hidden = 512 }
stages = 2
worlds = 2
max_worlds = 4
micro_batches = 4
default_timeout_ms = 20000
"""


KILLS_WHILE_POSTING = 6


@pytest.mark.timeout(240)
async def test_stage_one_workers_killed_while_rank_zero_posts_batches_cost_clients_nothing(
        tmp_path: Path) -> None:
    # Workers that joined by themselves (launcher = "none"): no launcher sees them die, so the
    # controller learns of a death only from the world (at once) or from silence (1.5 s).
    # Rank 0 posts each batch as 4 micro-batches without waiting; when it meets its dead rank
    # 1 (gloo raises from the post itself, or from a wait), that must come out as a broken
    # world and a re-send. Before, it came out as model_error, and with no exit to race it,
    # such a batch could reach its clients: this test failed in 4 of 13 runs on that code (the
    # post races gloo noticing the closed connection); the unit tests in test_comm and
    # test_stage_loop pin the same path down deterministically.
    ports = free_ports("client", "admin", "worker")
    config = tmp_path / "none.toml"
    write_config(config, ports, POSTING, 'launcher = "none"')
    log = tmp_path / "controller.log"
    with open(log, "wb") as out:
        ctrl = subprocess.Popen([sys.executable, "-m", "mesh.cli", "controller",
                                 "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=dies_with_pytest)
    cluster = Cluster(ctrl, f"tcp://127.0.0.1:{ports['client']}",
                      f"tcp://127.0.0.1:{ports['admin']}", f"tcp://127.0.0.1:{ports['worker']}",
                      config, log)
    workers: list[subprocess.Popen[bytes]] = []

    def start_worker(n: int) -> None:
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "worker", "--controller",
             cluster.workers_endpoint, "--worker-id", f"r{n}", "--threads", "1"],
            stdin=subprocess.DEVNULL, preexec_fn=dies_with_pytest))

    try:
        for n in range(5):  # two worlds of two, and a spare
            start_worker(n)
        await cluster.wait_for(
            lambda s: sum(w["state"] == "serving" for w in s["worlds"]) == 2
            and any(w["state"] == "idle" for w in s["workers"]), what="2 worlds and a spare")
        async with LedgerClient(cluster.client) as client:
            async with Load(client, callers=12, timeout_s=20) as load:
                await load.answered(60)
                for kill in range(KILLS_WHILE_POSTING):
                    # Each kill finds the worlds re-formed and a spare registered (the one
                    # started at the last kill), so the next world forms at once.
                    status = await cluster.wait_for(
                        lambda s: sum(w["state"] == "serving" for w in s["worlds"]) == 2
                        and any(w["state"] == "idle" for w in s["workers"]),
                        timeout_s=30, what="two worlds serving and a spare")
                    await load.answered(60)  # each kill lands while batches are posted
                    world = random.Random(kill).choice(status["worlds"])
                    victim = next(w for w in status["workers"] if w["id"] == world["workers"][1])
                    os.kill(victim["pid"], signal.SIGKILL)
                    start_worker(5 + kill)  # the next spare
                    await until(lambda v=victim: not alive(v["pid"]), 2.5, "the victim gone")
                    await cluster.wait_for(lambda s, v=victim: declared_dead(s, v["id"]),
                                           timeout_s=10, what="the kill noticed")
                await load.answered(60)
        load.assert_exactly_once()
        assert load.errors == [], {type(e).__name__: str(e)[:200] for e in load.errors}
        assert load.ok > 300
        status = await cluster.status()
        broken = [e for e in status["events"] if e["event"] == "world_broken"]
        assert len(broken) >= KILLS_WHILE_POSTING and sum(e["resent"] for e in broken) >= 1
        # No launcher saw the kills, yet none waited out the heartbeat timeout: each killed
        # worker's closed connection gave it away (controller.health), so its world held
        # requests for half a second instead of 1.5 s (rank 0 alone would not notice: it
        # had nothing more to post to its dead stage).
        dead = [e for e in status["events"] if e["event"] == "worker_dead"]
        assert len(dead) >= KILLS_WHILE_POSTING
        assert all("connection closed" in e["reason"] for e in dead), [e["reason"] for e in dead]
    finally:
        for proc in [ctrl, *workers]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [ctrl, *workers]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
