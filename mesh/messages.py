"""Every message that crosses a process boundary, defined once.

Two protocols share these definitions (docs/protocol.md is the normative spec):

* client <-> controller (the Frontend's ROUTER socket): frame 0 is a msgpack map with ``v``
  (protocol version), ``kind`` and ``id``; tensors follow as raw frames (see mesh.codec).
* worker <-> controller (the worker ROUTER socket): control messages are msgpack maps with a
  ``kind``; the data-path messages (``req`` and ``res``) carry a short msgpack array as frame 0
  (mesh/dataplane.py) so the controller can route them without decoding the client's header,
  which travels untouched as frame 1, followed by the tensor frames.

Control messages are frozen, slotted dataclasses; ``to_wire`` and ``from_wire`` are the only
places that turn them into maps and back, and ``from_wire`` checks every field's type and range
(mesh/typed.py): a message that does not fit is a BadRequest for its sender alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, TypeVar

import msgspec

from mesh.dataplane import batch_parts
from mesh.errors import MAX_MESSAGE_CHARS, BadRequest, excerpt
from mesh.spec import DeploymentSpec
from mesh.typed import DecodeError, decode

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
    PING = "ping"  # client to controller: are you there? (answered at once, by the controller)
    PONG = "pong"  # the answer, with the controller's ``incarnation``
    DESCRIBE = "describe"  # client to controller: what do the deployments take and give?
    DESCRIPTION = "description"  # the answer: ``models``, ``protocol_version``
    # Several messages in one, either way: ``counts`` says how many frames each has. A client
    # sends one only to a controller whose pong lists "batch" in its ``features``, and only a
    # client that sent one is answered with one (docs/protocol.md section 3.9).
    BATCH = "batch"


# What a controller's pong says it supports beyond the base protocol.
FEATURES = ("batch",)
# Messages in one batch at most, either way.
MAX_BATCH = 1024


def batch_header(counts: list[int]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "kind": ClientKind.BATCH, "counts": counts}


def split_batch(header: dict[str, Any], frames: list[Any]) -> list[list[Any]] | None:
    """The messages of a batch: ``frames`` (those after its header) cut as its ``counts``
    say, or None when the counts are not a list of at most MAX_BATCH positive integers
    adding up to ``len(frames)``."""
    counts = header.get("counts")
    if type(counts) is not list or not 0 < len(counts) <= MAX_BATCH or \
            any(type(n) is not int for n in counts):
        return None
    return batch_parts(counts, frames)


REQUEST_KINDS = frozenset({ClientKind.INFER, ClientKind.STREAM, ClientKind.CANCEL,
                           ClientKind.PING, ClientKind.DESCRIBE, ClientKind.BATCH})


# The data path's frame 0 (req, res, cancel, hello) is defined in mesh/dataplane.py.


def result_header(req_id: Any, outputs: dict[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "kind": ClientKind.RESULT, "id": req_id, "outputs": outputs}


def error_header(req_id: Any, code: str, message: str, retryable: bool,
                 retry_after_ms: int = 0) -> dict[str, Any]:
    header = {
        "v": PROTOCOL_VERSION,
        "kind": ClientKind.ERROR,
        "id": req_id,
        "code": code,
        "message": message if len(message) <= MAX_MESSAGE_CHARS else
        message[:MAX_MESSAGE_CHARS] + "...",
        "retryable": retryable,
    }
    if retry_after_ms > 0:
        header["retry_after_ms"] = retry_after_ms
    return header


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
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Message:
    """A control message: a map with ``kind`` plus the dataclass fields."""

    KIND: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.KIND}
        out.update(msgspec.to_builtins(self))
        return out

    @classmethod
    def from_wire(cls: type[M], data: Any) -> M:
        """Decode and type-check an unpacked map (mesh/typed.py); BadRequest names the field
        that does not fit."""
        try:
            return decode(data, cls, cls.KIND or cls.__name__)
        except DecodeError as exc:
            raise BadRequest(str(exc)) from None


# Field types with their ranges, checked by ``from_wire``: a count is a non-negative integer,
# an amount of time or work a finite non-negative number (NaN and infinity are refused).
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Amount = Annotated[float, msgspec.Meta(ge=0.0, le=1e15)]


# -- worker -> controller -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Register(Message):
    KIND: ClassVar[str] = "register"
    worker_id: str
    pid: Count
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
class WorldGen:
    """One generative world membership's state, as its worker last saw it: rank 0's
    sequences running and waiting, preemptions and tokens generated (counters), and this
    stage's KV cache in use and budget."""

    world_id: Count
    running: Count = 0
    waiting: Count = 0
    kv_used_bytes: Count = 0
    kv_budget_bytes: Count = 0
    preemptions: Count = 0
    generated: Count = 0


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    KIND: ClassVar[str] = "heartbeat"
    seq: Count
    queued: Count = 0
    busy: bool = False
    # Cumulative batching counters over every world this worker serves.
    batches: Count = 0
    rows: Count = 0
    requests: Count = 0
    busy_s: Amount = 0.0
    # Stages loaded on this worker, how many of them no world uses, and the bytes all of
    # them hold (parameters and buffers, measured as each loaded).
    stages: Count = 0
    idle_stages: Count = 0
    stage_bytes: Count = 0
    # CPU seconds the worker process has used (all threads): how many cores it keeps busy.
    cpu_s: Amount = 0.0
    # Generative worlds only, one entry per membership.
    gen: list[WorldGen] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Joined(Message):
    KIND: ClassVar[str] = "joined"
    world_id: Count
    epoch: Count
    load_ms: Amount = 0.0
    form_ms: Amount = 0.0
    # The handler's description of its inputs (for status and meshctl bench).
    inputs: dict[str, Any] = field(default_factory=dict)
    # Its whole description (inputs, outputs, parameters, streaming: Handler.describe).
    describe: dict[str, Any] = field(default_factory=dict)
    # Rank 0 only: the identity of the socket the world takes its requests on, and whether
    # that socket reads packed dispatch batches ("reqp", mesh.dataplane).
    entry: str = ""
    packed_dispatches: bool = False


