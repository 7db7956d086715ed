"""What a Router holds: accepted requests until their final answer (``Pending``), and its
view of each world it routes to (``WorldRoute``), with the stream-resume header edit.
(controller/router.py owns and changes them; they are here to keep it short.)"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mesh import codec
from mesh.errors import BadRequest, MeshError


class Pending:
    """One accepted request until its final answer (and until its world lets go of it)."""

    __slots__ = (
        "answered", "arrived_s", "attempts", "avoid", "chunks", "client", "client_id",
        "deadline_s", "dispatched_s", "frames", "header", "kind", "original_header", "rid",
        "world",
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


class WorldRoute:
    """The router's view of one world: where its entry is, what it holds, whether new requests
    may go there. (The world's lifecycle state is the WorldManager's; this is routing.)"""

    __slots__ = ("draining", "entry", "epoch", "inflight", "last_progress_s", "members",
                 "outbox", "packed", "served", "stall_reported", "unreachable", "world_id")

    def __init__(self, world_id: int, epoch: int, entry: bytes,
                 members: frozenset[bytes] = frozenset(), *, packed: bool = False) -> None:
        self.world_id = world_id
        self.epoch = epoch
        self.entry = entry  # ZeroMQ identity of rank 0's runner socket
        self.packed = packed  # it reads packed dispatch batches (mesh.dataplane)
        # Identities of its members' runner sockets: answers from any other are dropped
        # (empty: not checked, for tests that drive a router alone).
        self.members = members
        self.inflight: dict[int, Pending] = {}
        self.outbox: list[Pending] = []  # dispatched, to be sent at the router's next flush
        self.draining = False  # told to drain: no new requests, released once idle
        self.unreachable = False  # a send to its entry failed: routed around until it breaks
        self.stall_reported = False
        self.served = 0
        self.last_progress_s = 0.0  # last answer or chunk, or first dispatch after idle

    @property
    def routable(self) -> bool:
        return not self.draining and not self.unreachable

    def silent_s(self, now_s: float, listening_since_s: float) -> float:
        """How long it has held requests without an answer or a chunk, counting only time
        the controller was listening (0 when it holds nothing)."""
        if not self.inflight:
            return 0.0
        return now_s - max(self.last_progress_s, listening_since_s)


def bad_duplicate(client_id: Any) -> MeshError:
    return BadRequest(f"request id {client_id!r} is already in flight on this connection")


def with_skip(header_frame: Any, skip: int) -> bytes:
    """The client's header with ``params.skip`` set (the chunks it already has)."""
    header = codec.unpack_header(codec.frame_buffer(header_frame))
    params = dict(header.get("params") or {})
    asked = params.get("skip", 0)
    params["skip"] = skip + (asked if isinstance(asked, int) and not isinstance(asked, bool)
                             else 0)
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
