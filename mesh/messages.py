"""Every message that crosses a process boundary, defined once.

Two protocols share these definitions (docs/protocol.md is the normative spec):

* client <-> controller (the Frontend's ROUTER socket): frame 0 is a msgpack map with ``v``
  (protocol version), ``kind`` and ``id``; tensors follow as raw frames (see mesh.codec).
* worker <-> controller (the worker ROUTER socket): control messages are msgpack maps with a
  ``kind``; the two data-path messages (``req`` and ``res``) carry a short msgpack array as
  frame 0 so the controller can route them without decoding the client's header, which
  travels untouched as frame 1, followed by the tensor frames.

Control messages are frozen, slotted dataclasses; ``to_wire`` and ``from_wire`` are the only
places that turn them into maps and back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from mesh.errors import BadRequest

PROTOCOL_VERSION = 1
# A string request id travels with its request through every pipeline stage: keep it short.
MAX_ID_BYTES = 256
# Loaded stages no world uses that a worker keeps until the controller says otherwise.
DEFAULT_MAX_IDLE_STAGES = 8


class ClientKind:
    """Values of ``kind`` in client-protocol headers."""

    INFER = "infer"
    STREAM = "stream"
    CANCEL = "cancel"
    RESULT = "result"
    CHUNK = "chunk"
    END = "end"
    ERROR = "error"


REQUEST_KINDS = frozenset({ClientKind.INFER, ClientKind.STREAM, ClientKind.CANCEL})


# Data-path tags (frame 0 of worker-protocol data messages is [tag, rid, world_id, ...]).
# A world runner's socket -> controller: [HELLO, world_id, epoch]; the controller echoes
# [HELLO] back, after which it can route to that socket (a ROUTER reaches a peer that spoke).
HELLO = "hello"
DISPATCH = "req"  # controller -> worker: [DISPATCH, rid, world_id, epoch, deadline_ms]
REPLY = "res"  # worker -> controller: [REPLY, rid, world_id, epoch, status]
CANCEL_WORK = "cancel"  # controller -> worker: [CANCEL_WORK, rid, world_id, epoch]
REPLY_OK = 0  # status: frame 1 is a client "result"/"chunk"/"end" header
REPLY_ERROR = 1  # status: frame 1 is a client "error" header
REPLY_CHUNK = 2  # status: a stream chunk, more to come


def result_header(req_id: Any, outputs: dict[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "kind": ClientKind.RESULT, "id": req_id, "outputs": outputs}


def error_header(req_id: Any, code: str, message: str, retryable: bool) -> dict[str, Any]:
    return {
        "v": PROTOCOL_VERSION,
        "kind": ClientKind.ERROR,
        "id": req_id,
        "code": code,
        "message": message,
        "retryable": retryable,
    }


def request_header(
    kind: str,
    req_id: Any,
    model: str,
    inputs: dict[str, Any],
    timeout_ms: int | None,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    header: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "kind": kind,
        "id": req_id,
        "model": model,
        "inputs": inputs,
    }
    if timeout_ms is not None:
        header["timeout_ms"] = timeout_ms
    if params:
        header["params"] = params
    return header


M = TypeVar("M", bound="Message")


@dataclass(frozen=True, slots=True)
class Message:
    """A control message: a map with ``kind`` plus the dataclass fields."""

    KIND: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.KIND}
        for f in dataclasses.fields(self):
            out[f.name] = getattr(self, f.name)
        return out

    @classmethod
    def from_wire(cls: type[M], data: dict[str, Any]) -> M:
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                kwargs[f.name] = data[f.name]
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise BadRequest(f"{cls.KIND} message lacks field {f.name!r}")
        return cls(**kwargs)


# -- worker -> controller -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Register(Message):
    KIND: ClassVar[str] = "register"
    worker_id: str
    pid: int
    host: str
    device: str
    version: int = PROTOCOL_VERSION
    # The GPU's UUID when ``device`` is a CUDA device: two workers on one GPU report the same
    # one whatever CUDA_VISIBLE_DEVICES made them call it (their world then uses gloo).
    device_uuid: str = ""
    # HOST:PORT of the worker's rendezvous store (worlds whose rank 0 it is meet there).
    store_addr: str = ""
    # Set by a worker that was started for a particular role (warm pool, launcher slot).
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    KIND: ClassVar[str] = "heartbeat"
    seq: int
    queued: int = 0
    busy: bool = False
    # Cumulative batching counters over every world this worker serves.
    batches: int = 0
    rows: int = 0
    requests: int = 0
    busy_s: float = 0.0
    # Stages loaded on this worker, and how many of them no world uses.
    stages: int = 0
    idle_stages: int = 0
    # CPU seconds the worker process has used (all threads): how many cores it keeps busy.
    cpu_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Joined(Message):
    KIND: ClassVar[str] = "joined"
    world_id: int
    epoch: int
    load_ms: float = 0.0
    form_ms: float = 0.0
    # The handler's description of its inputs (for status and meshctl bench).
    inputs: dict[str, Any] = field(default_factory=dict)
    # Rank 0 only: the identity of the socket the world takes its requests on.
    entry: str = ""


@dataclass(frozen=True, slots=True)
class JoinFailed(Message):
    KIND: ClassVar[str] = "join_failed"
    world_id: int
    epoch: int
    error: str


@dataclass(frozen=True, slots=True)
class Left(Message):
    KIND: ClassVar[str] = "left"
    world_id: int
    epoch: int


@dataclass(frozen=True, slots=True)
class WorldBroken(Message):
    KIND: ClassVar[str] = "world_broken"
    world_id: int
    epoch: int
    reason: str
    peer_lost: bool = False


# -- controller -> worker -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    KIND: ClassVar[str] = "welcome"
    heartbeat_interval_ms: int
    controller_timeout_ms: int
    # Loaded stages no world uses that the worker may keep (the rest are dropped, LRU first).
    max_idle_stages: int = DEFAULT_MAX_IDLE_STAGES


@dataclass(frozen=True, slots=True)
class Join(Message):
    """Become rank ``rank`` of world ``world_id``/``epoch`` serving ``deployment``."""

    KIND: ClassVar[str] = "join"
    world_id: int
    epoch: int
    rank: int
    size: int
    deployment: dict[str, Any]
    rendezvous: str = ""
    world_timeout_ms: int = 30000
    # How long the ranks may take to meet (a peer may still be loading its stage).
    form_timeout_ms: int = 120000
    peers: list[str] = field(default_factory=list)
    # "gloo" or "nccl", chosen by the controller from where the ranks are ("": the device's
    # default, NCCL on CUDA).
    backend: str = ""


@dataclass(frozen=True, slots=True)
class Leave(Message):
    KIND: ClassVar[str] = "leave"
    world_id: int
    epoch: int
    abort: bool = False


@dataclass(frozen=True, slots=True)
class Shutdown(Message):
    KIND: ClassVar[str] = "shutdown"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Fault(Message):
    """Fault injection: make every batch and stage computation take ``delay_ms`` longer."""

    KIND: ClassVar[str] = "fault"
    delay_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Controller liveness for the worker (the worker exits when these stop)."""

    KIND: ClassVar[str] = "ping"
    seq: int = 0
    # Answer with a heartbeat at once (the controller checks a suspect worker is alive).
    reply: bool = False


