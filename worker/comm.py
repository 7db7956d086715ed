"""A world's communicator: a torch.distributed process group built from a store of its own.

No ``init_process_group``, no default group, no patched torch: the backend class is built
directly (``ProcessGroupGloo`` on CPU, ``ProcessGroupNCCL`` on CUDA, non-blocking with abort),
over a ``PrefixStore`` whose prefix names the world and its epoch. So one process can hold
several worlds at once, and each is its own fault domain: when a peer dies, only the worlds
it belonged to fail.

Point-to-point messages carry their own description. Every ``send`` first ships a fixed-size
header (msgpack: a kind, the request tokens, and the dtype and shape of every tensor that
follows), so a receiver never posts a receive for a tensor it was not told about. Every wait
has the world's timeout; failures come out as typed exceptions: ``PeerLost`` (the peer's
connection closed: it crashed or was killed), ``WorldTimeout`` (nothing arrived in time: the
peer hangs or is stopped) or ``CommError`` (anything else). After any error the group is
unusable: the owner aborts it and the controller forms a new world, never retrying on it.
"""

from __future__ import annotations

import datetime
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgpack

log = logging.getLogger(__name__)

HEADER_BYTES = 4096
_LEN = struct.Struct("<I")
# Headers and tensors travel on different tags, so the next header's receive can be posted
# before this message's tensors arrive: the peer's next header never waits for us to ask.
HEADER_TAG = 0
TENSOR_TAG = 1


class CommError(Exception):
    """A world operation failed; the world is broken."""

    kind = "error"


class PeerLost(CommError):
    """A peer of the world is gone (its connection closed or reset)."""

    kind = "peer_lost"


class WorldTimeout(CommError):
    """A world operation did not complete within the world's timeout."""

    kind = "timeout"


_PEER_LOST_MARKERS = ("connection closed", "connection reset", "broken pipe",
                      "connection refused", "socket closed", "closed by peer", "ncclremoteerror")
_TIMEOUT_MARKERS = ("timed out", "timeout", "deadline")


def classify(exc: BaseException) -> CommError:
    """Map a backend exception to PeerLost / WorldTimeout / CommError.

    Types first (torch's DistNetworkError is a lost connection), then the backend's message,
    which is all gloo gives us ("Connection closed by peer", "Timed out waiting ...").
    """
    if isinstance(exc, CommError):
        return exc
    import torch.distributed as dist

    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if any(m in lowered for m in _TIMEOUT_MARKERS):
        return WorldTimeout(text)
    if isinstance(exc, dist.DistNetworkError) or any(m in lowered for m in _PEER_LOST_MARKERS):
        return PeerLost(text)
    return CommError(text)


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise CommError(f"rendezvous address {addr!r} is not HOST:PORT")
    return host, int(port)


