"""The fleet survives its controller: a SIGKILLed controller restarted on the same config
adopts the workers that joined by themselves (launcher = "none"), and a client connected
throughout is served again without being recreated.

Before, the workers re-registered only until their first welcome; the new controller ignored
their heartbeats and both exited 10 s later ("no word from the controller"). The client waited
out the deadline of every request it had in flight; now it notices the lost controller,
fails those at once with ControllerLost, retries them when asked to, and resumes streams."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.errors import ControllerLost
from mesh.testing.configs import deployment
from mesh.testing.ledger import LedgerClient
from tests.cluster import joined_cluster, restart_controller, start_controller
from tests.load import Load

pytestmark = pytest.mark.integration

MLP = deployment("mlp", "worker.models.mlp:build", factory_kwargs={"hidden": 64}, worlds=2)


def serving(s: dict[str, Any]) -> bool:
    return sum(w["state"] == "serving" for w in s["worlds"]) == 2


@pytest.mark.timeout(180)
async def test_a_restarted_controller_adopts_its_workers_and_serves_the_same_client_again(
        tmp_path: Path) -> None:
    with joined_cluster(tmp_path, MLP, ["r0", "r1"], "controller_timeout_ms = 3000") as (
            cluster, workers):
        before = await cluster.wait_for(serving, what="2 worlds")
        pids = sorted(w["pid"] for w in before["workers"])
        assert pids == sorted(p.pid for p in workers)
        # Its controller timeout is 2 s (5 s by default): the loss is noticed by silence
        # while the controller is down, before it comes back.
        async with LedgerClient(cluster.client, controller_timeout_s=2.0) as client:
            async with Load(client, callers=4, timeout_s=20.0) as load:
                await asyncio.sleep(1.0)
                cluster.proc.send_signal(signal.SIGKILL)
                cluster.proc.wait(10)
                killed_at = time.monotonic()
                # A caller that allows retries rides through the whole outage.
                patient = asyncio.create_task(client.infer(
                    "mlp", {"x": np.ones((1, 64), np.float32)}, timeout_s=20.0, retries=100))
                # The requests in flight at the kill fail at once (within the client's 2 s
                # controller timeout plus a heartbeat), not at their 20 s deadline.
                while load.ok + len(load.errors) < load.sent - 4 or not load.errors:
                    assert time.monotonic() - killed_at < 3.5, "in-flight requests not failed"
                    await asyncio.sleep(0.02)
                failed_s = time.monotonic() - killed_at
                # Down for longer than the workers' controller timeout (3 s): they stop
                # serving and keep registering instead of exiting.
                await asyncio.sleep(max(0.0, 3.5 - (time.monotonic() - killed_at)))
                assert all(p.poll() is None for p in workers), "a worker exited"
                started_at = time.monotonic()
                cluster.proc = start_controller(cluster.config_path, cluster.log_path)
                after = await cluster.wait_for(serving, timeout_s=30.0, interval_s=0.05,
                                               what="the adopted workers serving again")
                serving_s = time.monotonic() - started_at
                ok_before = load.ok
                while load.ok == ok_before:
                    assert time.monotonic() - killed_at < 40.0, "the client is not served"
                    await asyncio.sleep(0.02)
                answered_s = time.monotonic() - killed_at
                assert (await patient)["y"].shape == (1, 10)
                await asyncio.sleep(1.0)
    print(f"in-flight requests failed {failed_s:.2f}s after the kill; serving "
          f"{serving_s:.2f}s after the restart; the client answered {answered_s:.2f}s "
          f"after the kill (3.5 s of it down)")
    assert serving_s < 2.0
    assert answered_s < 5.0
    assert client.controller_losses >= 1
    assert sorted(w["pid"] for w in after["workers"]) == pids  # the same processes
    assert {w["id"] for w in after["workers"]} == {"r0", "r1"}
    # Only requests in flight at the kill (or sent while it was down) failed, each with
    # ControllerLost; none was answered twice.
    assert max(client.ledger.answers.values()) == 1
    assert load.errors and all(isinstance(e, ControllerLost) for e in load.errors)


TINYGPT = """
[[deployments]]
name = "tinygpt"
model = "worker.models.tinygpt:build"
max_batch_size = 1
"""


@pytest.mark.timeout(120)
async def test_a_stream_resumes_from_its_last_chunk_across_a_controller_restart(
        tmp_path: Path) -> None:
    from worker.models.tinygpt import generate

    prompt, n = "restart", 256  # about 3 s of decoding on one core
    chunks: list[str] = []
    with joined_cluster(tmp_path, TINYGPT, ["g0"], "controller_timeout_ms = 3000") as (
            cluster, _):
        await cluster.wait_for(lambda s: s["worlds"] and s["worlds"][0]["state"] == "serving",
                               what="a tinygpt world")
        async with LedgerClient(cluster.client) as client:
            async for chunk in client.stream("tinygpt", {"prompt": prompt}, max_tokens=n,
                                             timeout_s=60):
                chunks.append(chunk["text"])
                if len(chunks) == 10:
                    # Killed mid-stream and restarted at once (a supervisor's restart): the
                    # client learns of it from the new controller's pong, not a timeout.
                    restart_controller(cluster)
    assert "".join(chunks) == generate(prompt, n)
    assert sum(client.ledger.chunks.values()) == n  # every token exactly once
    assert client.controller_losses == 0  # a restart, noticed by incarnation, never silence
