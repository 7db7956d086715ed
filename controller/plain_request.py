"""The usual request, read and checked in one typed pass; anything else is left to the Frontend.

Nearly every request a controller sees has the same shape: protocol version, ``infer`` or
``stream``, an id, a model name, a timeout, and inputs that are plain values and tensor
references numbered 1..n in frame order, with no ``params`` or only plain ones. ``read`` decodes
such a header with msgspec into a typed struct (the types are checked in compiled code while it
decodes) and checks what types cannot say (the version, the id's length, the timeout's range,
each reference against its frame) with a few comparisons.

``read`` only ever says yes or "not mine": it returns None for anything it does not accept,
valid or not, and the Frontend's general path then handles that message exactly as before,
including every error's wording. So a request accepted here is one the general path would
accept with the same id, kind, model and timeout (tests/test_plain_request.py checks both
paths agree, on good and on hostile headers).

It is cheaper than the general path (msgpack into dicts, then about twenty lookups and
isinstance checks, then the reference walk) by about a third per request; the figures are in
docs/benchmarks.md (Micro-costs behind the code).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import msgspec

from mesh.codec import DTYPES, MAX_DIMS
from mesh.messages import MAX_ID_BYTES, PROTOCOL_VERSION, ClientKind

_INFER = ClientKind.INFER
_STREAM = ClientKind.STREAM

Dim = Annotated[int, msgspec.Meta(ge=0)]


class _Ref(msgspec.Struct, forbid_unknown_fields=True):
    """``{"$tensor": [dtype, shape, frame]}`` and nothing else in the map."""

    ref: tuple[str, Annotated[list[Dim], msgspec.Meta(max_length=MAX_DIMS)], int] = \
        msgspec.field(name="$tensor")


Plain = str | int | float | bool | None


class PlainRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Only these keys: the general path walks a header with other keys (or with ``params``)
    whole, and may find tensor references in places this pass does not look."""

    v: int
    kind: str
    id: int | str
    model: str
    inputs: dict[str, _Ref | Plain]
    timeout_ms: int | float | None = None
    params: dict[str, Plain] = {}


_decode = msgspec.msgpack.Decoder(PlainRequest).decode


def read(header_frame: Any, frames: list[Any], first: int, size: int,
         max_bytes: int) -> PlainRequest | None:
    """The request in ``header_frame`` if it has the usual shape and passes every check that
    needs no deployment; ``frames[first:]`` are its tensor frames, ``size`` the bytes of the
    header and tensor frames together. None: let the general path handle it."""
    if size > max_bytes:
        return None
    try:
        head = _decode(header_frame)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if head.v != PROTOCOL_VERSION:
        return None
    kind = head.kind
    if kind != _INFER and kind != _STREAM:
        return None
    rid = head.id
    # A str of at most MAX_ID_BYTES / 4 characters fits in MAX_ID_BYTES of UTF-8.
    if type(rid) is str and len(rid) > MAX_ID_BYTES // 4 and len(rid.encode()) > MAX_ID_BYTES:
        return None
    timeout_ms = head.timeout_ms
    if timeout_ms is not None and not 0 < timeout_ms < math.inf:  # NaN fails this too
        return None
    seen = 0
    ntensors = len(frames) - first
    for value in head.inputs.values():
        if type(value) is not _Ref:
            continue
        dtype, shape, index = value.ref
        seen += 1
        found = DTYPES.get(dtype)
        if found is None or index != seen or index > ntensors:
            return None
        if len(frames[first + index - 1]) != math.prod(shape) * found[1]:
            return None
    if seen != ntensors:
        return None
    return head
