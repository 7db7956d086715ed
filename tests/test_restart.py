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
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.errors import ControllerLost
from tests.cluster import Cluster, alive, free_ports, write_config
from tests.load import LedgerClient, Load

MLP = """
[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
factory_kwargs = { hidden = 64 }
worlds = 2
"""


def start_controller(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "controller.cli", "controller",
                                 "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def serving(s: dict[str, Any]) -> bool:
    return sum(w["state"] == "serving" for w in s["worlds"]) == 2


@pytest.mark.timeout(180)
async def test_a_restarted_controller_adopts_its_workers_and_serves_the_same_client_again(
        tmp_path: Path) -> None:
    ports = free_ports("client", "admin", "worker")
    config = tmp_path / "none.toml"
    write_config(config, ports, MLP, 'launcher = "none"\ncontroller_timeout_ms = 3000')
    log = tmp_path / "controller.log"
    ctrl = start_controller(config, log)
    cluster = Cluster(ctrl, f"tcp://127.0.0.1:{ports['client']}",
                      f"tcp://127.0.0.1:{ports['admin']}", f"tcp://127.0.0.1:{ports['worker']}",
                      config, log)
    workers = [subprocess.Popen([sys.executable, "-m", "controller.cli", "worker",
                                 "--controller", cluster.workers_endpoint, "--worker-id", f"r{n}",
                                 "--threads", "1"], stdin=subprocess.DEVNULL) for n in range(2)]
    try:
        before = await cluster.wait_for(serving, what="2 worlds")
        pids = sorted(w["pid"] for w in before["workers"])
        assert pids == sorted(p.pid for p in workers)
        # Its controller timeout is 2 s (5 s by default): the loss is noticed by silence
        # while the controller is down, before it comes back.
        async with LedgerClient(cluster.client, controller_timeout_s=2.0) as client:
            async with Load(client, callers=4, timeout_s=20.0) as load:
                await asyncio.sleep(1.0)
                ctrl.send_signal(signal.SIGKILL)
                ctrl.wait(10)
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
                cluster.proc = ctrl = start_controller(config, log)
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
        assert max(client.answers.values()) == 1
        assert load.errors and all(isinstance(e, ControllerLost) for e in load.errors)
    finally:
        for proc in [ctrl, *workers]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [ctrl, *workers]:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert not any(alive(p.pid) for p in workers)


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

    ports = free_ports("client", "admin", "worker")
    config = tmp_path / "none.toml"
    write_config(config, ports, TINYGPT, 'launcher = "none"\ncontroller_timeout_ms = 3000')
    log = tmp_path / "controller.log"
    ctrl = start_controller(config, log)
    cluster = Cluster(ctrl, f"tcp://127.0.0.1:{ports['client']}",
                      f"tcp://127.0.0.1:{ports['admin']}", f"tcp://127.0.0.1:{ports['worker']}",
                      config, log)
    worker = subprocess.Popen([sys.executable, "-m", "controller.cli", "worker",
                               "--controller", cluster.workers_endpoint, "--worker-id", "g0",
                               "--threads", "1"], stdin=subprocess.DEVNULL)
    try:
        await cluster.wait_for(lambda s: s["worlds"] and s["worlds"][0]["state"] == "serving",
                               what="a tinygpt world")
        prompt, n = "restart", 256  # about 3 s of decoding on one core
        chunks: list[str] = []
        async with LedgerClient(cluster.client) as client:
            async for chunk in client.stream("tinygpt", {"prompt": prompt}, max_tokens=n,
                                             timeout_s=60):
                chunks.append(chunk["text"])
                if len(chunks) == 10:
                    # Killed mid-stream and restarted at once (a supervisor's restart): the
                    # client learns of it from the new controller's pong, not a timeout.
                    ctrl.send_signal(signal.SIGKILL)
                    ctrl.wait(10)
                    cluster.proc = ctrl = start_controller(config, log)
            losses = client.controller_losses
        assert "".join(chunks) == generate(prompt, n)
        assert sum(client.chunks.values()) == n  # every token exactly once
        assert losses == 0  # a restart, noticed by incarnation; never silent for 2 s
    finally:
        for proc in [ctrl, worker]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [ctrl, worker]:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert not alive(worker.pid)
