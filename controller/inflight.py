"""What a Router holds: accepted requests until their final answer (``Pending``), and its
view of each world it routes to (``WorldRoute``), with the stream-resume header edit and what
the router reads from a generative stream's headers.
(controller/router.py owns and changes them; they are here to keep it short.)"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from controller.admission import WorldRate
from mesh import codec
from mesh.dataplane import pack_dispatch, pack_dispatch_batch, pack_dispatches
from mesh.errors import BadRequest, MeshError


class Pending:
    """One accepted request until its final answer (and until its world lets go of it)."""

    __slots__ = (
        "answered", "arrived_s", "attempts", "avoid", "chunks", "client", "client_id", "cost",
        "deadline_s", "dispatched_s", "first_chunk_s", "frames", "header", "kind",
        "last_chunk_s", "original_header", "rid", "tokens", "world",
    )

    def __init__(self, rid: int, client: bytes, client_id: Any, kind: str, header: Any,
                 frames: list[Any], arrived_s: float, deadline_s: float) -> None:
        self.rid = rid
        self.client = client
        self.client_id = client_id
        self.kind = kind
        self.header = header  # the client's header frame, forwarded untouched
        self.original_header = header  # as the client sent it (re-sends of streams edit it)
        self.frames = frames  # the client's tensor frames, kept for re-sends
        self.arrived_s = arrived_s
        self.dispatched_s = arrived_s  # when it was last sent to a world
        self.deadline_s = deadline_s
        self.world: WorldRoute | None = None
        self.attempts = 0
        # The world that last failed it (answered unavailable, or broke): a re-send goes to
        # another world when there is one, so it is not spent on a world that is going away.
        self.avoid = -1
        self.answered = False
        self.chunks = 0  # stream chunks forwarded to the client so far
        # Generative streams: the token ids of those chunks (a re-send continues after them),
        # when the first and the last came, and the tokens still expected (world choice).
        self.tokens: list[int] = []
        self.first_chunk_s = 0.0
        self.last_chunk_s = 0.0
        self.cost = 0


class WorldRoute:
    """The router's view of one world: where its entry is, what it holds, whether new requests
    may go there. (The world's lifecycle state is the WorldManager's; this is routing.)"""

    __slots__ = ("draining", "entry", "epoch", "inflight", "last_progress_s", "load_tokens",
                 "members", "outbox", "packed", "rate", "served", "stall_reported",
                 "unreachable", "world_id")

    def __init__(self, world_id: int, epoch: int, entry: bytes, members: frozenset[bytes],
                 *, packed: bool = False) -> None:
        self.world_id = world_id
        self.epoch = epoch
        self.entry = entry  # ZeroMQ identity of rank 0's runner socket
        self.packed = packed  # it reads packed dispatch batches (mesh.dataplane)
        # Identities of its members' runner sockets: answers from any other are dropped
        # (empty: every answer is dropped).
        self.members = members
        self.inflight: dict[int, Pending] = {}
        self.outbox: list[Pending] = []  # dispatched, to be sent at the router's next flush
        self.draining = False  # told to drain: no new requests, released once idle
        self.unreachable = False  # a send to its entry failed: routed around until it breaks
        self.stall_reported = False
        self.served = 0
        self.last_progress_s = 0.0  # last answer or chunk, or first dispatch after idle
        self.load_tokens = 0  # generative: tokens its requests are still expected to take
        self.rate = WorldRate()  # its service rate while it holds work (admission)

    @property
    def routable(self) -> bool:
        return not self.draining and not self.unreachable

    def silent_s(self, now_s: float, listening_since_s: float) -> float:
        """How long it has held requests without an answer or a chunk, counting only time
        the controller was listening (0 when it holds nothing)."""
        if not self.inflight:
            return 0.0
        return now_s - max(self.last_progress_s, listening_since_s)


def pick(serving: list[WorldRoute], limit: int, avoid: int = -1,
         by_tokens: bool = False) -> WorldRoute | None:
    """The serving world with the fewest outstanding requests (``by_tokens``: tokens) and
    room for one more request (under ``limit``); world ``avoid`` only when no other has
    room."""
    best: WorldRoute | None = None
    fallback: WorldRoute | None = None
    if by_tokens:
        for w in serving:
            if len(w.inflight) >= limit:
                continue
            if w.world_id == avoid:
                fallback = w
            elif best is None or w.load_tokens < best.load_tokens:
                best = w
        return best if best is not None else fallback
    best_load = limit
    for w in serving:
        load = len(w.inflight)
        if load < best_load:
            if w.world_id == avoid:
                fallback = w
                continue
            best, best_load = w, load
    return best if best is not None else fallback


def dispatch_message(world: WorldRoute, batch: list[Pending], now: float) -> list[Any]:
    """The frames that send ``batch`` to the world's entry: one request as it came, several
    as one dispatch batch (packed where the entry reads packed ones; mesh.dataplane), each
    with the milliseconds left to its deadline."""
    if len(batch) == 1:
        p = batch[0]
        head = pack_dispatch(p.rid, world.world_id, world.epoch,
                             max(1, int((p.deadline_s - now) * 1000.0)))
        return [world.entry, head, p.header, *p.frames]
    if world.packed:
        return [world.entry, *pack_dispatches(
            world.world_id, world.epoch,
            [(p.rid, max(1, int((p.deadline_s - now) * 1000.0)), [p.header, *p.frames])
             for p in batch])]
    items = []
    frames: list[Any] = [world.entry, b""]
    for p in batch:
        items.append((p.rid, max(1, int((p.deadline_s - now) * 1000.0)), 1 + len(p.frames)))
        frames.append(p.header)
        frames += p.frames
    frames[1] = pack_dispatch_batch(world.world_id, world.epoch, items)
    return frames


def bad_duplicate(client_id: Any) -> MeshError:
    return BadRequest(f"request id {client_id!r} is already in flight on this connection")


class _ChunkTokens(msgspec.Struct):
    tokens: list[int] = []


_chunk_tokens = msgspec.msgpack.Decoder(_ChunkTokens).decode


def chunk_tokens(header_frame: Any) -> list[int]:
    """The token ids a generative stream's chunk header carries (none if unreadable)."""
    try:
        return _chunk_tokens(codec.frame_buffer(header_frame)).tokens
    except (msgspec.DecodeError, msgspec.ValidationError):
        return []