@dataclass(frozen=True, slots=True)
class Preload(Message):
    """Load (and cache) one stage of a deployment now, so a later join is fast (warm pool)."""

    KIND: ClassVar[str] = "preload"
    deployment: dict[str, Any]
    rank: int = 0
    size: int = 1


WORKER_MESSAGES: dict[str, type[Message]] = {
    cls.KIND: cls for cls in (Register, Heartbeat, Joined, JoinFailed, Left, WorldBroken)
}
CONTROLLER_MESSAGES: dict[str, type[Message]] = {
    cls.KIND: cls for cls in (Welcome, Join, Leave, Shutdown, Ping, Fault, Preload)
}


def parse_control(data: Any, table: dict[str, type[Message]]) -> Message:
    """Turn an unpacked control map into its dataclass, or raise BadRequest."""
    if not isinstance(data, dict):
        raise BadRequest("control message must be a map")
    cls = table.get(data.get("kind", ""))
    if cls is None:
        raise BadRequest(f"unknown control message kind {data.get('kind')!r}")
    try:
        return cls.from_wire(data)
    except TypeError as exc:
        raise BadRequest(f"bad {cls.KIND} message: {exc}") from None


# -- admin (meshctl <-> controller admin socket) --------------------------------------------

ADMIN_COMMANDS = frozenset({"status", "scale", "slo", "drain", "kill", "ping", "form", "fault"})


@dataclass(frozen=True, slots=True)
class AdminRequest(Message):
    KIND: ClassVar[str] = "admin"
    id: int
    command: str
    args: dict[str, Any] = field(default_factory=dict)
    v: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class AdminReply(Message):
    KIND: ClassVar[str] = "admin_reply"
    id: int
    ok: bool
    result: Any = None
    code: str = ""
    message: str = ""
