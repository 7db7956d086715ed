"""Real meshserve processes for integration tests: a controller (``meshctl up``) with its local
workers on free loopback ports, and the means to check that none of them outlives a test."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.admin_client import admin_call

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def dies_with_pytest() -> None:
    """``preexec_fn`` for what a test starts: SIGTERM when pytest dies (killed, or timed out by
    CI) before its teardown could end it, so a broken run leaves no controller holding ports
    and cores on the machine (workers die with their controller: worker/main.py). Start it
    from pytest's main thread: the signal follows the thread that started the process."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(*names: str) -> dict[str, int]:
    """Distinct free ports, one per name: all held at once while picked, since the kernel may
    hand out a port again as soon as the socket that had it is closed."""
    socks = [socket.socket() for _ in names]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return {name: int(s.getsockname()[1]) for name, s in zip(names, socks, strict=True)}
    finally:
        for s in socks:
            s.close()


def pids_with(marker: str) -> list[int]:
    """PIDs of live processes whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class Cluster:
    proc: subprocess.Popen[bytes]
    client: str
    admin: str
    workers_endpoint: str
    config_path: Path
    log_path: Path
    seen_worker_pids: set[int] = field(default_factory=set)
    admin_curve: Any = None  # mesh.security ClientKeys of an allowed admin, when CURVE is on

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def status(self, timeout_s: float = 5.0) -> dict[str, Any]:
        status = await admin_call(self.admin, "status", timeout_s=timeout_s,
                                  curve=self.admin_curve)
        self.seen_worker_pids.update(w["pid"] for w in status["workers"] if w["pid"])
        return status

    async def wait_for(self, predicate: Any, timeout_s: float = 60.0,
                       what: str = "condition", interval_s: float = 0.1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                last = await self.status()
                if predicate(last):
                    return last
            if self.proc.poll() is not None:
                break  # the controller is gone: nothing will change
            await asyncio.sleep(interval_s)
        raise AssertionError(f"timed out waiting for {what} (controller exit code "
                             f"{self.proc.poll()}); last status: {last}\n"
                             f"controller log tail:\n{self.log_tail()}")

    def worker_pids(self) -> list[int]:
        """Live worker processes of this cluster, found by their controller endpoint."""
        return pids_with(f"--controller {self.workers_endpoint}")

    def fork_server_pids(self) -> list[int]:
        """This cluster's worker fork server (worker/forkserver.py), found by its parent."""
        return pids_with(f"worker.forkserver --parent-pid {self.pid} ")

    def gateway_pids(self) -> list[int]:
        """Live HTTP gateway processes of this cluster (meshctl up's, found the same way)."""
        return pids_with(f"gateway --controller {self.client}")

    def meshctl(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mesh.cli", "--admin", self.admin, *args],
            capture_output=True, text=True, timeout=timeout_s, check=False)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def write_config(path: Path, ports: dict[str, int], deployments: str, controller: str = "") -> None:
    if "warm_workers" not in controller:
        # Tests count worker processes; the ones about the warm pool ask for it.
        controller += "\nwarm_workers = 0"
    if "autoscale" not in controller:
        # Tests that set world counts by hand would race the autoscaler; its own tests opt in.
        controller += "\nautoscale = false"
    if "[gateway]" not in deployments:
        # No HTTP gateway unless a test asks for one (on a port of its own).
        deployments += '\n[gateway]\nlisten = ""\n'
    path.write_text(
        "[controller]\n"
        f'client_endpoint = "tcp://127.0.0.1:{ports["client"]}"\n'
        f'admin_endpoint = "tcp://127.0.0.1:{ports["admin"]}"\n'
        f'worker_endpoint = "tcp://127.0.0.1:{ports["worker"]}"\n'
        f"{'' if 'metrics_port' in controller else 'metrics_port = 0'}\n"
        f"{controller}\n{deployments}\n")


async def start_cluster(tmp_path: Path, deployments: str, *, controller: str = "",
                        ready_timeout_s: float = 90.0, wait_serving: bool = True,
                        admin_curve: Any = None) -> Cluster:
    ports = free_ports("client", "admin", "worker")
    config = tmp_path / f"meshserve-{ports['admin']}.toml"
    write_config(config, ports, deployments, controller)
    log_path = tmp_path / f"controller-{ports['admin']}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mesh.cli", "up", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=dies_with_pytest)
    cluster = Cluster(proc, f"tcp://127.0.0.1:{ports['client']}",
                      f"tcp://127.0.0.1:{ports['admin']}", f"tcp://127.0.0.1:{ports['worker']}",
                      config, log_path, admin_curve=admin_curve)
    try:
        await cluster.wait_for(
            lambda s: not wait_serving or all(d["worlds_current"] >= d["worlds_desired"]
                                              for d in s["deployments"]),
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
    """``meshctl controller --config`` (the config's launcher decides who starts workers)."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "mesh.cli", "controller",
                                 "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=dies_with_pytest)


def end_processes(procs: list[subprocess.Popen[bytes]], timeout_s: float = 15.0) -> None:
    """SIGTERM each by its PID, then SIGKILL whatever has not exited in ``timeout_s``."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def joined_cluster(tmp_path: Path, deployments: str, worker_ids: list[str],
                   controller: str = "") -> Iterator[tuple[Cluster, list[subprocess.Popen[bytes]]]]:
    """A controller with ``launcher = "none"`` and workers that join it by themselves
    (``meshctl worker``), all ended by PID on exit."""
    ports = free_ports("client", "admin", "worker")
    config = tmp_path / "joined.toml"
    write_config(config, ports, deployments, f'launcher = "none"\n{controller}')
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
