"""The async Python client.

    async with Client("tcp://127.0.0.1:5555") as client:
        out = await client.infer("mlp", {"x": array}, timeout_s=5.0)
        async for chunk in client.stream("tinygpt", {"prompt": "hi"}, max_tokens=32):
            ...

One DEALER socket per client, driven by a Pump (no await per message), so a single client can
keep thousands of requests in flight; ``meshctl bench`` uses it as its load generator.
Inputs may be numpy arrays, torch tensors or msgpack-native values; tensors come back as
numpy arrays, so a client process never needs to import torch.

Every call has a deadline. The server enforces ``timeout_s`` and answers DeadlineExceeded
itself; the client waits ``grace_s`` longer and then raises DeadlineExceeded locally, so a
dead controller can never hang a caller.

A lost controller is noticed sooner than that. While anything is in flight the client pings
the controller every ``heartbeat_s``; when no message at all arrives for
``controller_timeout_s`` (5 s: longer than a controller's loop should ever stall, GC and load
included) it declares the controller lost, fails everything in flight with
``ControllerLost`` (retryable) and reconnects on a fresh socket, so that nothing it had queued
for the lost controller is delivered later. A pong from a *restarted* controller (another
``incarnation``) fails what was sent before that ping the same way: those requests died with
the previous controller. ``infer(retries=N)`` sends such a request again within its deadline;
a generative stream resumes after its last chunk (``params.resume``: the token ids its chunks
carried), as it does after a world failure.
A failed request may have been computed, but it is never answered twice.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, Self

import zmq

from mesh import codec
from mesh.errors import (
    BadRequest,
    Cancelled,
    ControllerLost,
    DeadlineExceeded,
    MeshError,
    Overloaded,
    Unavailable,
    error_from_wire,
)
from mesh.messages import (
    MAX_BATCH,
    PROTOCOL_VERSION,
    ClientKind,
    batch_header,
    request_header,
    split_batch,
)
from mesh.security import client_keys
from mesh.transport import Pump, make_socket

_END = object()
# Requests held for one batch carry at most this many bytes; a larger one goes alone.
BATCH_BYTES = 256 * 1024


class _Stream:
    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()


class Client:
    """An async client of one meshserve controller."""

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5555",
        *,
        default_timeout_s: float = 30.0,
        grace_s: float = 2.0,
        context: zmq.Context[Any] | None = None,
        key: str | None = None,
        controller_key: str | None = None,
        heartbeat_s: float = 0.5,
        controller_timeout_s: float = 5.0,
        batch: bool = True,
    ) -> None:
        """``key`` (this client's NAME.key_secret) and ``controller_key`` (the controller's
        NAME.key) turn on CURVE, for a controller with ``[security] curve = true``.
        ``heartbeat_s`` (0: never ping) and ``controller_timeout_s``: how the client notices a
        lost controller (module docstring). ``batch``: send the requests made in one loop
        iteration as one message, once the controller's pong says it takes batches (protocol
        section 3.9); False: one message per request, always."""
        if not 0 <= heartbeat_s < math.inf or not 0 < controller_timeout_s < math.inf:
            raise ValueError("heartbeat_s must be >= 0 and controller_timeout_s > 0")
        if heartbeat_s and controller_timeout_s < 2 * heartbeat_s:
            raise ValueError("controller_timeout_s must be at least twice heartbeat_s")
        self.endpoint = endpoint
        self.heartbeat_s = heartbeat_s
        self.controller_timeout_s = controller_timeout_s
        self._curve = client_keys(key, controller_key)
        self.default_timeout_s = default_timeout_s
        self.grace_s = grace_s
        self._own_context = context is None
        self._context: zmq.Context[Any] = context if context is not None else zmq.Context()
        self._pump: Pump | None = None
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._streams: dict[int, _Stream] = {}
        self._closed = False
        # Liveness: the ping ids not yet answered, when the oldest unanswered ping was sent
        # (None: the controller has been heard since), the controller's incarnation as its
        # pongs say, and whether it is lost now.
        self._pings: set[int] = set()
        self._silent_since: float | None = None
        self._incarnation = ""
        self._lost = False
        self._ticker: asyncio.TimerHandle | None = None
        self.controller_losses = 0  # times the client declared its controller lost
        # Batching: allowed by the caller, offered by the controller (its pong), and what is
        # held for the flush at the end of this loop iteration.
        self._batch_allowed = batch
        self._batching = False
        self._held: list[list[Any]] = []
        self._held_bytes = 0

    async def connect(self) -> None:
        self._open()
        if self.heartbeat_s:
            # A first ping learns the controller's incarnation, so a restart is noticed even
            # if it happens before the client's first heartbeat.
            self._ping(asyncio.get_running_loop().time())
            self._ticker = asyncio.get_running_loop().call_later(self.heartbeat_s, self._tick)

    def _open(self) -> None:
        sock = make_socket(self._context, zmq.DEALER, curve=self._curve)
        sock.connect(self.endpoint)
        self._pump = Pump(sock, self._on_message, name="client", copy_prefix=1)
        self._pump.start()

    @property
    def controller_lost(self) -> bool:
        """True from the moment the controller is declared lost until it is heard again."""
        return self._lost

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(Cancelled("client closed"))
        self._calls.clear()
        for stream in self._streams.values():
            stream.queue.put_nowait(Cancelled("client closed"))
        self._streams.clear()
        if self._pump is not None:
            self._pump.close()
        if self._own_context:
            self._context.term()

    # -- calls ----------------------------------------------------------------------------

    async def infer(
        self,
        model: str,
        inputs: dict[str, Any],
        *,
        timeout_s: float | None = None,
        params: dict[str, Any] | None = None,
        retries: int = 0,
    ) -> dict[str, Any]:
        """One request, one answer: the model's named outputs (tensors as numpy arrays).

        ``retries``: how many times to send it again after an ``overloaded`` or
        ``unavailable`` answer or a lost controller (``ControllerLost``), within the same
        ``timeout_s``, each after the server's retry-after hint (or 50 ms, doubling) with
        jitter, so that callers refused together do not come back together."""
        timeout_s = self.default_timeout_s if timeout_s is None else timeout_s
        if timeout_s <= 0:
            raise BadRequest("timeout_s must be positive")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        attempt = 0
        while True:
            try:
                return await self._infer_once(model, inputs, deadline - loop.time(), params)
            except (Overloaded, Unavailable) as exc:
                attempt += 1
                pause_s = backoff_s(exc.retry_after_ms, attempt)
                if attempt > retries or loop.time() + pause_s >= deadline:
                    raise
                await asyncio.sleep(pause_s)

    async def _infer_once(self, model: str, inputs: dict[str, Any], timeout_s: float,
                          params: dict[str, Any] | None) -> dict[str, Any]:
        req_id = next(self._ids)
        frames = _encode_request(ClientKind.INFER, req_id, model, inputs, timeout_s, params)
        return await self._call(req_id, frames, timeout_s + self.grace_s)

    async def describe(self, model: str | None = None, *, timeout_s: float = 5.0
                       ) -> dict[str, Any]:
        """What the controller serves: ``{"protocol_version", "models": [...]}``, each model
        with its ``inputs`` and ``outputs`` (``{name, datatype, shape}``, -1 for the batch),
        ``parameters``, ``streaming``, ``stages`` and ``ready`` (protocol section 3.8).
        ``model``: that deployment only (``UnknownModel`` if there is none)."""
        req_id = next(self._ids)
        header: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": ClientKind.DESCRIBE,
                                  "id": req_id}
        if model is not None:
            header["model"] = model
        return await self._call(req_id, [codec.pack(header)], timeout_s)

    async def _call(self, req_id: int, frames: list[Any], wait_s: float) -> dict[str, Any]:
        """Send one request and await its one answer, for at most ``wait_s``."""
        pump = self._ready()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._calls[req_id] = fut
        timer = loop.call_later(wait_s, self._expire, req_id)
        self._send(pump, frames)
        try:
            return await fut
        finally:
            timer.cancel()
            self._calls.pop(req_id, None)

    async def stream(
        self,
        model: str,
        inputs: dict[str, Any],
        *,
        max_tokens: int | None = None,
        timeout_s: float | None = None,
        params: dict[str, Any] | None = None,
        resume: bool = True,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """One request, a sequence of chunks; ends cleanly on the server's end marker.

        Each chunk is the dict of its outputs (a generative model's: ``{"text": ...}``, the
        last one with ``finish_reason``, ``prompt_tokens`` and ``completion_tokens``).
        ``resume``: after a lost controller (``ControllerLost``), send the request again with
        ``params.resume`` naming the tokens already received, within the same deadline, so the
        caller sees one stream with every chunk once: the new world prefills them after the
        prompt and generates on from there (a seeded sampler continues exactly)."""
        self._ready()
        timeout_s = self.default_timeout_s if timeout_s is None else timeout_s
        if timeout_s <= 0:
            raise BadRequest("timeout_s must be positive")
        params = dict(params or {})
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        asked = params.get("resume")
        asked_tokens = list(asked.get("tokens") or []) if isinstance(asked, dict) else []
        asked_chunks = asked.get("chunks", 0) if isinstance(asked, dict) else 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        received = 0
        tokens: list[int] = []
        attempt = 0
        while True:
            if received:
                if len(tokens) < received:
                    raise ControllerLost("the stream's chunks carried no token ids to resume "
                                         "from")
                params["resume"] = {"tokens": asked_tokens + tokens,
                                    "chunks": asked_chunks + received}
            try:
                async with aclosing(self._stream_once(model, inputs, deadline - loop.time(),
                                                      params, timeout_s)) as chunks:
                    async for chunk, chunk_tokens in chunks:
                        received += 1
                        tokens += chunk_tokens
                        yield chunk
                return
            except ControllerLost as exc:
                attempt += 1
                pause_s = backoff_s(exc.retry_after_ms, attempt)
                if not resume or loop.time() + pause_s >= deadline:
                    raise
                await asyncio.sleep(pause_s)

    async def _stream_once(self, model: str, inputs: dict[str, Any], timeout_s: float,
                           params: dict[str, Any], asked_s: float
                           ) -> AsyncGenerator[tuple[dict[str, Any], list[int]], None]:
        pump = self._ready()
        req_id = next(self._ids)
        frames = _encode_request(ClientKind.STREAM, req_id, model, inputs, timeout_s, params)
        stream = _Stream()
        self._streams[req_id] = stream
        finished = False
        self._send(pump, frames)
        try:
            async with asyncio.timeout(timeout_s + self.grace_s):
                while True:
                    item = await stream.queue.get()
                    if item is _END:
                        finished = True
                        return
                    if isinstance(item, MeshError):
                        finished = True
                        raise item
                    yield item
        except TimeoutError:
            raise DeadlineExceeded(f"no end of stream within {asked_s}s") from None
        finally:
            self._streams.pop(req_id, None)
            if not finished and not self._closed and self._pump is not None:
                # The caller stopped early: tell the server so the world stops decoding.
                self._send(self._pump, [codec.pack({"v": PROTOCOL_VERSION,
                                                    "kind": ClientKind.CANCEL, "id": req_id})])

    # -- liveness -------------------------------------------------------------------------

    def _tick(self) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._calls or self._streams or self._lost:
            silent = self._silent_since
            if silent is not None and now - silent >= self.controller_timeout_s:
                self._lose(f"no answer from the controller at {self.endpoint} for "
                           f"{now - silent:.1f}s")
            self._ping(now)
        else:
            self._pings.clear()  # nothing to protect: an idle client does not ping
            self._silent_since = None
        self._ticker = loop.call_later(self.heartbeat_s, self._tick)

    def _ping(self, now: float) -> None:
        if self._pump is None:
            return
        # What is held goes first: a pong from a restarted controller fails the requests sent
        # before its ping, so those must have gone before it.
        self._flush()
        ping_id = next(self._ids)
        self._pings.add(ping_id)
        if self._silent_since is None:
            self._silent_since = now
        self._pump.send([codec.pack({"v": PROTOCOL_VERSION, "kind": ClientKind.PING,
                                     "id": ping_id})])

    def _on_pong(self, ping_id: int, header: dict[str, Any]) -> None:
        self._pings = {p for p in self._pings if p > ping_id}
        features = header.get("features")
        self._batching = self._batch_allowed and isinstance(features, list) and \
            ClientKind.BATCH in features
        incarnation = header.get("incarnation")
        if not isinstance(incarnation, str) or not incarnation:
            return
        if self._incarnation and incarnation != self._incarnation:
            # The controller restarted: whatever was sent before this ping went to the
            # previous one (or may have; it cannot be told apart) and will not be answered.
            self._fail(ControllerLost("the controller restarted",
                                      retry_after_ms=int(self.heartbeat_s * 1000)),
                       before=ping_id)
        self._incarnation = incarnation

    def _lose(self, why: str) -> None:
        """Declare the controller lost: fail everything in flight, reconnect afresh."""
        if not self._lost:
            self.controller_losses += 1
        self._lost = True
        self._silent_since = None
        self._pings.clear()
        self._fail(ControllerLost(why, retry_after_ms=int(self.heartbeat_s * 1000)))
        self._held.clear()  # requests of the calls just failed
        self._held_bytes = 0
        self._batching = False  # until the next controller's pong says it takes batches
        # A fresh socket: what the old one still queued for the lost controller is dropped
        # rather than delivered (and computed) whenever it comes back.
        if self._pump is not None:
            self._pump.close()
        self._open()

    def _fail(self, error: MeshError, before: int | None = None) -> None:
        for req_id, fut in list(self._calls.items()):
            if (before is None or req_id < before) and not fut.done():
                fut.set_exception(error)
        for req_id, stream in list(self._streams.items()):
            if before is None or req_id < before:
                stream.queue.put_nowait(error)

    # -- internals ------------------------------------------------------------------------

    def _ready(self) -> Pump:
        if self._closed:
            raise Cancelled("client is closed")
        if self._pump is None:
            raise RuntimeError("client is not connected; use 'async with Client(...)'")
        return self._pump

    def _send(self, pump: Pump, frames: list[Any]) -> None:
        """Send now, or hold for this iteration's batch (requests of BATCH_BYTES or more are
        never held: they go alone, after what is held, so the order is kept)."""
        if not self._batching:
            pump.send(frames)
            return
        size = sum(len(f) for f in frames)
        if size >= BATCH_BYTES or self._held_bytes + size > BATCH_BYTES or \
                len(self._held) >= MAX_BATCH:
            self._flush()
            if size >= BATCH_BYTES:
                pump.send(frames)
                return
        if not self._held:
            asyncio.get_running_loop().call_soon(self._flush)
        self._held.append(frames)
        self._held_bytes += size

    def _flush(self) -> None:
        held = self._held
        if not held or self._pump is None:
            return
        self._held = []
        self._held_bytes = 0
        if len(held) == 1:
            self._pump.send(held[0])
            return
        frames: list[Any] = [codec.pack(batch_header([len(m) for m in held]))]
        for m in held:
            frames += m
        self._pump.send(frames)

    def _expire(self, req_id: int) -> None:
        fut = self._calls.pop(req_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(DeadlineExceeded("no answer from the controller in time"))

    def _on_message(self, frames: list[Any]) -> None:
        self._silent_since = None  # any message at all: the controller is there
        self._lost = False
        try:
            header = codec.unpack_header(codec.frame_buffer(frames[0]))
            kind = header["kind"]
            if kind == ClientKind.BATCH:
                for part in split_batch(header, frames[1:]) or ():
                    self._on_answer(part)
                return
            req_id = header["id"]
        except (MeshError, KeyError, TypeError):
            return  # not ours to understand; the protocol says answers are well formed
        self._on_header(header, req_id, kind, frames)

    def _on_answer(self, frames: list[Any]) -> None:
        """One answer of a batch."""
        try:
            header = codec.unpack_header(codec.frame_buffer(frames[0]))
            req_id = header["id"]
            kind = header["kind"]
        except (MeshError, KeyError, TypeError):
            return
        if kind != ClientKind.BATCH:
            self._on_header(header, req_id, kind, frames)

    def _on_header(self, header: dict[str, Any], req_id: Any, kind: Any,
                   frames: list[Any]) -> None:
        if kind == ClientKind.PONG:
            if req_id in self._pings:
                self._on_pong(req_id, header)
            return
        if kind == ClientKind.DESCRIPTION:
            self._deliver(req_id, {"protocol_version": header.get("protocol_version"),
                                   "models": header.get("models", [])})
            return
        if kind == ClientKind.ERROR:
            self._pings.discard(req_id)  # a controller too old to know pings says so
            err = error_from_wire(str(header.get("code")), str(header.get("message", "")),
                                  header.get("retry_after_ms", 0))
            self._deliver(req_id, err)
            return
        try:
            body = codec.decode_tensors(header, frames, codec.to_numpy)
        except MeshError as exc:
            self._deliver(req_id, exc)
            return
        if kind == ClientKind.RESULT:
            self._deliver(req_id, body.get("outputs", {}))
        elif kind == ClientKind.CHUNK:
            stream = self._streams.get(req_id)
            if stream is not None:
                tokens = header.get("tokens")
                stream.queue.put_nowait((body.get("outputs", {}),
                                         tokens if type(tokens) is list else []))
        elif kind == ClientKind.END:
            stream = self._streams.get(req_id)
            if stream is not None:
                stream.queue.put_nowait(_END)

    def _deliver(self, req_id: Any, value: Any) -> None:
        fut = self._calls.get(req_id)
        if fut is not None:
            if not fut.done():
                if isinstance(value, BaseException):
                    fut.set_exception(value)
                else:
                    fut.set_result(value)
            return
        stream = self._streams.get(req_id)
        if stream is not None and isinstance(value, BaseException):
            stream.queue.put_nowait(value)


def _encode_request(
    kind: str,
    req_id: int,
    model: str,
    inputs: dict[str, Any],
    timeout_s: float,
    params: dict[str, Any] | None,
) -> list[Any]:
    if not isinstance(inputs, dict):
        raise BadRequest("inputs must be a dict of named values")
    header = request_header(kind, req_id, model, inputs, max(1, int(timeout_s * 1000)), params)
    try:
        return codec.encode(header)
    except codec.EncodeError as exc:
        raise BadRequest(str(exc)) from None


def backoff_s(retry_after_ms: int, attempt: int) -> float:
    """How long to wait before retry ``attempt`` (1, 2, ...): the server's hint, else 50 ms
    doubling up to 2 s; times a random factor in [0.5, 1.5) so refused callers spread out."""
    base = retry_after_ms / 1000.0 if retry_after_ms > 0 else min(2.0, 0.05 * 2 ** (attempt - 1))
    return base * (0.5 + random.random())
