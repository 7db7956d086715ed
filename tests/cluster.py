"""Real meshserve processes for integration tests: a controller (``meshctl up``) with its local
workers on free loopback ports, and the means to check that none of them outlives a test. The
pieces benchmarks use too (``Cluster``, ports, configs, processes) are in ``mesh.testing``."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mesh.testing import processes
from mesh.testing.cluster import Cluster
from mesh.testing.configs import write_config
from mesh.testing.ports import free_ports
from mesh.testing.processes import alive, end_processes
from mesh.testing.waits import serving

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def dies_with_pytest() -> None:
    """``preexec_fn`` for what a test starts: SIGTERM when pytest dies (killed, or timed out by
    CI) before its teardown could end it, so a broken run leaves no controller holding ports
    and cores on the machine (workers die with their controller: worker/main.py). Start it
    from pytest's main thread: the signal follows the thread that started the process."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


async def start_cluster(tmp_path: Path, deployments: str, *, controller: str = "",
                        ready_timeout_s: float = 90.0, wait_serving: bool = True,
                        admin_curve: Any = None) -> Cluster:
    ports = free_ports("client", "admin", "worker")
    config = write_config(tmp_path / f"meshserve-{ports['admin']}.toml", ports, deployments,
                          controller)
    log_path = tmp_path / f"controller-{ports['admin']}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mesh.cli", "up", "--config",
                                 str(config)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=dies_with_pytest)
    cluster = Cluster(proc, f"tcp://127.0.0.1:{ports['client']}",
                      f"tcp://127.0.0.1:{ports['admin']}", f"tcp://127.0.0.1:{ports['worker']}",
                      config, log_path, admin_curve=admin_curve)
    try:
        await cluster.wait_for(lambda s: not wait_serving or serving(s),
                               timeout_s=ready_timeout_s, what="every deployment serving")
    except BaseException:
        reap(cluster)
        raise
    return cluster


def reap(cluster: Cluster) -> list[int]:
    """End the controller and every worker it started, by PID; return the PIDs that had to be
    killed because they outlived the controller's own shutdown."""
    leaked: list[int] = []
    if cluster.proc.poll() is None:
        with contextlib.suppress(Exception):
            cluster.stop(signal.SIGTERM, timeout_s=20.0)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and (cluster.worker_pids() or cluster.gateway_pids()
                                           or cluster.fork_server_pids()):
        time.sleep(0.05)
    for pid in cluster.worker_pids() + cluster.gateway_pids() + cluster.fork_server_pids() + [
            p for p in cluster.seen_worker_pids if alive(p)]:
        if pid in leaked:
            continue
        leaked.append(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
    return leaked


def start_controller(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``meshctl controller --config``, its output appended to ``log``, dying with pytest."""
    return processes.start_controller(config, log, preexec_fn=dies_with_pytest)


@contextlib.contextmanager
def joined_cluster(tmp_path: Path, deployments: str, worker_ids: list[str],
                   controller: str = "") -> Iterator[tuple[Cluster, list[subprocess.Popen[bytes]]]]:
    """A controller with ``launcher = "none"`` and workers that join it by themselves
    (``meshctl worker``), all ended by PID on exit."""
    ports = free_ports("client", "admin", "worker")
    config = write_config(tmp_path / "joined.toml", ports, deployments,
                          f'launcher = "none"\n{controller}')
    log = tmp_path / "controller.log"
    cluster = Cluster(start_controller(config, log), f"tcp://127.0.0.1:{ports['client']}",
                      f"tcp://127.0.0.1:{ports['admin']}", f"tcp://127.0.0.1:{ports['worker']}",
                      config, log)
    workers = [subprocess.Popen([sys.executable, "-m", "mesh.cli", "worker",
                                 "--controller", cluster.workers_endpoint, "--worker-id", wid,
                                 "--threads", "1"], stdin=subprocess.DEVNULL,
                                preexec_fn=dies_with_pytest)
               for wid in worker_ids]
    try:
        yield cluster, workers
    finally:
        end_processes([cluster.proc, *workers])
        assert not any(alive(p.pid) for p in workers)


def restart_controller(cluster: Cluster) -> None:
    """SIGKILL the controller and start it again on the same config, at once."""
    cluster.proc.send_signal(signal.SIGKILL)
    cluster.proc.wait(10)
    cluster.proc = start_controller(cluster.config_path, cluster.log_path)
