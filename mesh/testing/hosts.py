"""Hosts, simulated: Linux network namespaces joined by veth pairs and a bridge.

    with Hosts(["ctl", "a", "b"]) as hosts:
        proc = hosts.popen("a", [sys.executable, "-m", "mesh.cli", "worker", ...], log)
        hosts.cut("a")   # host a's link goes down: a partition
        hosts.heal("a")

Each host is a namespace with its own loopback and one interface, ``eth0``, with an address
in 10.77.0.0/24; a further namespace holds the bridge (the "switch"), so nothing is added to
the namespace the tests run in. Processes are started in a host with ``ip netns exec`` (which
execs, so the Popen's PID is the process's own) and ended by PID on exit; whatever is still
inside a namespace after that is killed by ``ip netns pids``, then the namespaces are deleted.
Namespaces that a crashed earlier run left behind (same prefix, dead owner) are deleted first.

Needs root and ``ip`` (iproute2); ``unavailable()`` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any, Self

from mesh.testing.cluster import Cluster
from mesh.testing.configs import write_config
from mesh.testing.processes import end_processes

PREFIX = "meshns"
SUBNET = "10.77.0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=10)


def unavailable() -> str:
    """Why namespaces cannot be made here ("" if they can)."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return ""


def _owner_alive(name: str) -> bool:
    # Names are PREFIX-<owner pid>-<host>.
    parts = name.split("-")
    if len(parts) < 3 or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(ns: str) -> None:
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def remove_stale() -> None:
    """Delete namespaces of this harness whose owning process is gone."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    for line in listed:
        name = line.split(" ")[0]
        if name.startswith(PREFIX + "-") and not _owner_alive(name):
            _kill_inside(name)
            _ip("netns", "del", name, check=False)


class Hosts:
    """A few hosts on one switch. Host ``i`` (in the order given) has address
    ``10.77.0.{i + 1}``."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self._tag = f"{PREFIX}-{os.getpid()}"
        self.switch = f"{self._tag}-switch"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self._tag}-{host}"

    def address(self, host: str) -> str:
        return f"{SUBNET}.{self.names.index(host) + 1}"

    def _port(self, host: str) -> str:
        return f"sw{self.names.index(host)}"  # the switch's side of host's cable

    def __enter__(self) -> Self:
        remove_stale()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, host in enumerate(self.names):
            ns = self.ns(host)
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            # The pair is made inside the host, its far end then moved to the switch.
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"sw{i}")
            _ip("-n", ns, "link", "set", f"sw{i}", "netns", self.switch)
            _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", self.switch, "link", "set", f"sw{i}", "master", "br0")
            _ip("-n", self.switch, "link", "set", f"sw{i}", "up")

    def popen(self, host: str, argv: list[str], log: Path | IO[bytes] | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` on ``host``; its output goes to ``log`` (appended)."""
        out: Any = open(log, "ab") if isinstance(log, Path) else log
        try:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv],
                                    stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env)
        finally:
            if isinstance(log, Path):
                out.close()
        self._procs.append(proc)
        return proc

    def cut(self, host: str) -> None:
        """Unplug ``host``'s cable at the switch: nothing reaches it or leaves it."""
        _ip("-n", self.switch, "link", "set", self._port(host), "down")

    def heal(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", self._port(host), "up")

    def close(self) -> None:
        end_processes(self._procs, 15.0)
        for ns in reversed(self._made):
            _kill_inside(ns)
            _ip("netns", "del", ns, check=False)
        self._made.clear()


WORKER_PORT = 5557  # a host of its own: no other process can hold it


class Site:
    """A controller on host ``ctl`` (launcher "none") and workers that join it from the
    other hosts; the Hosts end them all. The controller's client and admin ports are
    ``ipc://`` sockets in ``folder`` (files cross network namespaces), so a test or benchmark
    in its own namespace reaches them without an address of its own."""

    def __init__(self, hosts: Hosts, folder: Path, deployments: str) -> None:
        self.hosts = hosts
        self.folder = folder
        self.config = folder / "site.toml"
        self.log = folder / "controller.log"
        ctl = hosts.address("ctl")
        self.worker_endpoint = f"tcp://{ctl}:{WORKER_PORT}"
        write_config(self.config, {"client": f"ipc://{folder}/client",
                                   "admin": f"ipc://{folder}/admin",
                                   "worker": self.worker_endpoint},
                     deployments, launcher="none", controller_timeout_ms=3000)
        self.cluster = Cluster(self.start_controller(), f"ipc://{folder}/client",
                               f"ipc://{folder}/admin", self.worker_endpoint, self.config,
                               self.log)
        self.workers: dict[str, Any] = {}

    def start_controller(self) -> subprocess.Popen[bytes]:
        return self.hosts.popen("ctl", [sys.executable, "-m", "mesh.cli", "controller",
                                        "--config", str(self.config)], self.log)

    def restart_controller(self) -> None:
        self.cluster.proc.send_signal(signal.SIGKILL)
        self.cluster.proc.wait(10)
        self.cluster.proc = self.start_controller()

    def worker(self, host: str, worker_id: str) -> None:
        self.workers[worker_id] = self.hosts.popen(host, [
            sys.executable, "-m", "mesh.cli", "worker",
            "--controller", self.worker_endpoint, "--advertise-host", self.hosts.address(host),
            "--worker-id", worker_id, "--threads", "1"], self.folder / f"{worker_id}.log")
