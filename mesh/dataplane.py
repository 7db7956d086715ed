"""Frame 0 of the worker protocol's data path: one type per message, one pack/unpack pair.

A request dispatched to a world, a worker's answer, a stop-work message and a runner's hello
each travel as a short msgpack array whose first element is its tag (docs/protocol.md 11.3):

    ["req",    rid, world_id, epoch, deadline_ms]          controller -> world entry
    ["res",    rid, world_id, epoch, status, code]         world -> controller
    ["cancel", rid, world_id, epoch]                       controller -> world entry
    ["hello",  world_id, epoch]  /  ["hello"]              runner -> controller / the echo
    ["reqs",   world_id, epoch, [[rid, deadline_ms, nframes], ...]]     several dispatches
    ["ress",   world_id, epoch, [[rid, status, code, nframes], ...]]    several answers
    ["resp",   world_id, epoch, [[rid, status, code, [size, ...]], ...]] several, packed
    ["reqp",   world_id, epoch, [[rid, deadline_ms, [size, ...]], ...]]   several, packed

A batch carries the frames of its requests (or answers) one after the other behind its head,
``nframes`` each (the client header and its tensor frames). The controller sends everything
it dispatched to one world in one loop iteration as one message, and a world answers a batch
in one: ZeroMQ's cost is per message (a wake-up of its I/O thread, a flush), so under load the
sends per request fall with the batch (docs/benchmarks.md). One request alone still travels as
``req`` and one answer as ``res``.

A packed batch (``resp``, sent to a controller whose ``welcome`` says ``packed_replies``;
``reqp``, sent to a world whose entry's ``joined`` says ``packed_dispatches``) puts its
answers' (requests') small frames (under ``PACK_MAX_BYTES``: the client headers, small tensors) one
after the other in frame 1 and lists each answer's frame sizes; a size of -1 is a frame of its
own, the next one after frame 1 (a large tensor, never copied). Receiving a frame costs the
controller a zmq.Frame; slicing one out of the pack costs a small fraction of that.

These are msgspec ``array_like`` Structs: the wire stays a plain array, and ``unpack`` checks
every field's type in compiled code, so a malformed frame is refused here (``None``) and nobody
downstream reads by offset. ``code`` is the error code of a status-1 answer, in the fixed part
so the controller decides a re-send without parsing the client header behind it. This pair is
the hot path: per request one ``pack_dispatch`` and one ``unpack`` on each side (measured in
bench.overhead), which msgspec does faster than msgpack plus checks by hand.
"""

from __future__ import annotations

from typing import Any

import msgspec

OK = 0  # frame 1 is a client "result" or "end" header
ERROR = 1  # frame 1 is a client "error" header; ``code`` says which
CHUNK = 2  # frame 1 is a stream "chunk" header, more follow


class Dispatch(msgspec.Struct, array_like=True, frozen=True, tag="req"):
    rid: int
    world_id: int
    epoch: int
    deadline_ms: int


class Reply(msgspec.Struct, array_like=True, frozen=True, tag="res"):
    rid: int
    world_id: int
    epoch: int
    status: int
    code: str = ""


class CancelWork(msgspec.Struct, array_like=True, frozen=True, tag="cancel"):
    rid: int
    world_id: int
    epoch: int


class Hello(msgspec.Struct, array_like=True, frozen=True, tag="hello"):
    world_id: int = 0
    epoch: int = 0


class DispatchBatch(msgspec.Struct, array_like=True, frozen=True, tag="reqs"):
    world_id: int
    epoch: int
    items: list[tuple[int, int, int]]  # (rid, deadline_ms, nframes)


class ReplyBatch(msgspec.Struct, array_like=True, frozen=True, tag="ress"):
    world_id: int
    epoch: int
    items: list[tuple[int, int, str, int]]  # (rid, status, code, nframes)


class PackedReplyBatch(msgspec.Struct, array_like=True, frozen=True, tag="resp"):
    world_id: int
    epoch: int
    items: list[tuple[int, int, str, list[int]]]  # (rid, status, code, frame sizes; -1: own)


class PackedDispatchBatch(msgspec.Struct, array_like=True, frozen=True, tag="reqp"):
    world_id: int
    epoch: int
    items: list[tuple[int, int, list[int]]]  # (rid, deadline_ms, frame sizes; -1: own)


DataHead = (Dispatch | Reply | CancelWork | Hello | DispatchBatch | ReplyBatch
            | PackedReplyBatch | PackedDispatchBatch)

# Frames at least this large travel as frames of their own in a packed batch: below it, a copy
# into the pack costs less than a frame of its own on the receiving side.
PACK_MAX_BYTES = 16 * 1024

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(DataHead).decode


def pack(head: DataHead) -> bytes:
    return _encode(head)


def pack_dispatch(rid: int, world_id: int, epoch: int, deadline_ms: int) -> bytes:
    return _encode(Dispatch(rid, world_id, epoch, deadline_ms))


def pack_reply(rid: int, world_id: int, epoch: int, status: int, code: str = "") -> bytes:
    return _encode(Reply(rid, world_id, epoch, status, code))


def pack_dispatch_batch(world_id: int, epoch: int, items: list[tuple[int, int, int]]) -> bytes:
    return _encode(DispatchBatch(world_id, epoch, items))


def pack_reply_batch(world_id: int, epoch: int, items: list[tuple[int, int, str, int]]) -> bytes:
    return _encode(ReplyBatch(world_id, epoch, items))


