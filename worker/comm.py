"""A world's communicator: a torch.distributed process group built from a store of its own.

No ``init_process_group``, no default group, no patched torch: the backend class is built
directly (``ProcessGroupGloo``, or ``ProcessGroupNCCL`` non-blocking with abort), over a
``PrefixStore`` whose prefix names the world and its epoch. So one process can hold several
worlds at once, and each is its own fault domain: when a peer dies, only the worlds it belonged
to fail.

The backend is chosen per world by the controller, from where its ranks are (see
``controller.placement``): NCCL only when every rank has a CUDA device of its own; gloo
otherwise. Gloo cannot carry CUDA tensors between processes, so a gloo world on CUDA devices
(several workers sharing one GPU, or a mix of CPU and GPU ranks) stages every tensor through
host memory: copied to the CPU before a send, back to the device after a receive.

Point-to-point messages carry their own description. Every ``send`` first ships a fixed-size
header (msgpack: the message and the dtype and shape of every tensor that follows), so a
receiver never posts a receive for a tensor it was not told about.

Every call into the process group (building it, posting a send or a receive, waiting,
polling) goes through ``_guard``, the one place that turns a backend failure into a typed
error: ``PeerLost`` (the peer's connection closed: it crashed or was killed), ``WorldTimeout``
(nothing completed in time: the peer hangs or is stopped) or ``CommError`` (anything else).
Posting can fail as well as waiting (gloo raises at once on a pair whose peer is gone), so no
backend exception ever escapes as a plain RuntimeError and passes for a model failure.

Completion is only ever learned from something true. On gloo a posted send's
``is_completed()`` stays False until someone calls ``wait()``, even after the peer took the
data, and a ``wait`` shorter than the world's timeout closes the pair when it expires; so a
gloo operation completes by a blocking ``wait`` with the world's timeout, nothing else. NCCL
completes on the device, so its operations are polled (``is_completed``) up to the same
timeout. After any error the group is unusable: its owner closes it and the controller forms a
new world, never retrying on it. Closing releases the group, which closes its connections: a
peer blocked on this rank fails at once with ``PeerLost``.
"""

from __future__ import annotations

import datetime
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import msgpack

from worker.rendezvous import pin_nccl_to

log = logging.getLogger(__name__)

HEADER_BYTES = 4096
_LEN = struct.Struct("<I")
# Headers and tensors travel on different tags, so the next header's receive can be posted
# before this message's tensors arrive: the peer's next header never waits for us to ask.
HEADER_TAG = 0
TENSOR_TAG = 1
BACKENDS = ("gloo", "nccl")

T = TypeVar("T")


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
                      "connection refused", "socket closed", "closed by peer", "ncclremoteerror",
                      "pair closure")
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


def default_backend(device: str) -> str:
    """The backend a world of ranks on distinct devices of this kind uses."""
    return "nccl" if device.startswith("cuda") else "gloo"


