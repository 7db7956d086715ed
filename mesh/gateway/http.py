"""HTTP for the gateway: the server's guards and a plain ASGI app's request/response helpers.

uvicorn with httptools parses HTTP/1.1 (chosen by measurement: docs/gateway.md), but leaves a
server open to a client that sends headers forever, or slowly: ``guarded_protocol`` is its
httptools protocol with the limits a public port needs,

* the request line and headers at most ``max_header_bytes`` (else 431, connection closed);
* the head complete within ``header_timeout_s`` of the connection opening or the request's
  first byte (else 408, closed): a client that trickles its headers holds nothing for long;

and the app reads bodies with ``read_body``: at most ``max_body_bytes`` (413, before reading
when Content-Length says so), within ``body_timeout_s`` (408). Keep-alive idleness and the
number of connections are uvicorn's own settings (``timeout_keep_alive``,
``limit_concurrency``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import msgspec

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
           415: "Unsupported Media Type", 429: "Too Many Requests",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_header_bytes: int = 16 * 1024
    header_timeout_s: float = 10.0
    max_body_bytes: int = 64 * 1024 * 1024
    body_timeout_s: float = 30.0


class HttpError(Exception):
    """An answer to send instead of going on: ``status`` and a message for people (which
    never echoes large values)."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None,
                 kind: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.kind = kind  # a convention's error type, where it has one


def refusal(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response refusing a request, after which the connection closes."""
    body = message.encode()
    return (f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\ncontent-type: text/plain; "
            f"charset=utf-8\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
            .encode() + body)


def guarded_protocol(limits: HttpLimits) -> type[Any]:
    """uvicorn's httptools protocol, with a bound on the head's size and time."""
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class Guarded(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0
        _refusal: tuple[int, str] | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(limits.header_timeout_s, self._timeout)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _timeout(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self._refuse(408, "the request's headers did not arrive in time")

        def _refuse(self, status: int, message: str) -> None:
            self.transport.write(refusal(status, message))
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self._refuse(400, "protocol upgrades are not supported")
            except httptools.HttpParserError:
                status, message = self._refusal or (400, "invalid HTTP request")
                self._refuse(status, message)

        def _count(self, n: int) -> None:
            self._head_bytes += n
            if self._head_bytes > limits.max_header_bytes:
                self._refusal = (431, f"the request line and headers exceed "
                                      f"{limits.max_header_bytes} bytes")
                raise ValueError(self._refusal[1])  # stops the parser: data_received answers

        def on_message_begin(self) -> None:
            self._head_bytes = 0
            self._refusal = None
            self._arm_head_timer()
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm_head_timer()
            super().on_headers_complete()

        def shutdown(self) -> None:
            # An idle connection goes at once: closing a TLS one politely waits for the
            # client's close_notify, which an idle client in a pool never sends (30 s).
            if self.cycle is None or self.cycle.response_complete:
                self.transport.abort()
            else:
                super().shutdown()

    return Guarded


@dataclass(slots=True)
class Request:
    """What the app reads of an HTTP request (headers lower-cased; the last of a repeated
    header wins)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    receive: Receive = field(repr=False)

    @classmethod
    def of(cls, scope: Scope, receive: Receive) -> Request:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        return cls(scope["method"], scope["path"], query, headers, receive)


async def read_body(request: Request, limits: HttpLimits) -> bytes:
    """The whole body, within the limits (HttpError 413, 408 or 400)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HttpError(400, "Content-Length is not a number")
        if int(declared) > limits.max_body_bytes:
            raise HttpError(413, f"the body of {int(declared)} bytes exceeds "
                                 f"{limits.max_body_bytes}")
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    raise HttpError(400, "the client went away before its body was complete")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise HttpError(413, f"the body exceeds {limits.max_body_bytes} bytes")
                parts.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise HttpError(408, f"the body did not arrive within {limits.body_timeout_s:g} s"
                        ) from None
    return b"".join(parts)


_decode_json = msgspec.json.Decoder().decode
_encode_json = msgspec.json.Encoder().encode


def parse_json(body: bytes, what: str = "the body") -> Any:
    try:
        return _decode_json(body)
    except (msgspec.DecodeError, ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"{what} is not JSON: {str(exc)[:80]}") from None


async def respond(send: Send, status: int, body: bytes, *,
                  content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", content_type.encode()),
           (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def respond_json(send: Send, status: int, value: Any, *,
                       headers: dict[str, str] | None = None) -> None:
    await respond(send, status, _encode_json(value), headers=headers)


class EventStream:
    """A server-sent events response: ``data: ...`` events, opened on the first."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def start(self) -> None:
        if not self.started:
            self.started = True
            await self._send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})

    async def event(self, data: str) -> None:
        await self.raw(f"data: {data}\n\n".encode())

    async def raw(self, event: bytes) -> None:
        """An event already formatted (``data: ...`` and its blank line)."""
        if not self.started:
            await self.start()
        await self._send({"type": "http.response.body", "body": event, "more_body": True})

    async def close(self) -> None:
        await self.start()
        await self._send({"type": "http.response.body", "body": b""})


async def disconnected(receive: Receive) -> None:
    """Return when the client closes its connection (once the body has been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
