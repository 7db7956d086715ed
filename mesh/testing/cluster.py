"""A running controller process, seen from outside: its endpoints, its status, its workers
and its log. Tests and benchmarks start it their own way and hand the process in."""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.admin_client import admin_call
from mesh.testing.processes import pids_with
from mesh.testing.waits import Status, wait_status


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

    async def status(self, timeout_s: float = 5.0) -> Status:
        """The admin ``status``; every worker PID it names is remembered, so whoever ends
        this cluster can end those too."""
        status = await admin_call(self.admin, "status", timeout_s=timeout_s,
                                  curve=self.admin_curve)
        self.seen_worker_pids.update(w["pid"] for w in status["workers"] if w["pid"])
        return status

    async def wait_for(self, predicate: Any, timeout_s: float = 60.0,
                       what: str = "condition", interval_s: float = 0.1) -> Status:
        """``wait_status`` on this controller; the failure ends with its log's tail."""
        return await wait_status(self.status, predicate, timeout_s, what,
                                 interval_s=interval_s, exit_code=self.proc.poll,
                                 detail=lambda: f"controller log tail:\n{self.log_tail()}")

    def worker_pids(self) -> list[int]:
        """Live worker processes of this cluster, found by their controller endpoint."""
        return pids_with(f"--controller {self.workers_endpoint}")

    def fork_server_pids(self) -> list[int]:
        """This controller's worker fork server (worker/forkserver.py), found by its parent's
        PID on its command line."""
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