class Comm:
    """One world membership's process group, with timed, self-describing p2p messages.

    Used by one thread at a time (its world's runner); ``abort`` may be called from any
    thread.
    """

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
        backend: str = "",
        connect_timeout_s: float = 0.0,
        token: str = "",
        bind_host: str = "",
    ) -> None:
        """``connect_timeout_s`` bounds the wait for every rank to arrive (a peer may still be
        loading its stage), ``timeout_s`` every operation after that. ``bind_host``: the
        address gloo listens on and tells its peers (the worker's advertised address); empty
        means gloo's own choice, the address the host name resolves to, which on a host with
        several interfaces (or in a network namespace) may be one the peers cannot reach."""
        import torch
        import torch.distributed as dist

        self.world_id = world_id
        self.epoch = epoch
        self.rank = rank
        self.size = size
        self.device = torch.device(device)
        self.backend = backend or default_backend(device)
        if self.backend not in BACKENDS:
            raise CommError(f"unknown backend {self.backend!r}; expected one of {BACKENDS}")
        if self.backend == "nccl" and self.device.type != "cuda":
            raise CommError(f"backend nccl needs a CUDA device, this rank has {device}")
        # Where tensors travel: on the device for NCCL, through host memory for gloo.
        self.wire = self.device if self.backend == "nccl" else torch.device("cpu")
        self.staged = self.wire != self.device
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self._torch = torch
        self._lock = threading.Lock()
        self._aborted = False
        self._outbox: deque[tuple[list[Any], list[Any]]] = deque()
        # Seconds spent blocked on a peer (a full send window, a receive not yet arrived):
        # waiting, not work, so rank 0 does not count it as busy (EntryStage._waited_s).
        self.waited_s = 0.0
        self._next_header: dict[int, tuple[Any, Any]] = {}
        self.pg: Any = None
        # The world's token (from its Join) in the prefix: nobody who was not told it can meet
        # this world's ranks at the store.
        prefix = dist.PrefixStore(f"world/{world_id}/{epoch}/{token}/" if token else
                                  f"world/{world_id}/{epoch}/", store)
        connect = datetime.timedelta(seconds=max(timeout_s, connect_timeout_s))
        if self.backend == "nccl":
            if bind_host:
                pin_nccl_to(bind_host)
            opts = dist.ProcessGroupNCCL.Options()
            # Non-blocking communicators: a hung peer cannot wedge this process, and the
            # group can be aborted from another thread.
            opts.config.blocking = False
            opts._timeout = self.timeout
            self.pg = self._guard(dist.ProcessGroupNCCL, prefix, rank, size, opts)
        elif bind_host:
            gloo = dist.ProcessGroupGloo
            options = gloo._Options()  # type: ignore[attr-defined]
            options._devices = [gloo.create_device(hostname=bind_host)]
            options._timeout = connect
            self.pg = self._guard(gloo, prefix, rank, size, options)
        else:
            self.pg = self._guard(dist.ProcessGroupGloo, prefix, rank, size, connect)
            set_timeout = getattr(self.pg, "_set_default_timeout", None)
            if set_timeout is not None:
                set_timeout(self.timeout)

    # -- the one way into the process group -----------------------------------------------

    def _guard(self, fn: Callable[..., T], *args: Any) -> T:
        """Call into the backend; any failure comes out as a typed CommError."""
        if self._aborted:
            raise CommError(f"world {self.world_id}/{self.epoch} was aborted")
        try:
            return fn(*args)
        except CommError:
            raise
        except Exception as exc:
            raise classify(exc) from exc

    def _group(self) -> Any:
        pg = self.pg
        if pg is None or self._aborted:
            raise CommError(f"world {self.world_id}/{self.epoch} was aborted")
        return pg

    def _complete(self, work: Any) -> None:
        """Block until ``work`` completes, at most the world's timeout."""
        if self.backend == "nccl":
            deadline = time.monotonic() + self.timeout_s
            pause_s = 0.00005
            while not self._guard(work.is_completed):
                if time.monotonic() > deadline:
                    raise WorldTimeout(f"no completion within {self.timeout_s:.1f}s")
                time.sleep(pause_s)
                pause_s = min(0.001, pause_s * 2)
        if self._guard(work.wait, self.timeout) is False:
            raise WorldTimeout(f"no completion within {self.timeout_s:.1f}s")

    # -- messages -------------------------------------------------------------------------

    def _to_wire(self, t: Any) -> Any:
        if t.device != self.wire:
            t = t.to(self.wire)
        return t.contiguous()

    def send(self, dst: int, header: dict[str, Any], tensors: Sequence[Any] = (), *,
             window: int = 0) -> None:
        """Send a header (and the tensors it describes) to rank ``dst``.

        With ``window`` > 0 the send is posted and not waited for, so this stage can compute
        its next micro-batch while the previous one is still on its way (gloo completes a
        send only once the receiver has taken it); at most ``window`` messages stay
        outstanding, the oldest waited for first. Buffers live until their send completes.
        Raises ValueError (nothing sent, the world is fine) when the header is too large.
        """
        torch = self._torch
        wire = [self._to_wire(t) for t in tensors]
        header = dict(header)
        header["t"] = [[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in wire]
        body = msgpack.packb(header, use_bin_type=True)
        if len(body) > HEADER_BYTES - _LEN.size:
            raise ValueError(f"p2p header of {len(body)} bytes exceeds {HEADER_BYTES - 4}")
        raw = _LEN.pack(len(body)) + body
        out = torch.zeros(HEADER_BYTES, dtype=torch.uint8, device=self.wire)
        out[: len(raw)].copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        pg = self._group()
        works = [self._guard(pg.send, [out], dst, HEADER_TAG)]
        works += [self._guard(pg.send, [t], dst, TENSOR_TAG) for t in wire]
        self._outbox.append((works, [out, *wire]))
        self.reap(max(0, window))

    @property
    def pending_sends(self) -> int:
        """Messages posted and not yet known to be complete."""
        return len(self._outbox)

    def reap(self, window: int = 0) -> None:
        """Wait for the oldest posted messages until at most ``window`` remain outstanding."""
        outbox = self._outbox
        if len(outbox) <= window:
            return
        started = time.monotonic()
        try:
            while len(outbox) > window:
                works, _ = outbox[0]
                for w in works:
                    self._complete(w)  # raises if the send failed or timed out
                outbox.popleft()
        finally:
            self.waited_s += time.monotonic() - started

    def flush(self) -> None:
        """Wait until every posted send has completed (each within the world's timeout).

        On gloo this is the only true word that the peer took what we sent: an idle rank 0
        flushes before each keepalive, so a receiver that stopped taking is noticed within
        the world's timeout, and a live one costs nothing (the waits return at once)."""
        self.reap(0)

    def recv(self, src: int) -> tuple[dict[str, Any], list[Any]]:
        """Receive one header and the tensors it announces from rank ``src``."""
        torch = self._torch
        pg = self._group()
        posted = self._next_header.pop(src, None)
        if posted is None:
            buf = torch.zeros(HEADER_BYTES, dtype=torch.uint8, device=self.wire)
            posted = (self._guard(pg.recv, [buf], src, HEADER_TAG), buf)
        work, buf = posted
        started = time.monotonic()
        try:
            self._complete(work)
        finally:
            self.waited_s += time.monotonic() - started
        raw = buf.cpu().numpy().tobytes() if buf.device.type != "cpu" else buf.numpy().tobytes()
        if self.backend == "gloo":
            # Ask for the next header now (a fresh buffer: this one is still being read), so
            # the peer's next header never waits for us to ask. Only gloo: it matches by tag,
            # while NCCL matches a pair's operations in order and would pair this receive
            # with the tensors that follow the current header.
            nxt = torch.zeros(HEADER_BYTES, dtype=torch.uint8, device=self.wire)
            self._next_header[src] = (self._guard(pg.recv, [nxt], src, HEADER_TAG), nxt)
        try:
            (length,) = _LEN.unpack_from(raw)
            header = msgpack.unpackb(raw[_LEN.size: _LEN.size + length], raw=False)
            described = header.pop("t", [])
            specs = [(getattr(torch, dtype), [int(n) for n in shape]) for dtype, shape in described]
        except Exception as exc:  # a peer that speaks garbage is as good as gone
            raise CommError(f"unreadable p2p header from rank {src}: {exc!r}") from exc
        tensors = []
        for dtype, shape in specs:
            t = torch.empty(shape, dtype=dtype, device=self.wire)
            self._complete(self._guard(pg.recv, [t], src, TENSOR_TAG))
            tensors.append(t.to(self.device) if self.staged else t)
        return header, tensors

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def aborted(self) -> bool:
        return self._aborted

    def abort(self) -> None:
        """Make every future operation fail at once; idempotent, never blocks long, any thread.

        NCCL also aborts operations in flight. A gloo wait already blocked cannot be woken
        from here: it ends when the peer answers, closes (its group released) or the world's
        timeout passes."""
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
        pg = self.pg
        if pg is None or self.backend != "nccl":
            return
        try:
            pg.abort()
        except Exception:  # an already-broken group may refuse; nothing else to do
            log.debug("world %d/%d: abort failed", self.world_id, self.epoch, exc_info=True)

    def close(self) -> None:
        """Release the group (by its owner thread, when done with it): its connections close,
        so a peer still waiting on this rank fails at once instead of at its timeout."""
        self.abort()
        self._outbox.clear()
        self._next_header.clear()
        pg, self.pg = self.pg, None
        if pg is not None and self.backend == "nccl":
            try:
                pg.shutdown()
            except Exception:
                log.debug("world %d/%d: shutdown failed", self.world_id, self.epoch,
                          exc_info=True)
        del pg
