"""The worker fork server: imports torch and the worker once, then forks workers on request.

A worker started with ``python -m worker`` spends seconds importing torch before it can
register. The local launcher (controller/launcher.py, through controller/fork_client.py)
starts this process once instead, a child of the controller: it imports what every worker
imports, and each worker after that is a ``fork`` of it, in milliseconds, that turns itself
into the worker a plain start would have made (worker/fork_child.py). The messages are in
mesh/fork_protocol.py.

Its shape, and why:

- **The server is its children's parent and reaper.** It waits for them (SIGCHLD, through
  the signal wakeup fd, in its one loop) and sends each exit status to the launcher, which
  reports it as it reports a subprocess's return code: Health's reasons (``exited with code
  -9 (SIGKILL)``) do not change. A double fork with the controller as child subreaper would
  make the controller the workers' parent, but also the parent of every orphan below it (a
  dead worker's own children), which nothing there would wait for: asyncio waits only for
  the processes it started.
- **Every child dies with the server, by SIGKILL; the server dies with the controller, by
  SIGKILL.** A parent-death signal follows the parent only, so this chain is how workers
  still die with their controller. SIGKILL, because once the server is gone nobody can reap
  a child and learn its status: a child alive then is killed by the kernel, so -9 is the
  status the launcher reports for it; and a worker's graceful exit would tell nobody
  anything when the controller is gone.
- **One thread, and no CUDA.** ``fork`` copies only the thread that calls it, so a lock
  another thread held stays held in the child for good. The server starts no thread: no
  ZeroMQ context, no torch computation (torch makes its thread pools at the first parallel
  operation, never here), and counts threads (``threading`` and ``/proc/self/task``) before
  every fork. numpy's OpenBLAS starts a pool when it is loaded, but stops it in its own fork
  handler, so one throwaway fork at start leaves the server alone. A child cannot use CUDA
  once its parent has: the server never touches it (each child starts its own device), and
  checks that too. A failed check refuses the fork, and the launcher starts that worker,
  and every later one, plainly.
- **What is read at import is the server's**: ``OMP_NUM_THREADS`` (read by OpenMP when torch
  loads), the ``PYTHON*`` variables. A spawn whose environment differs from the one the
  server started with is refused. What is read later is each child's own: ``--threads`` sets
  torch's pool size in the child, which works because the pool was never made here.
- **Its own crash** ends its children (the SIGKILL above); the launcher sees the socket
  close, reports them, logs it once and starts workers plainly from then on.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import logging
import os
import pkgutil
import select
import signal
import socket
import sys
import threading
import time
from typing import Any

from mesh.fork_protocol import (
    MAX_PACKET_BYTES,
    Exited,
    Ready,
    Refused,
    Spawn,
    Spawned,
    decode_to_server,
    encode,
)
from worker import lifeline, proctitle
from worker.fork_child import become_worker

log = logging.getLogger("worker.forkserver")  # not __main__, as python -m names it

# What every worker imports before it registers, imported here once.
PRELOAD = ("numpy", "torch", "torch.distributed", "uvloop", "zmq", "worker.main",
           "worker.stages", "worker.splits", "safetensors.torch")
# And the built-in models: every module of worker.models (a worker loading one then imports
# nothing).
MODELS_PACKAGE = "worker.models"
# The server's exit code when it cannot fork safely (more than one thread, CUDA started).
UNFIT = 3


def threads_running() -> int:
    """Threads in this process, as Python and as the kernel count them (a library's native
    threads are invisible to ``threading``)."""
    return max(threading.active_count(), len(os.listdir("/proc/self/task")))


def cuda_started() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def unfit() -> str:
    """Why this process cannot fork workers ("" if it can)."""
    threads = threads_running()
    if threads != 1:
        return f"the fork server runs {threads} threads"
    if cuda_started():
        return "CUDA was initialised in the fork server"
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError) as exc:  # Linux before 5.3
        return f"no pidfd_open here ({exc})"
    return ""


def preload() -> list[str]:
    """Import PRELOAD (an error there ends the server: the launcher starts workers plainly)
    and the built-in models; returns the models imported. A model that fails to import is
    logged and left to the workers, which import it (and fail on it) as a plain start would."""
    for name in PRELOAD:
        importlib.import_module(name)
    package = importlib.import_module(MODELS_PACKAGE)
    models = [f"{MODELS_PACKAGE}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    for name in models:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any import error: the workers will say it too
            log.warning("not preloaded: %s (%s: %s)", name, type(exc).__name__, exc)
    return models


def settle_threads() -> None:
    """One fork that does nothing: libraries that stop their thread pools before a fork
    (OpenBLAS's fork handler) do so now, and start them again only when next used."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def _on_signal(signum: int, frame: Any) -> None:
    """Nothing: the signal's byte on the wakeup fd wakes the loop, which does the work."""


class ForkServer:
    """The loop: spawn requests in, children forked, their exits reaped and reported."""

    def __init__(self, sock: socket.socket, env: dict[str, str], title_room: int) -> None:
        self._sock = sock
        self._env = env  # the environment the server started with: each spawn must ask it
        self._room = title_room
        self._pid = os.getpid()
        self._children: set[int] = set()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The handlers a child puts back: what the server had before it set its own.
        self._handlers = {signal.SIGCHLD: signal.getsignal(signal.SIGCHLD)}
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, _on_signal)

    def serve(self) -> None:
        """Until the launcher closes its end (or is gone): then end the children left."""
        try:
            self._send(Ready(pid=self._pid, title_room=self._room))
            while True:
                readable, _, _ = select.select([self._sock.fileno(), self._wake_r], [], [])
                if self._wake_r in readable:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    self._reap()
                if self._sock.fileno() in readable:
                    packet = self._sock.recv(MAX_PACKET_BYTES)
                    if not packet:
                        break
                    self._handle(packet)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the launcher is gone
        for pid in self._children:  # they would die with the server; by PID all the same
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _handle(self, packet: bytes) -> None:
        try:
            request = decode_to_server(packet)
        except ValueError:
            log.exception("a packet that is no spawn request (dropped)")
            return
        refusal = self._refusal(request)
        if refusal:
            log.warning("refused to fork %s: %s", " ".join(request.argv[3:7]), refusal)
            self._send(Refused(id=request.id, reason=refusal))
            return
        self._fork(request)

    def _refusal(self, request: Spawn) -> str:
        """Why this request cannot be forked as the exact worker it names ("" if it can)."""
        if request.argv[:1] != [sys.executable] or request.argv[1:3] != ["-m", "worker"]:
            return f"not a worker of this interpreter ({sys.executable} -m worker)"
        if request.env != self._env:
            changed = sorted(set(request.env.items()) ^ set(self._env.items()))
            return f"its environment differs from the fork server's (first: {changed[0][0]})"
        title = sum(len(arg.encode()) + 1 for arg in request.argv)
        if title > self._room:
            return f"its command line ({title} bytes) is longer than the room ({self._room})"
        return unfit()

    def _fork(self, request: Spawn) -> None:
        sys.stdout.flush()  # nothing buffered may be written twice, by parent and child
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            become_worker(request, server_pid=self._pid, handlers=self._handlers,
                          close_fds=[self._sock.fileno(), self._wake_r, self._wake_w])
        self._children.add(pid)  # not reaped before the loop's next turn: the pid is held
        pidfd = os.pidfd_open(pid)
        try:
            socket.send_fds(self._sock, [encode(Spawned(id=request.id, pid=pid))], [pidfd])
        finally:
            os.close(pidfd)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self._children:
                self._children.discard(pid)
                self._send(Exited(pid=pid, returncode=os.waitstatus_to_exitcode(status)))

    def _send(self, message: Ready | Spawned | Refused | Exited) -> None:
        self._sock.send(encode(message))


