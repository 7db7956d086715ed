"""The local launcher's side of the worker fork server (worker/forkserver.py).

``ForkServer`` starts the server (a child of the controller) when the controller starts
(``begin``, from the launcher's ``adopt``: it imports torch while the controller starts up;
the first spawn starts it otherwise), asks it for workers and hands each back as a
``ForkedProcess``, which the launcher treats as it treats a subprocess: a pid, a return code,
``wait()`` and ``send_signal()``. The server is the workers' parent: it reaps them and sends
their exit statuses, which end their ``wait()``.

When the server cannot serve (it failed to start, refused a fork, or died), ``usable`` turns
false for good and the reason is logged once: the launcher starts workers plainly from then
on. Workers it forked die with it (by SIGKILL, worker/forkserver.py says why); each ends
with -9 once its pidfd says it is gone.

Messages are read in a reader callback on the event loop (``recvmsg`` with the pidfd of each
new child in its ancillary data, mesh/fork_protocol.py), one owner task watches the server's
process, and ``aclose()`` closes the socket (the server exits when it reads the end) and
waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
from typing import Any

from mesh.fork_protocol import (
    MAX_PACKET_BYTES,
    Exited,
    Ready,
    Refused,
    Spawn,
    Spawned,
    decode_from_server,
    encode,
)
from mesh.logs import speaker

log = speaker(logging.getLogger(__name__), "controller")

# A server that imports torch on a busy host may take long; a spawn is a fork (milliseconds).
START_TIMEOUT_S = 60.0
SPAWN_TIMEOUT_S = 10.0
# How long a closing server gets to exit by itself before it is killed.
CLOSE_TIMEOUT_S = 5.0


class ForkUnavailable(RuntimeError):
    """The fork server cannot start this worker, nor any later one: start them plainly."""


def supported() -> str:
    """Why this platform cannot run a fork server ("" if it can)."""
    if sys.platform != "linux":
        return "not Linux"
    for module, name in ((os, "pidfd_open"), (signal, "pidfd_send_signal"),
                         (socket, "recv_fds")):
        if not hasattr(module, name):
            return f"no {module.__name__}.{name}"
    return ""


class ForkedProcess:
    """A worker the fork server forked, as the launcher sees it (the shape of
    ``asyncio.subprocess.Process`` that the launcher uses)."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.pidfd = pidfd  # signals reach this process, never one that reuses its pid
        self._ended = asyncio.Event()

    async def wait(self) -> int:
        await self._ended.wait()
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Raises ProcessLookupError once the process is gone, as a subprocess's does."""
        if self.returncode is not None:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self.pidfd, sig)

    def ended(self, returncode: int) -> None:
        if self.returncode is None:
            self.returncode = returncode
            os.close(self.pidfd)
            self._ended.set()


