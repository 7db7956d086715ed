"""The messages between the stages of one world, defined once.

They travel as the header of a ``Comm.send`` (worker.comm), beside the tensors they describe:
a msgpack map whose ``k`` names the kind. Requests inside a message are short arrays, since a
micro-batch of many requests must fit one p2p header (``HEADER_BYTES``).

    MicroBatch   rank r -> r+1   requests of a batch and the names of the tensors that follow
    DecodeStep   rank r -> r+1   one decoding step of a stream (or of an infer on a streaming
                                 model), with the model input for that step
    Tokens       last -> rank 0  the tokens the last stage picked (or why it could not)
    Keepalive    rank r -> r+1   an idle world's sign of life, every world_timeout / 4
    Close        rank r -> r+1   the world is closing on purpose: finish, then stop
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from worker.comm import CommError


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One request of a micro-batch: the controller's id, the client's id, its rows."""

    rid: Any
    client_id: Any
    rows: int


@dataclass(frozen=True, slots=True)
class StreamItem:
    """One sequence of a decoding step: ids, the client's request kind, tokens not to send."""

    rid: Any
    client_id: Any
    kind: str
    skip: int


@dataclass(frozen=True, slots=True)
class MicroBatch:
    KIND: ClassVar[str] = "b"
    items: tuple[BatchItem, ...]
    names: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"k": self.KIND, "items": [[i.rid, i.client_id, i.rows] for i in self.items],
                "n": list(self.names)}


@dataclass(frozen=True, slots=True)
class DecodeStep:
    KIND: ClassVar[str] = "g"
    items: tuple[StreamItem, ...]
    step: int
    last: bool
    names: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"k": self.KIND,
                "items": [[i.rid, i.client_id, i.kind, i.skip] for i in self.items],
                "step": self.step, "last": self.last, "n": list(self.names)}


@dataclass(frozen=True, slots=True)
class Tokens:
    KIND: ClassVar[str] = "t"
    tokens: tuple[int, ...]
    error: str = ""  # set when a later stage failed and already answered the requests

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"k": self.KIND, "tokens": list(self.tokens)}
        if self.error:
            wire["error"] = self.error
        return wire


@dataclass(frozen=True, slots=True)
class Keepalive:
    KIND: ClassVar[str] = "p"

    def to_wire(self) -> dict[str, Any]:
        return {"k": self.KIND}


@dataclass(frozen=True, slots=True)
class Close:
    KIND: ClassVar[str] = "x"

    def to_wire(self) -> dict[str, Any]:
        return {"k": self.KIND}


StageMessage = MicroBatch | DecodeStep | Tokens | Keepalive | Close
KEEPALIVE = Keepalive()
CLOSE = Close()


def decode(wire: dict[str, Any]) -> StageMessage:
    """The typed message of a received header. A header that is not one of ours means the
    peer is not a healthy stage of this world: CommError, the world breaks."""
    try:
        kind = wire["k"]
        if kind == MicroBatch.KIND:
            return MicroBatch(tuple(BatchItem(rid, cid, int(rows))
                                    for rid, cid, rows in wire["items"]),
                              tuple(str(n) for n in wire["n"]))
        if kind == DecodeStep.KIND:
            return DecodeStep(tuple(StreamItem(rid, cid, str(k), int(skip))
                                    for rid, cid, k, skip in wire["items"]),
                              int(wire["step"]), bool(wire["last"]),
                              tuple(str(n) for n in wire["n"]))
        if kind == Tokens.KIND:
            return Tokens(tuple(int(t) for t in wire["tokens"]), str(wire.get("error", "")))
        if kind == Keepalive.KIND:
            return KEEPALIVE
        if kind == Close.KIND:
            return CLOSE
    except (KeyError, TypeError, ValueError) as exc:
        raise CommError(f"malformed stage message {wire!r:.200}: {exc!r}") from exc
    raise CommError(f"unknown stage message kind {wire.get('k')!r:.50}")
