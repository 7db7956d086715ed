"""The HTTP gateway that ``meshctl up`` starts beside its controller: a process of its own (it
parses HTTP off the controller's loop), started once the controller listens, restarted if it
dies while the controller runs (at most ``MAX_RESTARTS`` in ``RESTART_WINDOW_S``), stopped
first on shutdown so that its requests finish while the controller still answers them, and
bound to die with the controller (the parent-death signal)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import signal
import subprocess
import sys
import time
from collections import deque

from controller.config import Config
from mesh.logs import speaker

log = speaker(logging.getLogger(__name__), "controller")

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
_PR_SET_PDEATHSIG = 1


def dies_with_parent() -> None:
    """In a child, before exec: SIGTERM when the parent dies (Linux's parent-death signal)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def gateway_command(config: Config, log_level: str) -> list[str]:
    """``meshctl gateway`` for ``config``: its controller's client endpoint, and its CURVE keys
    (the gateway's own, or the controller's pair, which the controller allows on its client
    port)."""
    g = config.gateway
    s = config.security
    cmd = [sys.executable, "-m", "mesh.cli", "--log-level", log_level]
    if s.curve:
        cmd += ["--key", g.key or s.controller_key, "--controller-key", s.controller_key]
    settings = {k: getattr(g, k) for k in g.__dataclass_fields__ if k not in ("key",)}
    return [*cmd, "gateway", "--controller", config.controller.client_endpoint,
            "--settings", json.dumps(settings)]


class GatewayProcess:
    def __init__(self, config: Config, *, log_level: str = "WARNING") -> None:
        self._cmd = gateway_command(config, log_level)
        self.listen = config.gateway.listen
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._starts: deque[float] = deque()

    def start(self) -> None:
        self._starts.append(time.monotonic())
        self.proc = subprocess.Popen(self._cmd, stdin=subprocess.DEVNULL,
                                     preexec_fn=dies_with_parent)
        log.info("gateway started (pid %d) on %s", self.proc.pid, self.listen)

    async def supervise(self) -> None:
        """Restart it when it dies unasked, within the restart budget."""
        while not self._stopping:
            await asyncio.sleep(0.5)
            proc = self.proc
            if proc is None or proc.poll() is None or self._stopping:
                continue
            now = time.monotonic()
            while self._starts and self._starts[0] < now - RESTART_WINDOW_S:
                self._starts.popleft()
            if len(self._starts) >= MAX_RESTARTS:
                log.error("gateway exited with %s; %d restarts in %.0fs: not restarting",
                          proc.returncode, len(self._starts), RESTART_WINDOW_S)
                return
            log.warning("gateway exited with %s; restarting it", proc.returncode)
            self.start()

    def terminate(self) -> None:
        """Ask it to stop (it finishes what it is answering first)."""
        self._stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout_s: float = 15.0) -> None:
        """Until it has exited (killed after ``timeout_s``: longer than its own drain)."""
        proc = self.proc
        if proc is None:
            return
        try:
            await asyncio.to_thread(proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("gateway did not stop within %.0fs; killing it", timeout_s)
            proc.kill()
            proc.wait()