@dataclass(frozen=True, slots=True)
class JoinFailed(Message):
    KIND: ClassVar[str] = "join_failed"
    world_id: Count
    epoch: Count
    error: str


@dataclass(frozen=True, slots=True)
class Left(Message):
    KIND: ClassVar[str] = "left"
    world_id: Count
    epoch: Count


@dataclass(frozen=True, slots=True)
class WorldBroken(Message):
    KIND: ClassVar[str] = "world_broken"
    world_id: Count
    epoch: Count
    reason: str
    peer_lost: bool = False


# -- controller -> worker -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    KIND: ClassVar[str] = "welcome"
    heartbeat_interval_ms: int
    controller_timeout_ms: int
    # Loaded stages no world uses that the worker may keep (the rest are dropped, LRU first),
    # and the bytes its stages may hold before idle ones are dropped, LRU first (0: no bound).
    max_idle_stages: int = DEFAULT_MAX_IDLE_STAGES
    max_stage_bytes: Count = 0
    # The controller reads packed answer batches ("resp", mesh.dataplane): a worker sends them
    # only then, so a worker newer than its controller still speaks what that one reads.
    packed_replies: bool = False


@dataclass(frozen=True, slots=True)
class Join(Message):
    """Become rank ``rank`` of world ``world_id``/``epoch`` serving ``deployment``."""

    KIND: ClassVar[str] = "join"
    world_id: Count
    epoch: Count
    rank: Count
    size: Count
    deployment: DeploymentSpec
    rendezvous: str = ""
    world_timeout_ms: Count = 30000
    # How long the ranks may take to meet (a peer may still be loading its stage).
    form_timeout_ms: Count = 120000
    peers: list[str] = field(default_factory=list)
    # "gloo" or "nccl", chosen by the controller from where the ranks are ("": the device's
    # default, NCCL on CUDA).
    backend: str = ""
    # A fresh random token per world, known only to its members: it names the world's
    # rendezvous keys and each member's runner socket, and the controller accepts a world's
    # answers only from its members' sockets.
    token: str = ""


@dataclass(frozen=True, slots=True)
class Leave(Message):
    KIND: ClassVar[str] = "leave"
    world_id: Count
    epoch: Count
    abort: bool = False


