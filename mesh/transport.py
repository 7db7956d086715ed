"""ZeroMQ sockets driven from event-loop file-descriptor callbacks.

Why not ``await sock.recv_multipart()`` (zmq.asyncio)? Each await costs a future, a task
switch and a poller round trip: in our prototype that was most of the controller's CPU per
request. A ``Pump`` instead registers the socket's FD with the loop and, when it fires,
drains every message that is ready with non-blocking receives and hands each one to a plain
callback (less than half the CPU per request), and under load one wake-up serves hundreds of
messages.

ZeroMQ's FD is edge-triggered and a send can consume the edge (the library processes pending
commands inside send), so after sending we re-check ``EVENTS`` once per loop iteration. A
drain asks ``EVENTS`` before each receive rather than receiving until one fails: a failed
receive raises zmq.Again, which costs several times more (``readable``).
A drain serves at most ``max_burst`` messages before yielding, so one busy socket cannot
starve the others sharing the loop.

Per-message cost matters here (it is most of the controller's CPU), so the pump calls the
Cython backend's ``send``/``recv`` directly with integer flags: pyzmq's ``send_multipart`` costs
about ten times as much as the backend's ``send`` calls for the same frames. Small frames
are copied (cheaper than building a zmq.Frame); frames of ``ZERO_COPY_MIN_BYTES`` or more are
sent without copying, and frames past ``copy_prefix`` (the tensor frames) are received as
zmq.Frame objects, so a large tensor is never copied on its way through the controller.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable, Sequence
from typing import Any

import zmq
from zmq.backend import Socket as _BackendSocket

log = logging.getLogger(__name__)

_recv = _BackendSocket.recv
_send = _BackendSocket.send
_getsockopt = _BackendSocket.get
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
ZERO_COPY_MIN_BYTES = 64 * 1024

OnMessage = Callable[[list[zmq.Frame]], None]


def make_socket(
    context: zmq.Context[Any],
    kind: int,
    *,
    identity: bytes | None = None,
    sndhwm: int = 0,
    rcvhwm: int = 0,
    max_msg_bytes: int = -1,
    curve: Any = None,
) -> zmq.Socket[Any]:
    """A socket with the options every meshserve socket wants (no linger, bounded queues);
    ``curve`` (mesh.security ServerKeys or ClientKeys) makes it a CURVE server or client."""
    sock = context.socket(kind)
    if curve is not None:
        curve.apply(sock)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    if max_msg_bytes > 0:
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    return sock


def recv_nowait(sock: zmq.Socket[Any], copy_prefix: int) -> list[Any] | None:
    """One whole multipart message, or None when nothing is waiting (never blocks)."""
    try:
        return _recv_message(sock, copy_prefix)
    except zmq.Again:
        return None


def _recv_message(sock: zmq.Socket[Any], copy_prefix: int,
                  admit: Callable[[zmq.Frame], bool] | None = None) -> list[Any] | None:
    """The frames of one message (raises zmq.Again when none waits); None when ``admit``
    refuses its first frame (the whole message is read and dropped). Each frame is taken as a
    ``zmq.Frame`` and its ``more`` flag read from it: asking the socket for RCVMORE instead
    builds a SocketOption enum per call in pyzmq (more than the frame's receive)."""
    frame = _recv(sock, _NOBLOCK, False)
    if admit is not None and not admit(frame):
        while frame.more:
            frame = _recv(sock, _NOBLOCK, False)
        return None
    frames: list[Any] = [frame.bytes if copy_prefix > 0 else frame]
    while frame.more:
        frame = _recv(sock, _NOBLOCK, False)
        frames.append(frame.bytes if len(frames) < copy_prefix else frame)
    return frames


def readable(sock: zmq.Socket[Any]) -> bool:
    """Whether a message waits on ``sock``: asking EVENTS is cheaper than a receive that finds
    nothing and raises zmq.Again (several times cheaper, more so right after a forward pass
    has pushed the exception machinery out of the caches; docs/benchmarks.md)."""
    return bool(int(_getsockopt(sock, _EVENTS)) & _POLLIN)


def send_nowait(sock: zmq.Socket[Any], frames: Sequence[Any]) -> None:
    """Send a multipart message without blocking; raises zmq.Again / ZMQError."""
    last = frames[-1]
    for frame in frames[:-1]:
        _send(sock, frame, _MORE, len(frame) < ZERO_COPY_MIN_BYTES)
    _send(sock, last, _NOBLOCK, len(last) < ZERO_COPY_MIN_BYTES)


def bind_socket(sock: zmq.Socket[Any], endpoint: str) -> None:
    """Bind, or close the socket and raise: a socket left open would hang Context.term()."""
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        why = str(exc)
        if exc.errno == errno.EADDRINUSE and endpoint.startswith("tcp://"):
            from mesh.ports import holder

            held = holder(int(endpoint.rsplit(":", 1)[1]))
            why = f"the port is in use{f' by {held}' if held else ''}"
        raise OSError(f"cannot bind {endpoint}: {why}") from exc


class Pump:
    """Delivers every message a socket receives to ``on_message``; sends without blocking."""

    def __init__(
        self,
        sock: zmq.Socket[Any],
        on_message: OnMessage,
        *,
        name: str = "pump",
        max_burst: int = 512,
        copy_prefix: int = 2,
    ) -> None:
        self.sock = sock
        self._copy_prefix = copy_prefix
        self.name = name
        self._on_message = on_message
        self._max_burst = max_burst
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._scheduled = False
        self._closed = False
        self.received = 0
        self.sent = 0
        self.dropped = 0
        # Called once per drain that received something (controller/busy_poll.py).
        self.on_receive: Callable[[], None] | None = None
        # Asked of each message's first frame (its metadata: the peer's CURVE key) before
        # it is delivered; a message it refuses is read and dropped (mesh/security.py).
        self.admit: Callable[[zmq.Frame], bool] | None = None
        self.refused = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = int(self.sock.getsockopt(zmq.FD))
        self._loop.add_reader(self._fd, self._drain)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self._closed and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._recheck)

    def _recheck(self) -> None:
        # Asking EVENTS is cheaper than a receive that raises zmq.Again, and after a send
        # there is usually nothing new to read.
        self._scheduled = False
        if not self._closed and int(_getsockopt(self.sock, _EVENTS)) & _POLLIN:
            self._drain()

    def _drain(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        sock = self.sock
        on_message = self._on_message
        prefix = self._copy_prefix
        n = 0
        try:
            while n < self._max_burst:
                try:
                    # EVENTS before each receive, not a receive until one fails: see readable.
                    if not int(_getsockopt(sock, _EVENTS)) & _POLLIN:
                        return
                    frames = _recv_message(sock, prefix, self.admit)
                    if frames is None:  # a sender whose key was revoked
                        n += 1
                        self.refused += 1
                        continue
                except zmq.Again:
                    return
                except zmq.ZMQError:
                    if self._closed:
                        return
                    raise
                n += 1
                try:
                    on_message(frames)
                except Exception:
                    # A handler bug must not kill the pump: the socket serves other peers too.
                    log.exception("[%s] message handler failed", self.name)
            # Burst limit hit: more may be waiting, and the FD will not fire again for them.
            self._schedule()
        finally:
            self.received += n
            if n and self.on_receive is not None:
                self.on_receive()

    def send(self, frames: Sequence[Any]) -> bool:
        """Send without blocking; returns False (and counts a drop) when the peer is gone."""
        sock = self.sock
        try:
            last = frames[-1]
            for frame in frames[:-1]:
                _send(sock, frame, _MORE, len(frame) < ZERO_COPY_MIN_BYTES)
            _send(sock, last, _NOBLOCK, len(last) < ZERO_COPY_MIN_BYTES)
        except zmq.Again:
            self.dropped += 1
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self.dropped += 1
                return False
            raise
        self.sent += 1
        # The send may have swallowed the read edge; look again once this iteration ends.
        self._schedule()
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
        self.sock.close(linger=0)
