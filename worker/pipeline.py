"""The messages between the stages of one world, defined once.

They travel as the header of a ``Comm.send`` (worker.comm), beside the tensors they describe:
a msgpack map whose ``k`` names the kind. Requests inside a message are short arrays, since a
micro-batch of many requests must fit one p2p header (``HEADER_BYTES``).

    MicroBatch   rank r -> r+1   requests of a batch and the names of the tensors that follow
    Keepalive    rank r -> r+1   an idle world's sign of life, every world_timeout / 4
    Close        rank r -> r+1   the world is closing on purpose: finish, then stop

Generative worlds (worker.gen_stage) speak three more:

    GenStep      rank r -> r+1   one micro-batch of sequences: each one's chunk (position,
                                 tokens, whether to sample), sequences new to the later stages
                                 (their reply details and sampling), sequences whose KV to drop
                                 (ended, or preempted), and the names of the tensors that follow
    GenTokens    last -> rank 0  the tokens sampled for one micro-batch, which sequences ended
    KvInfo       rank r -> 0     once, as the world starts: the KV blocks this stage can hold

(A header's key ``t`` is Comm's own: the tensors' dtypes and shapes.) A GenStep or GenTokens
whose table does not fit a p2p header travels with it packed in a
uint8 tensor ahead of the others (``send``/``recv`` do this; ``m`` in the header says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from worker.comm import Comm, CommError


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One request of a micro-batch: the controller's id, the client's id, its rows."""

    rid: Any
    client_id: Any
    rows: int


@dataclass(frozen=True, slots=True)
class MicroBatch:
    KIND: ClassVar[str] = "b"
    items: tuple[BatchItem, ...]
    names: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"k": self.KIND, "items": [[i.rid, i.client_id, i.rows] for i in self.items],
                "n": list(self.names)}


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


@dataclass(frozen=True, slots=True)
class GenChunk:
    """One sequence's part of a micro-batch: ``n`` tokens from position ``pos``."""

    sid: int
    pos: int
    n: int
    sample: bool


@dataclass(frozen=True, slots=True)
class GenJoin:
    """A sequence new to the later stages: how to answer it and how to sample it."""

    sid: int
    rid: Any
    client_id: Any
    kind: str
    params: list[Any]  # worker.sampling.SamplingParams.to_wire()
    prompt_len: int
    resume_tokens: list[int]
    resume_chunks: int


@dataclass(frozen=True, slots=True)
class GenStep:
    KIND: ClassVar[str] = "s"
    step: int
    chunks: tuple[GenChunk, ...]
    joins: tuple[GenJoin, ...] = ()
    frees: tuple[int, ...] = ()  # ended: drop KV and state
    preempts: tuple[int, ...] = ()  # preempted: drop KV, keep state
    failed: tuple[int, ...] = ()  # an earlier stage failed them and answered their callers
    names: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"k": self.KIND, "step": self.step,
                "c": [[c.sid, c.pos, c.n, int(c.sample)] for c in self.chunks],
                "j": [[j.sid, j.rid, j.client_id, j.kind, j.params, j.prompt_len,
                       j.resume_tokens, j.resume_chunks] for j in self.joins],
                "f": list(self.frees), "p": list(self.preempts), "x": list(self.failed),
                "n": list(self.names)}


@dataclass(frozen=True, slots=True)
class GenTokens:
    KIND: ClassVar[str] = "o"
    step: int
    tokens: tuple[tuple[int, int, bool], ...]  # (sid, token, finished) per sampling sequence
    failed: tuple[int, ...] = ()  # ended by a failure (their callers were answered)

    def to_wire(self) -> dict[str, Any]:
        return {"k": self.KIND, "step": self.step,
                "tok": [[sid, tok, int(fin)] for sid, tok, fin in self.tokens],
                "x": list(self.failed)}


@dataclass(frozen=True, slots=True)
class KvInfo:
    KIND: ClassVar[str] = "kv"
    rank: int
    blocks: int
    bytes_per_token: int

    def to_wire(self) -> dict[str, Any]:
        return {"k": self.KIND, "rank": self.rank, "blocks": self.blocks,
                "bpt": self.bytes_per_token}


StageMessage = MicroBatch | Keepalive | Close | GenStep | GenTokens | KvInfo
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
        if kind == GenStep.KIND:
            return GenStep(int(wire["step"]),
                           tuple(GenChunk(int(sid), int(pos), int(n), bool(sample))
                                 for sid, pos, n, sample in wire["c"]),
                           tuple(GenJoin(int(j[0]), j[1], j[2], str(j[3]), list(j[4]), int(j[5]),
                                         [int(t) for t in j[6]], int(j[7])) for j in wire["j"]),
                           tuple(int(s) for s in wire["f"]), tuple(int(s) for s in wire["p"]),
                           tuple(int(s) for s in wire["x"]), tuple(str(n) for n in wire["n"]))
        if kind == GenTokens.KIND:
            return GenTokens(int(wire["step"]),
                             tuple((int(sid), int(tok), bool(fin))
                                   for sid, tok, fin in wire["tok"]),
                             tuple(int(s) for s in wire["x"]))
        if kind == KvInfo.KIND:
            return KvInfo(int(wire["rank"]), int(wire["blocks"]), int(wire["bpt"]))
        if kind == Keepalive.KIND:
            return KEEPALIVE
        if kind == Close.KIND:
            return CLOSE
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CommError(f"malformed stage message {wire!r:.200}: {exc!r}") from exc
    raise CommError(f"unknown stage message kind {wire.get('k')!r:.50}")


def send(comm: Comm, dst: int, message: StageMessage, tensors: list[Any] | tuple[Any, ...] = (),
         *, window: int = 0) -> None:
    """Send a stage message and its tensors; a header too large for one p2p header travels
    packed in a uint8 tensor ahead of the tensors instead."""
    wire = message.to_wire()
    try:
        comm.send(dst, wire, list(tensors), window=window)
    except ValueError:
        import torch

        packed = msgpack.packb(wire, use_bin_type=True)
        meta = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
        comm.send(dst, {"k": wire["k"], "m": 1}, [meta, *tensors], window=window)


def recv(comm: Comm, src: int) -> tuple[StageMessage, list[Any]]:
    """Receive one stage message and the tensors it announces (see ``send``)."""
    header, tensors = comm.recv(src)
    if header.get("m") == 1 and tensors:
        try:
            header = msgpack.unpackb(tensors[0].cpu().numpy().tobytes(), raw=False)
        except Exception as exc:
            raise CommError(f"unreadable packed stage message from rank {src}: {exc!r}") from exc
        if not isinstance(header, dict):
            raise CommError(f"packed stage message from rank {src} is not a map")
        tensors = tensors[1:]
    return decode(header), tensors