def _pack(frames: list[Any], packed: list[Any], own: list[Any]) -> list[int]:
    """Sort one answer's (request's) frames into the pack or their own; their sizes."""
    sizes = []
    for frame in frames:
        n = len(frame)  # bytes, a zmq.Frame or a byte-format memoryview (mesh.codec's)
        if n < PACK_MAX_BYTES:
            packed.append(frame)
            sizes.append(n)
        else:
            own.append(frame)
            sizes.append(-1)
    return sizes


def pack_replies(world_id: int, epoch: int, answers: list[tuple[int, int, str, list[Any]]]
                 ) -> list[Any]:
    """A ``resp`` message (head, pack, then the frames of their own) of ``answers``, each
    ``(rid, status, code, frames)``."""
    packed: list[Any] = []
    own: list[Any] = []
    items = [(rid, status, code, _pack(frames, packed, own))
             for rid, status, code, frames in answers]
    return [_encode(PackedReplyBatch(world_id, epoch, items)), b"".join(packed), *own]


def pack_dispatches(world_id: int, epoch: int, requests: list[tuple[int, int, list[Any]]]
                    ) -> list[Any]:
    """A ``reqp`` message (head, pack, then the frames of their own) of ``requests``, each
    ``(rid, deadline_ms, frames)``."""
    packed: list[Any] = []
    own: list[Any] = []
    items = [(rid, deadline_ms, _pack(frames, packed, own))
             for rid, deadline_ms, frames in requests]
    return [_encode(PackedDispatchBatch(world_id, epoch, items)), b"".join(packed), *own]


def batch_parts(counts: list[int], frames: list[Any]) -> list[list[Any]] | None:
    """``frames`` cut into consecutive parts of ``counts[i]`` frames each, or None when they do
    not add up (a malformed batch: nothing in it is trusted)."""
    if any(n < 1 for n in counts) or sum(counts) != len(frames):
        return None
    parts = []
    at = 0
    for n in counts:
        parts.append(frames[at:at + n])
        at += n
    return parts


def replies(head: DataHead | None, frames: list[Any]) -> list[tuple[Reply, list[Any]]]:
    """The answers in a world's message (``head`` its unpacked frame 0, ``frames`` the rest):
    each with its own frames; none when it is not an answer or a batch that does not add up."""
    if type(head) is Reply:
        return [(head, frames)]
    if type(head) is PackedReplyBatch:
        parts = unpacked([item[3] for item in head.items], frames)
    elif type(head) is ReplyBatch:
        parts = batch_parts([item[3] for item in head.items], frames)
    else:
        return []
    if parts is None:
        return []
    world_id, epoch = head.world_id, head.epoch
    return [(Reply(rid, world_id, epoch, status, code), part)
            for (rid, status, code, _), part in zip(head.items, parts, strict=True)]


def unpacked(sizes: list[list[int]], frames: list[Any]) -> list[list[Any]] | None:
    """The parts of a packed batch: for each answer (request) its frames, slices of the pack
    (``frames[0]``) and frames of their own (``frames[1:]``), by ``sizes``; None when they do
    not account for every byte and frame exactly (a malformed batch: nothing in it is
    trusted)."""
    if not frames:
        return None
    first = frames[0]  # bytes (the receiver copies the first frames) or a zmq.Frame
    pack = memoryview(first if type(first) is bytes else getattr(first, "buffer", first))
    end = len(pack)
    next_own = 1
    at = 0
    parts = []
    for listed in sizes:
        if not listed:
            return None
        part: list[Any] = []
        for n in listed:
            if n >= 0:
                if at + n > end:
                    return None
                part.append(pack[at:at + n])
                at += n
            elif n == -1 and next_own < len(frames):
                part.append(frames[next_own])
                next_own += 1
            else:
                return None
        parts.append(part)
    if at != end or next_own != len(frames):
        return None
    return parts


def dispatches(head: DataHead | None, frames: list[Any]) -> list[tuple[int, int, list[Any]]]:
    """The requests of a dispatch batch, packed or not (``head`` its unpacked frame 0,
    ``frames`` the rest): each ``(rid, deadline_ms, frames)``; none when it does not add up."""
    if type(head) is PackedDispatchBatch:
        parts = unpacked([item[2] for item in head.items], frames)
    elif type(head) is DispatchBatch:
        parts = batch_parts([item[2] for item in head.items], frames)
    else:
        return []
    if parts is None:
        return []
    return [(rid, deadline_ms, part)
            for (rid, deadline_ms, _), part in zip(head.items, parts, strict=True)]


HELLO_ECHO = _encode(Hello())


def unpack(frame: Any) -> DataHead | None:
    """The typed head of a data-path frame 0, or None when it is not one (malformed)."""
    try:
        return _decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def is_data(frame: Any) -> bool:
    """Whether a frame (bytes or a memoryview) holds a data-path array rather than a control
    map: its first byte, read in place (this runs per message; a slice or a copy doubled it)."""
    try:
        first = frame[0]
    except (IndexError, TypeError):
        return False
    return 0x90 <= first <= 0x9F or first == 0xDC or first == 0xDD


def is_map(frame: Any) -> bool:
    """Whether a frame starts as a msgpack map (a client header), its first byte read in place:
    the controller checks a worker's reply header this way without decoding it."""
    try:
        first = frame[0]
    except (IndexError, TypeError):
        return False
    return 0x80 <= first <= 0x8F or first == 0xDE or first == 0xDF
