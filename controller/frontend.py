"""The Frontend: the client-facing ROUTER socket, request validation, hand-off to routers.

Everything a client can get wrong is caught here and answered with a typed error to that
client alone: oversized payloads, headers that are not msgpack or not a map, a protocol version
we do not speak, unknown kinds and models, bad timeouts, tensor references that do not match
their frames. A valid request reaches its deployment's Router without its tensors ever being
decoded: the header frame and tensor frames are forwarded as they came.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import zmq

from controller import plain_request
from controller.connections import ConnectionWatch
from controller.router import Router
from controller.routers import Routers
from mesh import codec
from mesh.errors import (
    BadRequest,
    MeshError,
    PayloadTooLarge,
    UnknownModel,
    UnsupportedVersion,
    excerpt,
)
from mesh.messages import (
    FEATURES,
    MAX_BATCH,
    MAX_ID_BYTES,
    PROTOCOL_VERSION,
    ClientKind,
    batch_header,
    error_header,
    split_batch,
)
from mesh.security import ServerKeys
from mesh.transport import Pump, bind_socket, make_socket

log = logging.getLogger(__name__)

CLIENT_SEND_HWM = 1000  # answers queued for one client connection before further ones drop


class Frontend:
    def __init__(
        self,
        context: zmq.Context[Any],
        endpoint: str,
        *,
        max_request_bytes: int,
        curve: ServerKeys | None = None,
        max_connections: int = 10_000,
        describe: Callable[[], list[dict[str, Any]]] | None = None,
        defer: Callable[[Callable[[], None]], object] | None = None,
        after_batch: Callable[[], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        # Which start of the controller this is: a client that sees it change in a pong knows
        # that the requests it sent before were lost with the previous one.
        self.incarnation = os.urandom(8).hex()
        self._describe = describe or list
        self.routers = Routers.of({})  # from ``start``
        self.max_request_bytes = max_request_bytes
        # ZeroMQ drops the connection of a peer sending a frame over MAXMSGSIZE; keep that far
        # above our own limit so an oversized request normally gets a typed answer instead.
        # A client that does not read its answers: at most CLIENT_SEND_HWM of them wait in
        # ZeroMQ for it; later ones are dropped and counted (``answers_dropped``), so one slow
        # reader cannot grow the controller. ROUTER_MANDATORY makes the drop visible here.
        sock = make_socket(context, zmq.ROUTER, max_msg_bytes=max_request_bytes * 4 + (1 << 20),
                           sndhwm=CLIENT_SEND_HWM, curve=curve)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        bind_socket(sock, endpoint)
        self.pump = Pump(sock, self._on_message, name="frontend")
        self.connections = ConnectionWatch(sock, max_connections)
        self.rejected = 0
        self.rejected_by_code: Counter[str] = Counter()
        # Clients that send batches, and so take their answers in batches too; the newest
        # ``max_connections`` are remembered (one forgotten is answered one by one).
        self._batching: dict[bytes, None] = {}
        self._max_batching = max_connections
        self._held: dict[bytes, list[list[Any]]] = {}
        self._flush_scheduled = False
        self._defer = defer or (lambda fn: fn())
        # Run what a client's batch made the routers hold: sent on at once, not merged with
        # what else this wake-up reads (controller/held_sends.py).
        self._after_batch = after_batch or (lambda: None)

    def start(self, routers: Routers) -> None:
        """Start taking requests, for these deployments' routers."""
        self.routers = routers
        self.connections.start()
        self.pump.start()

    def close(self) -> None:
        self.connections.close()
        self.pump.close()

    def send(self, frames: list[Any]) -> bool:
        """Send an answer to the client ``frames[0]``: at once, or, to a client that sends
        batches, held until the end of this wake-up and sent with the others held for it as
        one batch (``flush``). False: dropped (the client's connection is gone or full)."""
        client = frames[0]
        held = self._held.get(client)
        if held is not None:
            held.append(frames)
        elif client not in self._batching:
            return self.pump.send(frames)
        else:
            self._held[client] = [frames]
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._defer(self.flush)
        return True

    def flush(self) -> None:
        """Send each client its held answers, as one batch per client (MAX_BATCH at most)."""
        self._flush_scheduled = False
        held, self._held = self._held, {}
        for client, messages in held.items():
            for at in range(0, len(messages), MAX_BATCH):
                part = messages[at:at + MAX_BATCH]
                if len(part) == 1:
                    self.pump.send(part[0])
                    continue
                frames: list[Any] = [client, codec.pack(batch_header(
                    [len(m) - 1 for m in part]))]
                for m in part:
                    frames += m[1:]
                if not self.pump.send(frames):
                    self.pump.dropped += len(part) - 1  # answers_dropped counts answers

    def _batch(self, client: bytes, header: dict[str, Any], frames: list[Any],
               nested: bool) -> None:
        """Several requests in one message: each handled as if it had come alone."""
        parts = None if nested else split_batch(header, frames[2:])
        if parts is None:
            raise BadRequest("a batch's 'counts' must list at most "
                             f"{MAX_BATCH} positive frame counts adding up to the frames "
                             "after its header" + ("; batches do not nest" if nested else ""))
        batching = self._batching
        if client not in batching:
            if len(batching) >= self._max_batching:
                del batching[next(iter(batching))]  # the oldest: it is answered one by one
            batching[client] = None
        for part in parts:
            self._on_message([client, *part], True)
        self._after_batch()

    def _on_message(self, frames: list[Any], in_batch: bool = False) -> None:
        client = frames[0]
        if len(frames) < 2:
            self._error(client, None, BadRequest("message has no header frame"))
            return
        size = 0
        for f in frames[1:]:
            size += len(f)
        buffer = codec.frame_buffer(frames[1])
        plain = plain_request.read(buffer, frames, 2, size, self.max_request_bytes)
        if plain is None or not self._submit_plain(client, plain, frames):
            self._general(client, frames, buffer, size, in_batch)

    def _submit_plain(self, client: bytes, plain: plain_request.PlainRequest,
                      frames: list[Any]) -> bool:
        """The usual request, read in one typed pass (controller/plain_request.py); False
        leaves it to the general path, which words every error."""
        router = self.routers.resolve(plain.model)
        if router is None:
            return False
        timeout_ms = plain.timeout_ms
        if timeout_ms is None:
            timeout_ms = router.deployment.default_timeout_ms
        elif timeout_ms > router.deployment.max_timeout_ms:
            return False
        router.submit(client, plain.id, plain.kind, frames[1], frames[2:],
                      max(1, math.ceil(timeout_ms)))
        return True

    def _general(self, client: bytes, frames: list[Any], buffer: Any, size: int,
                 in_batch: bool) -> None:
        """Any message: each of its faults answered with a typed error naming it."""
        try:
            header = codec.unpack_header(buffer)
        except BadRequest as bad:
            error: MeshError = bad
            if size > self.max_request_bytes:
                error = PayloadTooLarge(f"request is {size} bytes; limit {self.max_request_bytes}")
            self._error(client, None, error)
            return
        req_id = header.get("id") if isinstance(header, dict) else None
        if not _echoable(req_id):
            req_id = None  # answered without an id rather than with the client's bulk
        try:
            self._check_envelope(header, size)
            kind = header.get("kind")
            if kind == ClientKind.BATCH and "id" not in header:
                self._batch(client, header, frames, in_batch)
                return
            if req_id is None:
                raise BadRequest("header 'id' must be a 64-bit integer or a string")
            if self._answered_here(client, kind, req_id, header):
                return
            router, timeout_ms = self._request(kind, header, frames)
        except MeshError as exc:
            self._error(client, req_id, exc)
            return
        except RecursionError:  # a walk deeper than codec.MAX_DEPTH should make impossible
            self._error(client, req_id, BadRequest("header is nested too deeply"))
            return
        router.submit(client, req_id, kind, frames[1], frames[2:], max(1, math.ceil(timeout_ms)))

    def _check_envelope(self, header: Any, size: int) -> None:
        """Size, shape, version and id length, whatever the message is."""
        # A batch's requests are held to the limit one by one, not all together.
        if size > self.max_request_bytes and not (
                isinstance(header, dict) and header.get("kind") == ClientKind.BATCH):
            raise PayloadTooLarge(f"request is {size} bytes; limit {self.max_request_bytes}")
        if not isinstance(header, dict):
            raise BadRequest("header must be a msgpack map")
        version = header.get("v")
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise UnsupportedVersion(
                f"protocol version {excerpt(version)} is not supported; this controller "
                f"speaks {PROTOCOL_VERSION}")
        sent = header.get("id")
        if isinstance(sent, str) and len(sent.encode()) > MAX_ID_BYTES:
            raise BadRequest(f"header 'id' is {len(sent.encode())} bytes; a string id may "
                             f"have at most {MAX_ID_BYTES}")

    def _answered_here(self, client: bytes, kind: Any, req_id: Any,
                       header: dict[str, Any]) -> bool:
        """Cancel, describe and ping need no world: handled here (True)."""
        if kind == ClientKind.CANCEL:
            for router in self.routers.values():
                router.cancel(client, req_id)
        elif kind == ClientKind.DESCRIBE:
            self._description(client, req_id, header.get("model"))
        elif kind == ClientKind.PING:
            self.send([client, codec.pack({"v": PROTOCOL_VERSION, "kind": ClientKind.PONG,
                                           "id": req_id, "incarnation": self.incarnation,
                                           "features": FEATURES})])
        else:
            return False
        return True

    def _request(self, kind: Any, header: dict[str, Any],
                 frames: list[Any]) -> tuple[Router, float]:
        """An infer or stream request's router and deadline, every field checked."""
        if kind == ClientKind.BATCH:
            raise BadRequest("a batch header has no 'id'")
        if kind not in (ClientKind.INFER, ClientKind.STREAM):
            raise BadRequest(f"unknown request kind {excerpt(kind)}")
        model = header.get("model")
        router = self.routers.resolve(model) if isinstance(model, str) else None
        if router is None:
            raise UnknownModel(f"no deployment named {excerpt(model)}; "
                               f"serving {self.routers.names()[:20]}")
        inputs = header.get("inputs")
        if not isinstance(inputs, dict):
            raise BadRequest("header 'inputs' must be a map of named values")
        if "params" in header and not isinstance(header["params"], dict):
            raise BadRequest("header 'params' must be a map")
        timeout_ms = header.get("timeout_ms")
        dep = router.deployment
        if timeout_ms is None:
            timeout_ms = dep.default_timeout_ms
        elif isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int | float) \
                or not 0 < timeout_ms < math.inf:  # NaN fails this too
            raise BadRequest(f"'timeout_ms' must be a positive number, got "
                             f"{excerpt(timeout_ms)}")
        elif timeout_ms > dep.max_timeout_ms:
            raise BadRequest(f"'timeout_ms' {timeout_ms} exceeds the limit {dep.max_timeout_ms}")
        # Check every tensor reference against its frame now, so a malformed request is
        # answered here and never reaches (or slows) a worker.
        codec.check_tensor_refs(header, inputs, frames, 2)
        return router, timeout_ms

    def _description(self, client: bytes, req_id: Any, model: Any) -> None:
        models = self._describe()
        if model is not None:
            models = [m for m in models if m["name"] == model]
            if not models:
                raise UnknownModel(f"no deployment named {excerpt(model)}; "
                                   f"serving {self.routers.names()[:20]}")
        self.send([client, codec.pack({"v": PROTOCOL_VERSION,
                                       "kind": ClientKind.DESCRIPTION, "id": req_id,
                                       "protocol_version": PROTOCOL_VERSION,
                                       "models": models})])

    def _error(self, client: bytes, req_id: Any, exc: MeshError) -> None:
        self.rejected += 1
        self.rejected_by_code[exc.code] += 1
        self.send([client, codec.pack(error_header(req_id, exc.code, exc.message,
                                                   exc.retryable))])


def _echoable(req_id: Any) -> bool:
    """A request id fit to echo in an answer, valid or not: a 64-bit int, or a string of at
    most 4 x MAX_ID_BYTES (a longer one is answered without an id, never copied back)."""
    if type(req_id) is int:
        return -(2**63) <= req_id < 2**64
    return type(req_id) is str and len(req_id) <= 4 * MAX_ID_BYTES and \
        len(req_id.encode()) <= 4 * MAX_ID_BYTES
