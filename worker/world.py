"""One world membership of a worker: its rank, its stage's handler, its communicator.

A world is one replica of one deployment; this worker is rank ``rank`` of ``size``, and ranks
are pipeline stages. Rank 0 takes requests from the controller (through the data plane's
socket and batcher) and pushes activations down the world; every later rank runs a
``StageRunner`` thread that receives from the previous rank, computes its stage, and either
passes on or, as the last stage, answers the controller on a socket of its own.

Pipeline messages (over the world's communicator, see worker.comm):

    {"k": "b", "items": [[rid, client_id, rows], ...], "n": names}   a micro-batch
    {"k": "g", "items": [[rid, client_id, kind, skip]], "step": i, "last": bool, "n": names}
                                                                       one decode step
    {"k": "t", "tokens": [...]}                                       last stage -> rank 0
    {"k": "p"}                                                        keepalive while idle
    {"k": "x"}                                                        the world is closing
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from mesh import codec
from mesh.errors import MeshError, ModelError
from mesh.messages import (
    PROTOCOL_VERSION,
    REPLY,
    REPLY_CHUNK,
    REPLY_ERROR,
    REPLY_OK,
    ClientKind,
    error_header,
    result_header,
)
from mesh.transport import make_socket, send_nowait
from worker.batcher import Batcher
from worker.comm import Comm, CommError
from worker.handler import Handler, Request

log = logging.getLogger(__name__)

OnBroken = Callable[[int, int, str, bool], None]  # (world_id, epoch, reason, peer_lost)


def chunk_header(client_id: Any, seq: int, outputs: dict[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "kind": ClientKind.CHUNK, "id": client_id, "seq": seq,
            "outputs": outputs}


def end_header(client_id: Any, seq: int) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "kind": ClientKind.END, "id": client_id, "seq": seq}


class Replier:
    """Builds and sends answers for one world (frames for a socket its caller owns)."""

    def __init__(self, world_id: int, epoch: int, send: Callable[[list[Any]], None]) -> None:
        self.world_id = world_id
        self.epoch = epoch
        self._send = send

    def result(self, rid: Any, client_id: Any, outputs: dict[str, Any]) -> None:
        try:
            frames = codec.encode(result_header(client_id, outputs))
        except Exception as exc:
            self.error(rid, client_id, ModelError(f"output cannot be encoded: {exc}"))
            return
        self._send([codec.pack([REPLY, rid, self.world_id, self.epoch, REPLY_OK]), *frames])

    def chunk(self, rid: Any, client_id: Any, seq: int, outputs: dict[str, Any]) -> None:
        frames = codec.encode(chunk_header(client_id, seq, outputs))
        self._send([codec.pack([REPLY, rid, self.world_id, self.epoch, REPLY_CHUNK]), *frames])

    def end(self, rid: Any, client_id: Any, seq: int) -> None:
        self._send([codec.pack([REPLY, rid, self.world_id, self.epoch, REPLY_OK]),
                    codec.pack(end_header(client_id, seq))])

    def error(self, rid: Any, client_id: Any, error: MeshError) -> None:
        header = codec.pack(error_header(client_id, error.code, error.message, error.retryable))
        self._send([codec.pack([REPLY, rid, self.world_id, self.epoch, REPLY_ERROR]), header])


class World:
    def __init__(
        self,
        *,
        world_id: int,
        epoch: int,
        rank: int,
        size: int,
        deployment: dict[str, Any],
        handler: Handler,
        comm: Comm | None = None,
    ) -> None:
        self.world_id = world_id
        self.epoch = epoch
        self.rank = rank
        self.size = size
        self.deployment = deployment
        self.handler = handler
        self.comm = comm
        self.draining = False
        self.broken: str | None = None
        self.last_sent_s = time.monotonic()
        self.micro_batches = max(1, int(deployment.get("micro_batches") or size))
        self.batcher = Batcher(
            max_batch_size=int(deployment.get("max_batch_size", 32)),
            max_batch_delay_ms=float(deployment.get("max_batch_delay_ms", 2.0)),
            clock=time.monotonic,
        )
        self.runner: StageRunner | None = None

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def close(self) -> None:
        """Release the communicator; a stage thread blocked on it ends at its next wake."""
        if self.runner is not None:
            self.runner.stop()
        if self.comm is not None:
            self.comm.abort()


def names_and_tensors(tensors: dict[str, Any]) -> tuple[list[str], list[Any]]:
    names = sorted(tensors)
    return names, [tensors[n] for n in names]


class StageRunner:
    """The thread of a rank > 0: receive, compute this stage, pass on or answer."""

    def __init__(self, world: World, *, context: zmq.Context[Any], endpoint: str,
                 identity: str, on_broken: OnBroken, compute_lock: threading.Lock,
                 stats: Any, fault_delay: Callable[[], float] = lambda: 0.0) -> None:
        self.world = world
        self._context = context
        self._endpoint = endpoint
        self._identity = identity
        self._on_broken = on_broken
        self._lock = compute_lock
        self._stats = stats
        self._fault_delay = fault_delay
        self._stopping = False
        self._text: dict[Any, list[str]] = {}  # infer requests on a streaming model
        self._thread = threading.Thread(
            target=self._run, name=f"stage-{world.world_id}.{world.epoch}-r{world.rank}",
            daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True

    def _run(self) -> None:
        world = self.world
        comm = world.comm
        assert comm is not None
        sock = make_socket(self._context, zmq.DEALER, identity=self._identity.encode())
        sock.connect(self._endpoint)
        replier = Replier(world.world_id, world.epoch, lambda frames: send_nowait(sock, frames))
        try:
            while not self._stopping:
                header, tensors = comm.recv(world.rank - 1)
                kind = header.get("k")
                if kind == "x":
                    if not world.is_last:
                        comm.send(world.rank + 1, {"k": "x"})
                    return
                if kind == "p":
                    if not world.is_last:
                        comm.send(world.rank + 1, {"k": "p"}, window=8)
                    continue
                started = time.monotonic()
                delay = self._fault_delay()
                if delay:
                    time.sleep(delay)
                try:
                    with self._lock:
                        acts = world.handler.forward(dict(zip(header["n"], tensors,
                                                              strict=True)))
                except Exception as exc:
                    # The model failed on these requests: answer them, keep the world.
                    log.exception("[worker world %d/%d rank %d] stage failed on a batch",
                                  world.world_id, world.epoch, world.rank)
                    self._fail_items(header, exc, replier, comm)
                    continue
                finally:
                    self._stats.busy_s += time.monotonic() - started
                if not world.is_last:
                    names, out = names_and_tensors(acts)
                    comm.send(world.rank + 1, {**header, "n": names}, out, window=8)
                elif kind == "b":
                    self._finish_batch(header, acts, replier)
                elif kind == "g":
                    self._finish_step(header, acts, replier, comm)
        except CommError as exc:
            if not self._stopping:
                log.warning("[worker world %d/%d rank %d] %s", world.world_id, world.epoch,
                            world.rank, exc)
                self._on_broken(world.world_id, world.epoch, str(exc), exc.kind == "peer_lost")
        except Exception as exc:
            log.exception("[worker world %d/%d rank %d] stage failed", world.world_id,
                          world.epoch, world.rank)
            self._on_broken(world.world_id, world.epoch, f"stage failed: {exc!r}", False)
        finally:
            sock.close(linger=1000)

    def _fail_items(self, header: dict[str, Any], exc: Exception, replier: Replier,
                    comm: Comm) -> None:
        err = exc if isinstance(exc, MeshError) else ModelError(f"{type(exc).__name__}: {exc}")
        for item in header.get("items", []):
            replier.error(item[0], item[1], err)
        if header.get("k") == "g":
            comm.send(0, {"k": "t", "tokens": [], "error": err.message})

    def _finish_batch(self, header: dict[str, Any], acts: dict[str, Any],
                      replier: Replier) -> None:
        items = header["items"]
        batch = [Request({}, {}, int(rows)) for _, _, rows in items]
        try:
            outputs = self.world.handler.split(acts, batch)
        except Exception as exc:
            err = exc if isinstance(exc, MeshError) else ModelError(f"{type(exc).__name__}: {exc}")
            for rid, client_id, _ in items:
                replier.error(rid, client_id, err)
            return
        stats = self._stats
        stats.batches += 1
        stats.requests += len(items)
        stats.rows += sum(int(rows) for _, _, rows in items)
        for (rid, client_id, _), out in zip(items, outputs, strict=True):
            replier.result(rid, client_id, out)

    def _finish_step(self, header: dict[str, Any], acts: dict[str, Any], replier: Replier,
                     comm: Comm) -> None:
        handler = self.world.handler
        tokens = handler.gen_pick(acts)
        step = int(header["step"])
        # The token goes back to rank 0 first: the next step must not wait on our replies.
        comm.send(0, {"k": "t", "tokens": tokens})
        for (rid, client_id, kind, skip), token in zip(header["items"], tokens, strict=True):
            emit_stream_step(replier, handler, self._text, rid, client_id, kind, skip, step,
                             token, bool(header["last"]))


def emit_stream_step(replier: Replier, handler: Handler, text: dict[Any, list[str]], rid: Any,
                     client_id: Any, kind: str, skip: int, step: int, token: int,
                     last: bool) -> None:
    """Deliver one generated token: a chunk (streams) or a piece of the final text (infer)."""
    chunk = handler.gen_chunk(token)
    if kind == ClientKind.STREAM:
        if step >= skip:  # a resumed stream: tokens the client already has are not resent
            replier.chunk(rid, client_id, step, chunk)
        if last:
            replier.end(rid, client_id, step + 1)
        return
    parts = text.setdefault(rid, [])
    parts.append(str(chunk.get("text", "")))
    if last:
        replier.result(rid, client_id, {"text": "".join(text.pop(rid))})