class Comm:
    """One world membership's process group, with timed, self-describing p2p messages."""

    def __init__(
        self,
        *,
        world_id: int,
        epoch: int,
        rank: int,
        size: int,
        store: Any,
        device: str,
        timeout_s: float,
    ) -> None:
        import torch
        import torch.distributed as dist

        self.world_id = world_id
        self.epoch = epoch
        self.rank = rank
        self.size = size
        self.device = torch.device(device)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._torch = torch
        self._lock = threading.Lock()
        self._aborted = False
        self._outbox: deque[tuple[list[Any], list[Any], float]] = deque()
        self._next_header: dict[int, tuple[Any, Any]] = {}
        self.pg: Any
        prefix = dist.PrefixStore(f"world/{world_id}/{epoch}/", store)
        try:
            if self.device.type == "cuda":
                opts = dist.ProcessGroupNCCL.Options()
                # Non-blocking communicators: a hung peer cannot wedge this process, and the
                # group can be aborted from another thread.
                opts.config.blocking = False
                opts._timeout = self.timeout
                self.pg = dist.ProcessGroupNCCL(prefix, rank, size, opts)
                self.backend = "nccl"
            else:
                self.pg = dist.ProcessGroupGloo(prefix, rank, size, self.timeout)
                self.backend = "gloo"
        except Exception as exc:
            raise classify(exc) from exc
        self._header_out = torch.zeros(HEADER_BYTES, dtype=torch.uint8, device=self.device)

    def _wait(self, work: Any) -> None:
        try:
            ok = work.wait(self.timeout)
        except Exception as exc:
            raise classify(exc) from exc
        if ok is False:
            raise WorldTimeout(f"no completion within {self.timeout.total_seconds():.1f}s")

    def send(self, dst: int, header: dict[str, Any], tensors: Sequence[Any] = (), *,
             window: int = 0) -> None:
        """Send a header (and the tensors it describes) to rank ``dst``.

        With ``window`` > 0 the send is posted and not waited for, so this stage can compute
        its next micro-batch while the previous one is still on its way (gloo completes a
        send only once the receiver has taken it); at most ``window`` messages stay
        outstanding, the oldest waited for first. Buffers live until their send completes.
        """
        torch = self._torch
        tensors = [t.contiguous() if t.device == self.device else t.to(self.device).contiguous()
                   for t in tensors]
        header = dict(header)
        header["t"] = [[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in tensors]
        body = msgpack.packb(header, use_bin_type=True)
        if len(body) > HEADER_BYTES - _LEN.size:
            # Nothing was sent: the world is fine, only this message cannot go.
            raise ValueError(f"p2p header of {len(body)} bytes exceeds {HEADER_BYTES - 4}")
        raw = _LEN.pack(len(body)) + body
        buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if self._aborted:
            raise CommError("world aborted")
        if window <= 0:
            self.flush()
            out = self._header_out
            out[: len(raw)].copy_(buf)
            self._wait(self.pg.send([out], dst, HEADER_TAG))
            for t in tensors:
                self._wait(self.pg.send([t], dst, TENSOR_TAG))
            return
        out = torch.zeros(HEADER_BYTES, dtype=torch.uint8, device=self.device)
        out[: len(raw)].copy_(buf)
        works = [self.pg.send([out], dst, HEADER_TAG)]
        works += [self.pg.send([t], dst, TENSOR_TAG) for t in tensors]
        self._outbox.append((works, [out, *tensors], time.monotonic()))
        self.reap(window)

    def reap(self, window: int = 0) -> None:
        """Forget completed sends; wait for the oldest while more than ``window`` remain.

        A send pending longer than the world's timeout is a WorldTimeout even if nobody
        waits on it, so a stalled receiver is noticed while this rank is idle.
        """
        outbox = self._outbox
        limit_s = self.timeout.total_seconds()
        while outbox:
            works, _, posted_s = outbox[0]
            if all(w.is_completed() for w in works):
                for w in works:
                    self._wait(w)  # raises if the send failed
                outbox.popleft()
                continue
            if len(outbox) > window:
                for w in works:
                    self._wait(w)
                outbox.popleft()
                continue
            if time.monotonic() - posted_s > limit_s:
                raise WorldTimeout(f"a send has been pending for over {limit_s:.1f}s")
            break

    def flush(self) -> None:
        """Wait until every posted send has completed (each within the world's timeout)."""
        self.reap(0)

    def recv(self, src: int) -> tuple[dict[str, Any], list[Any]]:
        """Receive one header and the tensors it announces from rank ``src``."""
        torch = self._torch
        if self._aborted:
            raise CommError("world aborted")
        self.reap(len(self._outbox))  # surface failed sends before blocking
        posted = self._next_header.pop(src, None)
        if posted is None:
            buf = torch.zeros(HEADER_BYTES, dtype=torch.uint8, device=self.device)
            posted = (self.pg.recv([buf], src, HEADER_TAG), buf)
        work, buf = posted
        self._wait(work)
        raw = buf.cpu().numpy().tobytes() if self.device.type != "cpu" else buf.numpy().tobytes()
        # Ask for the next header now; a fresh buffer, since this one is still being read.
        nxt = torch.zeros(HEADER_BYTES, dtype=torch.uint8, device=self.device)
        self._next_header[src] = (self.pg.recv([nxt], src, HEADER_TAG), nxt)
        (length,) = _LEN.unpack_from(raw)
        header = msgpack.unpackb(raw[_LEN.size: _LEN.size + length], raw=False)
        tensors = []
        for dtype, shape in header.pop("t", []):
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            self._wait(self.pg.recv([t], src, TENSOR_TAG))
            tensors.append(t)
        return header, tensors

    def abort(self) -> None:
        """Make every pending and future operation fail at once; idempotent, never blocks long."""
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
        for method in ("abort", "shutdown"):
            fn = getattr(self.pg, method, None)
            if fn is None:
                continue
            try:
                fn()
                return
            except Exception:  # an already-broken group may refuse; nothing else to do
                log.debug("world %d/%d: %s failed", self.world_id, self.epoch, method,
                          exc_info=True)
