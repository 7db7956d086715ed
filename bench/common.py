"""What every benchmark program needs: free ports, CPU readings, processes ended by PID, a
client that keeps a ledger of its answers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import IO, Any

from mesh.client import Client


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


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads (Linux /proc); 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def controller_section(ports: dict[str, int], **settings: bool | int | float | str) -> str:
    """The ``[controller]`` table a benchmark starts from: loopback endpoints on ``ports``
    (client, admin, worker), no metrics port, one torch thread per worker, then ``settings``."""
    table: dict[str, bool | int | float | str] = {
        f"{k}_endpoint": f"tcp://127.0.0.1:{ports[k]}" for k in ("client", "admin", "worker")}
    table.update(metrics_port=0, worker_threads=1)
    table.update(settings)

    def toml(value: bool | int | float | str) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return f'"{value}"' if isinstance(value, str) else str(value)

    return "[controller]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in table.items())


def start_controller(config: Path, *, log: IO[bytes] | None = None,
                     log_level: str = "INFO") -> subprocess.Popen[bytes]:
    """``meshctl controller --config`` as a subprocess (it starts its own workers)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mesh.cli", "--log-level", log_level, "controller",
         "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT if log is not None else None,
        stdin=subprocess.DEVNULL)


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 20.0) -> None:
    """Terminate one process we started, by its PID; kill it if it will not go."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


class LedgerClient(Client):
    """A real client that also counts every final answer per request id, as received on the
    socket: the benchmarks' figures for lost and duplicated answers come from here, not from
    the controller's counters."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint)
        self.answers: Counter[Any] = Counter()

    def _on_header(self, header: dict[str, Any], req_id: Any, kind: Any,
                   frames: list[Any]) -> None:
        # Every final answer as received, alone in a message or in a batch of them.
        if kind in ("result", "error", "end"):
            self.answers[req_id] += 1
        super()._on_header(header, req_id, kind, frames)