def own_title(argv: list[str]) -> list[str]:
    """The server's command line without the padding that makes room for its children's."""
    if "--title-room" in argv:
        at = argv.index("--title-room")
        return argv[:at] + argv[at + 2:]
    return argv


def _configure_logging() -> None:
    # On its own logger, not the root: a child's worker.main configures the root logger as a
    # plain worker does, and would find it taken.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s [fork server] %(name)s: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(os.environ.get("MESH_LOG_LEVEL", "INFO").upper())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.forkserver", description=__doc__)
    parser.add_argument("--parent-pid", type=int, required=True,
                        help="the launching controller: the server dies with it")
    parser.add_argument("--socket-fd", type=int, required=True,
                        help="the launcher's SOCK_SEQPACKET socket, inherited")
    parser.add_argument("--title-room", default="",
                        help="padding: its length is the room a child's command line gets")
    args = parser.parse_args(argv)
    _configure_logging()
    lifeline.follow(args.parent_pid, signal.SIGKILL, "launching controller")
    env = dict(os.environ)  # as started: what every spawn's environment must be
    started = time.monotonic()
    preload()
    gc.freeze()  # the children's collections need not walk (and so copy) the server's objects
    settle_threads()
    problem = unfit()
    if problem:
        log.error("cannot fork workers: %s", problem)
        return UNFIT
    room = proctitle.room()
    proctitle.set_argv(own_title(sys.orig_argv))
    sock = socket.socket(fileno=args.socket_fd)
    log.info("ready in %.2f s (pid %d)", time.monotonic() - started, os.getpid())
    ForkServer(sock, env, room).serve()
    # Nothing to finalize, nothing buffered (logging flushes each record): no interpreter
    # teardown of torch, which would keep the controller's shutdown waiting.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
