"""Processes that tests and benchmarks start or look for: each found and ended by its PID
(never by name), and a controller started from a config file."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def pids_with(marker: str) -> list[int]:
    """PIDs of live processes whose command line contains ``marker`` (this one excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def end_processes(procs: Iterable[subprocess.Popen[Any]], timeout_s: float = 15.0) -> None:
    """SIGTERM each by its PID, then SIGKILL whatever has not exited in ``timeout_s``."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


def start_controller(config: Path, log: Path | IO[bytes] | None = None, *,
                     log_level: str | None = None, env: dict[str, str] | None = None,
                     preexec_fn: Callable[[], Any] | None = None) -> subprocess.Popen[bytes]:
    """``meshctl controller --config`` as a subprocess (the config's launcher decides who
    starts workers). ``log``: a file to append its output to, or an open one; none: this
    process's own output."""
    argv = [sys.executable, "-m", "mesh.cli"]
    if log_level is not None:
        argv += ["--log-level", log_level]
    out = open(log, "ab") if isinstance(log, Path) else log
    try:
        return subprocess.Popen([*argv, "controller", "--config", str(config)], stdout=out,
                                stderr=subprocess.STDOUT if out is not None else None,
                                stdin=subprocess.DEVNULL, env=env, preexec_fn=preexec_fn)
    finally:
        if isinstance(log, Path) and out is not None:
            out.close()
