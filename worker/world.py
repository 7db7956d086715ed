"""One world membership of a worker, and how its answers reach the controller.

A world is one replica of one deployment; this worker is rank ``rank`` of ``size``, and ranks
are pipeline stages. Rank 0 takes requests from the controller and pushes activations down the
world; the last rank answers the controller. Each membership is served by a runner of its own
(worker.runner), so one world's work never waits on another's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh import codec
from mesh.dataplane import CHUNK, ERROR, OK, pack_replies, pack_reply, pack_reply_batch
from mesh.errors import MeshError, ModelError
from mesh.messages import (
    PROTOCOL_VERSION,
    ClientKind,
    error_header,
    result_header,
)
from mesh.spec import DeploymentSpec
from worker.comm import Comm
from worker.handler import Handler

# Answers held for one message at most: bounds a message's size and a held answer's wait.
MAX_REPLY_BATCH = 256

OnBroken = Callable[[int, int, str, bool], None]  # (world_id, epoch, reason, peer_lost)


@dataclass(eq=False)
class World:
    world_id: int
    epoch: int
    rank: int
    size: int
    deployment: DeploymentSpec
    handler: Handler
    comm: Comm | None = None
    # The controller reads packed answer batches (its welcome said so): mesh.dataplane.
    packed_replies: bool = False

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    @property
    def micro_batches(self) -> int:
        return max(1, self.deployment.micro_batches or self.size)

    @property
    def label(self) -> str:
        return f"world {self.world_id}/{self.epoch} rank {self.rank}"


class Compute:
    """The worker's device, shared by every world on it: one computation at a time (a batch,
    a stage's micro-batch or one decoding step, never a whole stream), and the fault-injection
    delay added before each (``meshctl fault``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.delay_s = 0.0

    def turn(self) -> Compute:
        """``with compute.turn():`` holds the device for one computation. A plain context
        manager, not a generator one: it runs around every batch, and right after a forward
        pass a generator-based one costs a visible part of a small model's hop."""
        return self

    def __enter__(self) -> None:
        delay_s = self.delay_s
        if delay_s > 0.0:
            time.sleep(delay_s)
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


@dataclass(slots=True)
class RunnerStats:
    """Counters of one runner, written by its thread only; the heartbeat sums them."""

    batches: int = 0
    rows: int = 0
    requests: int = 0
    busy_s: float = 0.0

    def add(self, other: RunnerStats) -> None:
        self.batches += other.batches
        self.rows += other.rows
        self.requests += other.requests
        self.busy_s += other.busy_s


def chunk_header(client_id: Any, seq: int, outputs: dict[str, Any],
                 tokens: list[int] | None = None) -> dict[str, Any]:
    header = {"v": PROTOCOL_VERSION, "kind": ClientKind.CHUNK, "id": client_id, "seq": seq,
              "outputs": outputs}
    if tokens is not None:
        header["tokens"] = tokens  # a generative stream's token ids: what a resume continues from
    return header


def end_header(client_id: Any, seq: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    header = {"v": PROTOCOL_VERSION, "kind": ClientKind.END, "id": client_id, "seq": seq}
    if extra:
        header.update(extra)
    return header


class Replier:
    """Builds one world's answers and sends them, several to a message: each answer is held
    until ``flush``, which its stage calls once it has nothing more to add right now (after
    taking in what arrived, after a batch or a decoding step). One held answer goes out as a
    ``res`` message, several as one ``resp`` where the controller reads that (``packed``), else
    as one ``ress`` (mesh.dataplane)."""

    def __init__(self, world_id: int, epoch: int, send: Callable[[list[Any]], None],
                 *, packed: bool = False) -> None:
        self.world_id = world_id
        self.epoch = epoch
        self.packed = packed
        self._send = send
        self._held: list[tuple[int, int, str, list[Any]]] = []

    def result(self, rid: Any, client_id: Any, outputs: dict[str, Any]) -> None:
        try:
            frames = codec.encode(result_header(client_id, outputs))
        except Exception as exc:
            self.error(rid, client_id, ModelError(f"output cannot be encoded: {exc}"))
            return
        self._hold(rid, OK, "", frames)

    def chunk(self, rid: Any, client_id: Any, seq: int, outputs: dict[str, Any],
              tokens: list[int] | None = None) -> None:
        self._hold(rid, CHUNK, "", codec.encode(chunk_header(client_id, seq, outputs, tokens)))

    def end(self, rid: Any, client_id: Any, seq: int,
            extra: dict[str, Any] | None = None) -> None:
        self._hold(rid, OK, "", [codec.pack(end_header(client_id, seq, extra))])

    def error(self, rid: Any, client_id: Any, error: MeshError) -> None:
        header = codec.pack(error_header(client_id, error.code, error.message, error.retryable))
        self._hold(rid, ERROR, error.code, [header])

    def _hold(self, rid: int, status: int, code: str, frames: list[Any]) -> None:
        self._held.append((rid, status, code, frames))
        if len(self._held) >= MAX_REPLY_BATCH:
            self.flush()

    def flush(self) -> None:
        """Send every held answer (nothing when none is held)."""
        held = self._held
        if not held:
            return
        self._held = []
        if len(held) == 1:
            rid, status, code, frames = held[0]
            self._send([pack_reply(rid, self.world_id, self.epoch, status, code), *frames])
        elif self.packed:
            self._send(pack_replies(self.world_id, self.epoch, held))
        else:
            items = [(rid, status, code, len(frames)) for rid, status, code, frames in held]
            self._send([pack_reply_batch(self.world_id, self.epoch, items),
                        *[f for _, _, _, frames in held for f in frames]])


def names_and_tensors(tensors: dict[str, Any]) -> tuple[list[str], list[Any]]:
    names = sorted(tensors)
    return names, [tensors[n] for n in names]


def as_model_error(exc: BaseException) -> MeshError:
    return exc if isinstance(exc, MeshError) else ModelError(f"{type(exc).__name__}: {exc}")