@dataclass(frozen=True, slots=True)
class Shutdown(Message):
    KIND: ClassVar[str] = "shutdown"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Fault(Message):
    """Fault injection: make every batch and stage computation take ``delay_ms`` longer, and
    (tests only) drop the next ``drop_joins`` joins the worker receives, as if lost on the way."""

    KIND: ClassVar[str] = "fault"
    delay_ms: float = 0.0
    drop_joins: Count = 0


@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Controller liveness for the worker (the worker exits when these stop)."""

    KIND: ClassVar[str] = "ping"
    seq: int = 0
    # Answer with a heartbeat at once (the controller checks a suspect worker is alive).
    reply: bool = False
    # This controller does not know the worker (it restarted): leave every world and
    # register again.
    register: bool = False


@dataclass(frozen=True, slots=True)
class Preload(Message):
    """Load (and cache) one stage of a deployment now, so a later join is fast (warm pool)."""

    KIND: ClassVar[str] = "preload"
    deployment: DeploymentSpec
    rank: Count = 0
    size: Count = 1


def runner_identity(worker_id: str, world_id: int, epoch: int, token: str) -> str:
    """The routing id of a worker's runner socket for one world membership."""
    return f"{worker_id}/{world_id}.{epoch}" + (f".{token}" if token else "")


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
    kind = data.get("kind")
    cls = table.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise BadRequest(f"unknown control message kind {excerpt(kind)}")
    return cls.from_wire(data)


# -- admin (meshctl <-> controller admin socket) --------------------------------------------

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


# The arguments of each admin command, decoded and checked before the command runs.
@dataclass(frozen=True, slots=True)
class NoArgs:
    pass


@dataclass(frozen=True, slots=True)
class ScaleArgs:
    deployment: Name
    worlds: Count | None = None
    min_worlds: Count | None = None
    max_worlds: Count | None = None


@dataclass(frozen=True, slots=True)
class SloArgs:
    deployment: Name
    p99_ms: Annotated[float, msgspec.Meta(gt=0.0, le=3.6e6)]


@dataclass(frozen=True, slots=True)
class FormArgs:
    deployment: Name
    workers: list[Name]


@dataclass(frozen=True, slots=True)
class DrainArgs:
    target: Name


@dataclass(frozen=True, slots=True)
class KillArgs:
    worker: Name


@dataclass(frozen=True, slots=True)
class FaultArgs:
    worker: Name  # a worker id, or "controller" (then stall_ms)
    delay_ms: Annotated[float, msgspec.Meta(ge=0.0, le=600_000.0)] = 0.0
    stall_ms: Annotated[float, msgspec.Meta(gt=0.0, le=60_000.0)] | None = None
    # Tests only (no meshctl flag): the worker drops the next N joins it receives.
    drop_joins: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0


@dataclass(frozen=True, slots=True)
class ApplyArgs:
    # A parsed config document: its [[deployments]] and [[routes]] become the running set;
    # its other tables are checked and reported, not applied.
    document: dict[str, Any]
    dry_run: bool = False  # say what would change, change nothing


@dataclass(frozen=True, slots=True)
class UnquarantineArgs:
    worker: Name  # a worker quarantined for its stalls or deaths


ADMIN_ARGS: dict[str, type[Any]] = {
    "status": NoArgs, "ping": NoArgs, "scale": ScaleArgs, "slo": SloArgs, "form": FormArgs,
    "drain": DrainArgs, "kill": KillArgs, "fault": FaultArgs, "unquarantine": UnquarantineArgs,
    "apply": ApplyArgs,
}
ADMIN_COMMANDS = frozenset(ADMIN_ARGS)


@dataclass(frozen=True, slots=True)
class AdminRequest(Message):
    KIND: ClassVar[str] = "admin"
    id: int
    command: Name
    args: dict[str, Any] = field(default_factory=dict)
    v: int = PROTOCOL_VERSION

    @staticmethod
    def args_of(command: str, args: dict[str, Any], kind: type[T]) -> T:
        """The command's arguments as their typed record, or BadRequest naming the field."""
        try:
            return decode(args, kind, command)
        except DecodeError as exc:
            raise BadRequest(str(exc)) from None


@dataclass(frozen=True, slots=True)
class AdminReply(Message):
    KIND: ClassVar[str] = "admin_reply"
    id: int
    ok: bool
    result: Any = None
    code: str = ""
    message: str = ""
