"""Launchers start and stop worker processes; the WorldManager asks, the launcher acts.

``LocalLauncher`` runs workers as local processes, each in its own session (a Ctrl-C on the
terminal reaches the controller alone, which then drains and stops them in order). With
``fork_workers`` (the default) they are forked by a fork server that imported torch once
(worker/forkserver.py, through controller/fork_client.py): tens of milliseconds where a plain
``python -m worker`` takes seconds; where that cannot be done, or the server fails, they are
started plainly, as subprocesses of the controller. Either way a worker looks the same from
outside (its command line, its exit code) and is ended by its PID on shutdown: SIGTERM, then
SIGKILL after a grace period. Workers die with the controller (a parent-death signal, and
they watch it), forked ones through the server, which dies with the controller too, so even a
SIGKILLed controller leaves no orphans behind.

``NoLauncher`` is for controllers whose workers join remotely (``meshctl worker``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from controller.fork_client import ForkServer, ForkUnavailable
from mesh.logs import speaker

log = speaker(logging.getLogger(__name__), "controller")

OnExit = Callable[[str, int], None]  # (worker_id, returncode)
# How long a worker told to stop gets to exit by itself before it is sent SIGTERM.
STOP_GRACE_S = 3.0


class LaunchError(RuntimeError):
    """The launcher cannot start another worker."""


class Launcher(Protocol):
    """What the WorldManager needs from whatever starts workers."""

    can_spawn: bool

    async def adopt(self, timeout_s: float) -> list[str]:
        """Before the first spawn: the ids of the workers this launcher already runs from a
        previous run of its controller (a restart), now its own again (it reports their ends
        as any other). No new worker may take one of these ids."""
        ...

    async def spawn(self, worker_id: str) -> int: ...

    async def stop(self, worker_id: str, timeout_s: float) -> None: ...

    def kill(self, worker_id: str, sig: int = signal.SIGKILL) -> bool: ...

    def pids(self) -> dict[str, int]: ...

    def room(self) -> int: ...

    def host(self) -> dict[str, int]: ...

    async def aclose(self, timeout_s: float) -> None: ...


def count_gpus() -> int:
    """NVIDIA GPUs on this host, without importing torch (or initialising CUDA) here."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