class ForkServer:
    """Starts the server (``begin``, or the first spawn), asks it for workers, and follows
    what it says."""

    def __init__(self, python: str, title_room: int) -> None:
        self._python = python
        self._title_room = title_room
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[ForkedProcess]] = {}
        self._live: dict[int, ForkedProcess] = {}  # by pid, until its exit is known
        self._sock: socket.socket | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[Ready] | None = None
        self._starting = asyncio.Lock()
        self._launched_at = 0.0
        self.pid = 0
        # Why no more workers are forked ("": they are, once started); said once.
        self.down = supported()
        self._closing = False

    @property
    def usable(self) -> bool:
        return not self.down

    async def begin(self, env: dict[str, str]) -> None:
        """Start the server now, at the controller's start, without waiting for it: it
        imports torch while the controller starts up. ``env`` is the environment every
        later spawn must ask for (the server refuses another)."""
        async with self._starting:
            if self._proc is not None or self.down:
                return
            try:
                await self._launch(env)
            except OSError as exc:
                self._gone(f"it did not start: {exc}")

    async def spawn(self, argv: list[str], env: dict[str, str], cwd: str) -> ForkedProcess:
        """A forked worker running ``argv``; raises ForkUnavailable (then, and from then on,
        start workers plainly). Starts the server if ``begin`` did not, and waits until it
        is ready."""
        await self._until_ready(env)
        if self._sock is None or self.down:
            raise ForkUnavailable(self.down)
        request = Spawn(id=next(self._ids), argv=argv, env=env, cwd=cwd)
        answer: asyncio.Future[ForkedProcess] = asyncio.get_running_loop().create_future()
        self._pending[request.id] = answer
        try:
            self._sock.send(encode(request))
            async with asyncio.timeout(SPAWN_TIMEOUT_S):
                return await answer
        except (OSError, TimeoutError) as exc:
            self._stop_using(f"a spawn failed: {exc or 'no answer in time'}")
            raise ForkUnavailable(self.down) from None
        finally:
            self._pending.pop(request.id, None)

    async def _until_ready(self, env: dict[str, str]) -> None:
        """Wait for the server's ``ready`` (every spawn asks; all but the first find it
        there), at most START_TIMEOUT_S from its launch."""
        await self.begin(env)
        ready = self._ready
        if ready is None or ready.done() or self.down:
            return
        left = START_TIMEOUT_S - (asyncio.get_running_loop().time() - self._launched_at)
        try:
            async with asyncio.timeout(max(left, 0.0)):
                await asyncio.shield(ready)  # other spawns wait on it too
        except ForkUnavailable:
            return  # said by _stop_using; the caller sees ``down``
        except TimeoutError:
            self._gone("it did not start: not ready in time")
            if self._proc is not None and self._proc.returncode is None:
                self._proc.kill()  # it has no child yet

    async def _launch(self, env: dict[str, str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self._python, "-m", "worker.forkserver", "--parent-pid", str(os.getpid()),
                "--socket-fd", str(theirs.fileno()), "--title-room", "." * self._title_room,
                env=env, pass_fds=(theirs.fileno(),), start_new_session=True,
                stdin=asyncio.subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._on_readable)
        self._launched_at = loop.time()
        self._watcher = loop.create_task(self._watch(self._proc), name="launcher.fork_server")

    def _on_readable(self) -> None:
        """Every packet the server sent, in order, until none is left (or the socket ends)."""
        while self._sock is not None:
            try:
                packet, fds, _, _ = socket.recv_fds(self._sock, MAX_PACKET_BYTES, 1)
            except BlockingIOError:
                return
            except OSError as exc:
                self._gone(f"its socket failed: {exc}")
                return
            if not packet:
                self._gone("its socket closed")
                return
            try:
                self._on_message(decode_from_server(packet), fds)
            except ValueError as exc:
                for fd in fds:
                    os.close(fd)
                self._gone(f"it sent a packet that is no server message: {exc}")
                return

    def _on_message(self, message: Any, fds: list[int]) -> None:
        match message:
            case Ready(pid=pid):
                if self._ready is not None and not self._ready.done():
                    self.pid = pid
                    self._ready.set_result(message)
                    log.info("fork server pid %d ready: workers are forked from it", pid)
            case Spawned(id=request_id, pid=pid):
                if not fds:
                    raise ValueError("spawned without the child's pidfd")
                proc = ForkedProcess(pid, fds[0])
                self._live[pid] = proc
                answer = self._pending.get(request_id)
                if answer is None or answer.done():
                    # Given up on (no answer in time): the launcher starts that worker
                    # plainly, so this copy must not register too.
                    proc.send_signal(signal.SIGKILL)
                else:
                    answer.set_result(proc)
            case Refused(reason=reason):
                self._stop_using(f"it refused a worker: {reason}")
            case Exited(pid=pid, returncode=returncode):
                gone = self._live.pop(pid, None)
                if gone is not None:
                    gone.ended(returncode)

    def _stop_using(self, reason: str) -> None:
        """No more forks, said once; the workers forked already still run, and the server
        still reports their ends."""
        if self.down:
            return
        self.down = reason
        if not self._closing:
            log.warning("fork server%s: %s; workers start plainly from now on",
                        f" pid {self.pid}" if self.pid else "", reason)
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(ForkUnavailable(reason))
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ForkUnavailable(reason))
            self._ready.exception()  # retrieved: no spawn may be waiting for it

    def _gone(self, reason: str) -> None:
        """The server is lost (or closed): no more forks, its socket closed (a server still
        running exits on that), and each worker it forked reported when it dies with it."""
        self._stop_using(reason)
        if self._sock is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        for pid, proc in list(self._live.items()):
            loop.add_reader(proc.pidfd, self._orphan_ended, pid)

    def _orphan_ended(self, pid: int) -> None:
        """A worker of a lost server ended: by the kernel's parent-death SIGKILL."""
        proc = self._live.pop(pid, None)
        if proc is not None:
            asyncio.get_running_loop().remove_reader(proc.pidfd)
            proc.ended(-signal.SIGKILL)

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        returncode = await proc.wait()
        self._on_readable()  # what it sent before it went (exits, above all) is read first
        self._gone(f"it exited with code {returncode}")
        (log.info if self._closing else log.warning)(
            "fork server pid %d exited with code %d", proc.pid, returncode)

    async def aclose(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close the socket (the server exits when it reads the end, killing any child left)
        and wait for the server; kill it if it will not go."""
        self._closing = True
        self._gone("the launcher is closing")
        proc = self._proc
        if proc is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await proc.wait()
        except TimeoutError:
            log.warning("fork server pid %d did not exit; SIGKILL", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._watcher is not None:
            await self._watcher
