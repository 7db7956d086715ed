"""The fleet survives its controller: a SIGKILLed controller restarted on the same config
adopts the workers that joined by themselves (launcher = "none"), and a client connected
throughout is served again without being recreated.

Before, the workers re-registered only until their first welcome; the new controller ignored
their heartbeats and both exited 10 s later ("no word from the controller")."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

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
        async with LedgerClient(cluster.client) as client:
            async with Load(client, callers=4, timeout_s=3.0) as load:
                await asyncio.sleep(1.0)
                ctrl.send_signal(signal.SIGKILL)
                ctrl.wait(10)
                killed_at = time.monotonic()
                # Down for longer than the workers' controller timeout (3 s): they stop
                # serving and keep registering instead of exiting.
                await asyncio.sleep(4.0)
                assert all(p.poll() is None for p in workers), "a worker exited"
                cluster.proc = ctrl = start_controller(config, log)
                started_at = time.monotonic()
                after = await cluster.wait_for(serving, timeout_s=30.0,
                                               what="the adopted workers serving again")
                serving_s = time.monotonic() - started_at
                ok_before = load.ok
                while load.ok == ok_before:
                    assert time.monotonic() - killed_at < 40.0, "the client is not served"
                    await asyncio.sleep(0.05)
                answered_s = time.monotonic() - killed_at
                await asyncio.sleep(1.0)
        print(f"serving {serving_s:.2f}s after the restart; the client answered "
              f"{answered_s:.2f}s after the kill (4 s of it down)")
        assert sorted(w["pid"] for w in after["workers"]) == pids  # the same processes
        assert {w["id"] for w in after["workers"]} == {"r0", "r1"}
        # Only requests in flight at the kill were lost (timed out at the client); none was
        # answered twice, and every error is a deadline.
        assert max(client.answers.values()) == 1
        assert {type(e).__name__ for e in load.errors} <= {"DeadlineExceeded"}
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