class WorkerProcess(Protocol):
    """A started worker: a subprocess (``asyncio.subprocess.Process``) or a forked one
    (``controller.fork_client.ForkedProcess``)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...


@dataclass
class _Child:
    worker_id: str
    proc: WorkerProcess
    device: str
    started_s: float = field(default_factory=time.monotonic)
    watcher: asyncio.Task[None] | None = None


class LocalLauncher:
    """Local workers: ``python -m worker --controller ... --worker-id ...``, forked or run."""

    can_spawn = True

    def __init__(
        self,
        controller_endpoint: str,
        *,
        on_exit: OnExit,
        device: str = "auto",
        threads: int = 0,
        max_workers: int = 16,
        python: str = sys.executable,
        extra_env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
        fork: bool = True,
    ) -> None:
        self.controller_endpoint = controller_endpoint
        self._on_exit = on_exit
        self._device = device
        self._threads = threads
        self._max_workers = max_workers
        self._python = python
        self._extra_env = extra_env or {}
        self._extra_args = extra_args or []  # e.g. the CURVE keys of the controller's children
        self._children: dict[str, _Child] = {}
        self._gpus = count_gpus() if device in ("auto", "cuda") else 0
        self._closing = False
        # Room for a forked worker's command line: the longest this launcher writes, with a
        # worker id of up to 64 characters.
        room = sum(len(arg.encode()) + 1 for arg in self._command("w" * 64, "cuda:9999"))
        self._forks = ForkServer(python, title_room=room) if fork else None

    def _pick_device(self) -> str:
        if self._device not in ("auto", "cuda"):
            return self._device
        if self._gpus == 0:
            return "cpu" if self._device == "auto" else "cuda:0"
        used = [c.device for c in self._children.values()]
        # Least-loaded GPU: one worker per GPU until every GPU has one.
        return min((f"cuda:{i}" for i in range(self._gpus)), key=used.count)

    async def adopt(self, timeout_s: float) -> list[str]:
        """None to adopt (its workers die with the controller that started them); but this
        is the controller's start, before its first spawn: the fork server starts now, and
        imports torch while the rest of the controller starts up."""
        if self._forks is not None:
            await self._forks.begin(self._env())
        return []

    async def spawn(self, worker_id: str) -> int:
        if self._closing:
            raise LaunchError("launcher is shutting down")
        if len(self._children) >= self._max_workers:
            raise LaunchError(f"local worker limit reached ({self._max_workers})")
        device = self._pick_device()
        proc, how = await self._start(self._command(worker_id, device), self._env())
        child = _Child(worker_id, proc, device)
        self._children[worker_id] = child
        child.watcher = asyncio.get_running_loop().create_task(
            self._watch(child), name=f"launcher.watch.{worker_id}")
        log.info("started worker %s pid %d on %s (%s)", worker_id, proc.pid, device, how)
        return proc.pid

    def _command(self, worker_id: str, device: str) -> list[str]:
        return [
            self._python, "-m", "worker",
            "--controller", self.controller_endpoint,
            "--worker-id", worker_id,
            "--device", device,
            "--threads", str(self._threads),
            "--parent-pid", str(os.getpid()),
            "--exit-on-controller-loss",  # a child must not outlive its controller
            *self._extra_args,
        ]

    def _env(self) -> dict[str, str]:
        env = {**os.environ, **self._extra_env}
        if self._threads > 0:
            # Set before torch loads: OpenMP sizes its pool per thread, and a pool larger than
            # the slot keeps a spinning helper thread that slows every process on the host.
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env.setdefault(var, str(self._threads))
        return env

    async def _start(self, cmd: list[str], env: dict[str, str]) -> tuple[WorkerProcess, str]:
        """Forked when the fork server can, else a plain subprocess (its failure is logged
        once, by the fork server)."""
        if self._forks is not None and self._forks.usable:
            with contextlib.suppress(ForkUnavailable):
                return await self._forks.spawn(cmd, env, os.getcwd()), "forked"
        if self._closing:  # while the fork server was asked, or started
            raise LaunchError("launcher is shutting down")
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, start_new_session=True,
                                                    stdin=asyncio.subprocess.DEVNULL)
        return proc, "plain"

    async def _watch(self, child: _Child) -> None:
        rc = await child.proc.wait()
        self._children.pop(child.worker_id, None)
        log.info("worker %s pid %d exited with %d", child.worker_id,
                 child.proc.pid, rc)
        self._on_exit(child.worker_id, rc)

    def pids(self) -> dict[str, int]:
        return {wid: c.proc.pid for wid, c in self._children.items()}

    def room(self) -> int:
        """How many more workers this launcher may start now."""
        return 0 if self._closing else self._max_workers - len(self._children)

    def host(self) -> dict[str, int]:
        """What this host can compute at once: its cores and GPUs, the torch threads each
        worker uses, and so how many workers compute without taking turns (GPUs, or cores /
        threads). More workers than that share hardware: the autoscaler measures whether one
        more world still adds service rate."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        threads = self._threads if self._threads > 0 else cores  # torch's default: all cores
        slots = self._gpus if self._gpus else max(1, cores // threads)
        return {"cores": cores, "gpus": self._gpus, "threads_per_worker": threads,
                "compute_slots": slots}

    def kill(self, worker_id: str, sig: int = signal.SIGKILL) -> bool:
        child = self._children.get(worker_id)
        if child is None or child.proc.returncode is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            child.proc.send_signal(sig)
            return True
        return False

    async def stop(self, worker_id: str, timeout_s: float) -> None:
        child = self._children.get(worker_id)
        if child is None:
            return
        await self._stop_child(child, timeout_s)

    async def _stop_child(self, child: _Child, timeout_s: float) -> None:
        """End one worker by its PID. It was told to stop (Shutdown) just before: give it
        ``grace`` to exit on its own, then SIGTERM (it stops gracefully on that too), then
        SIGKILL once ``timeout_s`` has passed."""
        proc = child.proc
        grace_s = min(STOP_GRACE_S, timeout_s / 2)
        if proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await proc.wait()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout_s):
                    await proc.wait()
            except TimeoutError:
                log.warning("worker %s pid %d ignored SIGTERM; SIGKILL",
                            child.worker_id, proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
                await proc.wait()
        if child.watcher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await child.watcher

    async def aclose(self, timeout_s: float) -> None:
        """Stop every worker this launcher started, each by its own PID, then the fork
        server (it reports the forked ones' exits until then)."""
        self._closing = True
        children = list(self._children.values())
        await asyncio.gather(*(self._stop_child(c, timeout_s) for c in children))
        if self._forks is not None:
            await self._forks.aclose()


class NoLauncher:
    """Workers join on their own (``meshctl worker``); this controller starts none."""

    can_spawn = False

    async def adopt(self, timeout_s: float) -> list[str]:
        return []  # workers that joined by themselves register again by themselves

    async def spawn(self, worker_id: str) -> int:
        raise LaunchError("this controller has no launcher; start workers with 'meshctl worker'")

    async def stop(self, worker_id: str, timeout_s: float) -> None:
        return None

    def kill(self, worker_id: str, sig: int = signal.SIGKILL) -> bool:
        return False

    def pids(self) -> dict[str, int]:
        return {}

    def room(self) -> int:
        return 0

    def host(self) -> dict[str, int]:
        return {}  # workers run elsewhere, on hosts this controller does not know

    async def aclose(self, timeout_s: float) -> None:
        return None
