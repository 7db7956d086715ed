"""The worker fork server (worker/forkserver.py, controller/fork_client.py) with real processes.

A forked worker must be what ``python -m worker`` would have started: the same command line
for whoever looks for it, the same exit codes for the controller, the same death with the
controller; and when the server cannot fork (it refused, or died) workers still start,
plainly. The last tests check what the design rests on: a fork of a process that imported
torch gets the thread count it asks for, and draws its own random numbers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from controller.launcher import LocalLauncher
from mesh.testing.cluster import Cluster
from mesh.testing.ports import free_port
from mesh.testing.processes import alive, pids_with
from mesh.testing.waits import until
from tests.conftest import StartCluster

# Real processes: each test bounded (a hung fork or wait fails the test, never the run).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parent.parent
MLP = """
[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
factory_kwargs = { hidden = 128 }
max_worlds = 3
"""
FALLBACK = "workers start plainly from now on"


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")


def stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat from the state on: [0] state, [1] ppid, [3] session."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def mapped(pid: int) -> str:
    """What a process has mapped (its libraries among them)."""
    return Path(f"/proc/{pid}/maps").read_text()


def expected_cmdline(cluster: Cluster, worker_id: str) -> list[str]:
    return [sys.executable, "-m", "worker", "--controller", cluster.workers_endpoint,
            "--worker-id", worker_id, "--device", "cpu", "--threads", "0",
            "--parent-pid", str(cluster.pid), "--exit-on-controller-loss"]


def serving_workers(status: dict[str, Any]) -> dict[str, int]:
    return {w["id"]: w["pid"] for w in status["workers"] if w["state"] == "serving"}


def death_of(status: dict[str, Any], worker_id: str) -> str:
    return next((e["reason"] for e in status["events"]
                 if e["event"] == "worker_dead" and e["worker"] == worker_id), "")


async def test_a_forked_worker_has_the_command_line_of_a_plain_start(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(MLP)
    status = await cluster.status()
    (worker_id, pid), = serving_workers(status).items()
    assert f"started worker {worker_id} pid {pid} on cpu (forked)" in cluster.log_tail(200)
    assert cmdline(pid) == expected_cmdline(cluster, worker_id)
    # Found the ways tests, bench scripts and operators look: by endpoint and by id.
    assert cluster.worker_pids() == [pid]
    assert pids_with(f"--controller {cluster.workers_endpoint} --worker-id {worker_id} ") == [pid]
    # Its parent is the fork server, whose parent is the controller; a session of its own.
    server, = cluster.fork_server_pids()
    assert int(stat(pid)[1]) == server and int(stat(server)[1]) == cluster.pid
    assert int(stat(pid)[3]) == pid
    assert "--controller" not in cmdline(server)


async def test_the_fork_server_starts_with_the_controller_one_thread_and_no_cuda(
        cluster_factory: StartCluster) -> None:
    # No world wanted, so no worker: the server is there all the same, ready before the first
    # scale-up asks for one.
    cluster = await cluster_factory(MLP.replace("max_worlds", "worlds = 0\nmin_worlds = 0\n"
                                                "max_worlds"))
    await until(lambda: "workers are forked from it" in cluster.log_tail(200), timeout_s=60.0,
                what="the fork server ready")
    assert cluster.worker_pids() == []
    server, = cluster.fork_server_pids()
    assert int(stat(server)[1]) == cluster.pid
    # Nothing in it but the thread that forks (threads are not copied by a fork), and no CUDA
    # library loaded (each worker starts its own device).
    assert os.listdir(f"/proc/{server}/task") == [str(server)]
    libraries = mapped(server)
    assert "libcuda.so" not in libraries and "torch" in libraries
    started = await asyncio.to_thread(cluster.meshctl, "scale", "mlp", "--worlds", "1")
    assert started.returncode == 0, started.stderr
    status = await cluster.wait_for(lambda s: len(serving_workers(s)) == 1, timeout_s=30,
                                    what="one world serving")
    (pid,) = serving_workers(status).values()
    assert int(stat(pid)[1]) == server
    assert os.listdir(f"/proc/{server}/task") == [str(server)]


async def test_with_fork_workers_off_workers_start_plainly_as_before(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(MLP, controller="fork_workers = false")
    (worker_id, pid), = serving_workers(await cluster.status()).items()
    assert f"started worker {worker_id} pid {pid} on cpu (plain)" in cluster.log_tail(200)
    assert cmdline(pid) == expected_cmdline(cluster, worker_id)
    assert int(stat(pid)[1]) == cluster.pid
    assert cluster.fork_server_pids() == []


async def test_a_sigkilled_forked_worker_is_reported_as_killed_and_replaced_by_a_fork(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(MLP)
    (victim, pid), = serving_workers(await cluster.status()).items()
    os.kill(pid, signal.SIGKILL)
    status = await cluster.wait_for(
        lambda s: death_of(s, victim) and len(serving_workers(s)) == 1
        and victim not in serving_workers(s), timeout_s=30, what="the world re-formed")
    assert death_of(status, victim) == "exited with code -9 (SIGKILL)"
    (new_id, new_pid), = serving_workers(status).items()
    assert f"started worker {new_id} pid {new_pid} on cpu (forked)" in cluster.log_tail(200)


async def test_workers_start_plainly_after_the_fork_server_is_killed(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(MLP)
    (first, first_pid), = serving_workers(await cluster.status()).items()
    server, = cluster.fork_server_pids()
    os.kill(server, signal.SIGKILL)
    # Its worker dies with it (the kernel's parent-death SIGKILL), is reported so, and is
    # replaced by a plain start.
    status = await cluster.wait_for(
        lambda s: death_of(s, first) and len(serving_workers(s)) == 1
        and first not in serving_workers(s), timeout_s=30, what="a plain replacement serving")
    assert not alive(first_pid) and not alive(server)
    assert death_of(status, first) == "exited with code -9 (SIGKILL)"
    (second, second_pid), = serving_workers(status).items()
    assert f"started worker {second} pid {second_pid} on cpu (plain)" in cluster.log_tail(200)
    assert int(stat(second_pid)[1]) == cluster.pid
    # Later starts are plain too, and the fallback was said once.
    proc = await asyncio.to_thread(cluster.meshctl, "scale", "mlp", "--worlds", "2")
    assert proc.returncode == 0, proc.stderr
    status = await cluster.wait_for(lambda s: len(serving_workers(s)) == 2, timeout_s=60,
                                    what="two worlds serving")
    log = cluster.log_path.read_text()
    for worker_id, pid in serving_workers(status).items():
        if worker_id != second:
            assert f"started worker {worker_id} pid {pid} on cpu (plain)" in log
    assert log.count(FALLBACK) == 1, log


async def test_the_fork_server_and_its_workers_die_with_a_sigkilled_controller(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(MLP)
    workers = cluster.worker_pids()
    servers = cluster.fork_server_pids()
    assert len(workers) == 1 and len(servers) == 1
    cluster.proc.send_signal(signal.SIGKILL)
    cluster.proc.wait(10)
    await until(lambda: not any(alive(p) for p in workers + servers), timeout_s=5.0,
                what="the fork server and its worker gone with their controller")


# -- the launcher alone, with a stand-in controller that only listens -------------------------


async def registered(router: zmq.asyncio.Socket, count: int, timeout_s: float = 60.0
                     ) -> set[bytes]:
    """The identities (worker ids) of the first ``count`` workers heard on ``router``."""
    heard: set[bytes] = set()
    async with asyncio.timeout(timeout_s):
        while len(heard) < count:
            identity, *_ = await router.recv_multipart()
            heard.add(identity)
    return heard


@pytest.fixture
async def listener() -> Any:
    context = zmq.asyncio.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = free_port()
    router.bind(f"tcp://127.0.0.1:{port}")
    yield f"tcp://127.0.0.1:{port}", router
    router.close(linger=0)
    context.term()


async def end_them(launcher: LocalLauncher, endpoint: str) -> None:
    await launcher.aclose(timeout_s=5.0)
    assert pids_with(f"--controller {endpoint} ") == []
    assert pids_with(f"worker.forkserver --parent-pid {os.getpid()} ") == []


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "plain"])
async def test_exit_codes_are_those_of_a_plain_start(listener: Any, fork: bool) -> None:
    endpoint, router = listener
    exits: dict[str, int] = {}
    launcher = LocalLauncher(endpoint, on_exit=exits.__setitem__, device="cpu", threads=1,
                             fork=fork)
    try:
        pids = {w: await launcher.spawn(w) for w in ("k", "t", "s")}
        await registered(router, 3)
        assert launcher.kill("k")  # SIGKILL
        os.kill(pids["s"], signal.SIGSTOP)  # stop() must wake it to end it
        await asyncio.gather(launcher.stop("t", timeout_s=1.0), launcher.stop("s", 1.0))
        await until(lambda: len(exits) == 3, timeout_s=10, what="three exits reported")
        assert exits == {"k": -signal.SIGKILL, "t": 0, "s": 0}
    finally:
        await end_them(launcher, endpoint)


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "plain"])
async def test_a_worker_given_a_bad_argument_exits_as_a_plain_start_does(
        listener: Any, fork: bool) -> None:
    endpoint, _ = listener
    exits: dict[str, int] = {}
    launcher = LocalLauncher(endpoint, on_exit=exits.__setitem__, device="cpu", threads=1,
                             extra_args=["--no-such-flag"], fork=fork)
    try:
        await launcher.spawn("bad")
        await until(lambda: "bad" in exits, timeout_s=60, what="the worker's exit")
        assert exits == {"bad": 2}  # argparse's
    finally:
        await end_them(launcher, endpoint)


async def test_a_refused_fork_starts_plainly_and_leaves_the_forked_workers_running(
        listener: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint, router = listener
    exits: dict[str, int] = {}
    launcher = LocalLauncher(endpoint, on_exit=exits.__setitem__, device="cpu", threads=1)
    caplog.set_level(logging.INFO, logger="controller")
    try:
        forked = await launcher.spawn("a")
        # Read at import by the server, so a fork would not see it: refused.
        monkeypatch.setenv("OMP_SCHEDULE", "static")
        plain = [await launcher.spawn(w) for w in ("b", "c")]
        await registered(router, 3)
        assert alive(forked)
        assert all(int(stat(pid)[1]) == os.getpid() for pid in plain)
        assert "started worker a pid" in caplog.text and "(forked)" in caplog.text
        assert caplog.text.count(FALLBACK) == 1
        assert "environment differs from the fork server's (first: OMP_SCHEDULE)" in caplog.text
    finally:
        await end_them(launcher, endpoint)
    assert set(exits) == {"a", "b", "c"}


# -- what the design rests on -----------------------------------------------------------------

THREADS = """
import importlib, json, os, sys, threading
from worker.forkserver import preload, settle_threads, threads_running, unfit
models = preload()
report = {"threads_at_import": threads_running(), "models": models,
          "models_missing": [m for m in models if m not in sys.modules]}
settle_threads()
report.update(server_threads=threads_running(), unfit=unfit(), children={})
stop = threading.Event()
helper = threading.Thread(target=stop.wait)
helper.start()
report["unfit_with_a_thread"] = unfit()
stop.set()
helper.join()
for want in (1, 2):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        import torch
        torch.set_num_threads(want)
        a = torch.randn(512, 512)
        for _ in range(20):
            a = torch.tanh(a @ a)  # parallel: the pool starts now, in the child
        os.write(w, json.dumps([torch.get_num_threads(),
                                len(os.listdir("/proc/self/task"))]).encode())
        os._exit(0)
    os.close(w)
    report["children"][want] = json.loads(os.read(r, 1000))
    os.waitpid(pid, 0)
report["server_threads_after"] = threads_running()
print(json.dumps(report))
"""


def run_script(script: str) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=120, check=True)
    return json.loads(out.stdout)


def test_a_fork_of_the_server_gets_the_torch_threads_it_asks_for() -> None:
    report = run_script(THREADS)
    # numpy's OpenBLAS pool (where it starts one at import) is stopped by the first fork.
    assert report["server_threads"] == 1 and report["unfit"] == ""
    assert report["unfit_with_a_thread"] == "the fork server runs 2 threads"
    assert report["children"]["1"] == [1, 1]
    threads, tasks = report["children"]["2"]
    assert threads == 2 and tasks >= 2  # an OpenMP pool of its own, made in the child
    assert report["server_threads_after"] == 1
    # Every built-in model is imported in the server, not in each worker.
    assert {"worker.models.mlp", "worker.models.tinygpt", "worker.models.resnet"} <= set(
        report["models"])
    assert report["models_missing"] == []


RANDOM = """
import json, os, random, sys
import numpy, torch
from worker.fork_child import reseed
draws = []
for fresh in (True, True, False, False):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        if fresh:
            reseed()
        os.write(w, json.dumps([random.random(), float(numpy.random.random()),
                                float(torch.rand(1))]).encode())
        os._exit(0)
    os.close(w)
    draws.append(json.loads(os.read(r, 1000)))
    os.waitpid(pid, 0)
print(json.dumps({"draws": draws, "cuda": torch.cuda.is_initialized()}))
"""


def test_forked_workers_draw_their_own_random_numbers() -> None:
    report = run_script(RANDOM)
    reseeded_a, reseeded_b, copied_a, copied_b = report["draws"]
    assert all(x != y for x, y in zip(reseeded_a, reseeded_b, strict=True))
    # Without the re-seed, torch's generator is the server's in every child (numpy's differs
    # already here, but the re-seed does not count on that).
    assert copied_a[2] == copied_b[2]
    assert not report["cuda"]