def generation_cost(header_frame: Any) -> int:
    """Tokens a generative request is expected to take: its prompt (about 4 characters a
    token) and its max_tokens; a rough weight for choosing the least loaded world."""
    try:
        header = codec.unpack_header(codec.frame_buffer(header_frame))
    except Exception:
        return 16
    params = header.get("params") or {}
    inputs = header.get("inputs") or {}
    max_tokens = params.get("max_tokens", 16) if isinstance(params, dict) else 16
    prompt = inputs.get("prompt", "") if isinstance(inputs, dict) else ""
    budget = max_tokens if type(max_tokens) is int and max_tokens > 0 else 16
    return budget + (len(prompt) // 4 if isinstance(prompt, str) else 0)


def with_resume(header_frame: Any, tokens: list[int], chunks: int) -> bytes:
    """The client's header with ``params.resume`` extended by the tokens (and chunks) its
    client has received since: the new world prefills them after the prompt and goes on."""
    header = codec.unpack_header(codec.frame_buffer(header_frame))
    params = dict(header.get("params") or {})
    asked = params.get("resume")
    had_tokens: list[int] = []
    had_chunks = 0
    if isinstance(asked, dict):
        if isinstance(asked.get("tokens"), list):
            had_tokens = list(asked["tokens"])
        if type(asked.get("chunks")) is int:
            had_chunks = asked["chunks"]
    params["resume"] = {"tokens": had_tokens + list(tokens), "chunks": had_chunks + chunks}
    header["params"] = params
    return codec.pack(header)


def stalled_worlds(worlds: Iterable[WorldRoute], now_s: float, listening_since_s: float,
                   stall_s: float) -> list[tuple[int, str]]:
    """(world id, why) of the worlds silent for over ``stall_s`` while holding requests."""
    out = []
    for world in worlds:
        silent_s = world.silent_s(now_s, listening_since_s)
        if silent_s > stall_s:
            out.append((world.world_id, f"no progress for {silent_s:.1f}s with "
                                        f"{len(world.inflight)} requests in flight"))
    return out
