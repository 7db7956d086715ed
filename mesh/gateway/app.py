"""The gateway's ASGI app: routes, bearer tokens, answers and errors, metrics, disconnects.

    GET  /v2  /v2/health/live  /v2/health/ready               KServe v2 server
    GET  /v2/models/{m}[/versions/{v}]  .../ready              model metadata, readiness
    POST /v2/models/{m}[/versions/{v}]/infer                   inference (mesh.gateway.kserve)
    GET  /v1/models[/{m}]                                      OpenAI: the generative models
    POST /v1/completions  /v1/chat/completions                 (mesh.gateway.openai)
    GET  /metrics  /healthz  /readyz                           the gateway's own

With an API keys file, every route but the health checks and ``/metrics`` wants
``Authorization: Bearer TOKEN`` with a token from the file (401 otherwise). Errors follow each
convention (mesh.gateway.errors). A client that goes away while its answer is computed cancels
it: a stream's sequence leaves its world and its KV is freed.

One meshserve ``Client`` (a ZeroMQ connection to the controller) serves every request of this
process; it is opened and closed with the ASGI lifespan.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import aclosing
from pathlib import Path
from typing import Any

from mesh.client import Client
from mesh.errors import MeshError
from mesh.gateway import kserve, openai
from mesh.gateway.errors import http_error, kserve_body, openai_body
from mesh.gateway.http import (
    EventStream,
    HttpError,
    HttpLimits,
    Receive,
    Request,
    Scope,
    Send,
    disconnected,
    parse_json,
    read_body,
    respond,
    respond_json,
)
from mesh.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

OPEN = frozenset({"health", "metrics"})  # routes a token is not needed for
DESCRIBE_TTL_S = 1.0


class ClientGone(Exception):
    """The HTTP client closed its connection before its answer was complete."""


class ApiKeys:
    """The bearer tokens of a file, one a line (``#`` comments), re-read when it changes."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._stamp = 0.0
        self._checked_s = 0.0
        self._tokens: frozenset[bytes] = frozenset()
        self._load()

    def _load(self) -> None:
        lines = self.path.read_text().splitlines()
        self._tokens = frozenset(line.strip().encode() for line in lines
                                 if line.strip() and not line.lstrip().startswith("#"))
        self._stamp = self.path.stat().st_mtime

    def allows(self, authorization: str | None, now_s: float) -> bool:
        if now_s - self._checked_s > 1.0:
            self._checked_s = now_s
            try:
                if self.path.stat().st_mtime != self._stamp:
                    self._load()
            except OSError:
                log.warning("cannot read the API keys file %s; keeping the tokens held",
                            self.path)
        if not authorization or not authorization.startswith("Bearer "):
            return False
        given = authorization[7:].strip().encode()
        # Compared with every token, each in constant time: no early exit tells which one.
        return any([hmac.compare_digest(given, token) for token in self._tokens])


Handler = Callable[..., Awaitable[int]]


class Gateway:
    def __init__(self, client: Client, *, limits: HttpLimits | None = None,
                 request_timeout_s: float = 60.0, api_keys: ApiKeys | None = None,
                 metrics: GatewayMetrics | None = None,
                 on_ready: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self._on_ready = on_ready
        self.limits = limits or HttpLimits()
        self.timeout_s = request_timeout_s
        self.api_keys = api_keys
        self.metrics = metrics or GatewayMetrics()
        self._clock = clock
        self._models: list[dict[str, Any]] = []
        self._models_s = -1e18
        self._describing: asyncio.Future[list[dict[str, Any]]] | None = None

    # -- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = Request.of(scope, receive)
        started = self._clock()
        route = "unknown"
        status = 500
        try:
            route, handler, args = self._route(request)
            if self.api_keys is not None and route.split("_", 1)[0] not in OPEN and \
                    not self.api_keys.allows(request.headers.get("authorization"), started):
                raise HttpError(401, "a valid bearer token is needed (Authorization: Bearer "
                                     "TOKEN)", headers={"WWW-Authenticate": "Bearer"})
            status = await handler(request, send, *args)
        except ClientGone:
            status = 499  # nginx's code for it: nothing was sent
            self.metrics.disconnects.labels(route).inc()
        except HttpError as exc:
            status = exc.status
            await self._answer_error(request, send, exc)
        except MeshError as exc:
            error = http_error(exc)
            status = error.status
            await self._answer_error(request, send, error)
        except Exception as exc:
            log.exception("the gateway failed on %s %s", request.method, request.path[:200])
            status = 500
            await self._answer_error(request, send, HttpError(
                500, f"the gateway failed: {type(exc).__name__}"))
        finally:
            self.metrics.observe(route, status, self._clock() - started)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.client.connect()
                await send({"type": "lifespan.startup.complete"})
                if self._on_ready is not None:
                    self._on_ready()
            elif message["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _answer_error(self, request: Request, send: Send, error: HttpError) -> None:
        body = openai_body(error) if request.path.startswith("/v1") else kserve_body(error)
        try:
            await respond(send, error.status, json.dumps(body).encode(),
                          headers=error.headers)
        except RuntimeError:  # the answer had begun (a stream): it can only be cut short
            log.info("an error after the answer began: %s", error.message)

    # -- routing --------------------------------------------------------------------------

    def _route(self, request: Request) -> tuple[str, Handler, tuple[Any, ...]]:
        parts = [p for p in request.path.split("/") if p]
        method = request.method
        if len(parts) >= 4 and parts[0] == "v2" and parts[1] == "models" and \
                len(parts) >= 5 and parts[3] == "versions":
            parts = parts[:3] + parts[5:]  # one version per model: any version is it
        table: list[tuple[list[str | None], str, str, Handler]] = [
            (["v2"], "GET", "v2_server", self._v2_server),
            (["v2", "health", "live"], "GET", "health_live", self._live),
            (["v2", "health", "ready"], "GET", "health_ready", self._ready),
            (["v2", "models", None], "GET", "v2_metadata", self._v2_metadata),
            (["v2", "models", None, "ready"], "GET", "v2_model_ready", self._v2_model_ready),
            (["v2", "models", None, "infer"], "POST", "v2_infer", self._v2_infer),
            (["v1", "models"], "GET", "v1_models", self._v1_models),
            (["v1", "models", None], "GET", "v1_model", self._v1_model),
            (["v1", "completions"], "POST", "v1_completions", self._completions),
            (["v1", "chat", "completions"], "POST", "v1_chat", self._chat),
            (["metrics"], "GET", "metrics", self._metrics),
            (["healthz"], "GET", "health_live", self._live),
            (["readyz"], "GET", "health_ready", self._ready),
        ]
        for pattern, want, route, handler in table:
            if len(pattern) != len(parts):
                continue
            args = []
            for expected, part in zip(pattern, parts, strict=True):
                if expected is None:
                    args.append(part)
                elif expected != part:
                    break
            else:
                if method != want and not (method == "HEAD" and want == "GET"):
                    raise HttpError(405, f"{request.path[:100]} takes {want}",
                                    headers={"Allow": want})
                return route, handler, tuple(args)
        raise HttpError(404, f"no route {request.path[:100]}")

    # -- the controller's models ------------------------------------------------------------

    async def models(self) -> list[dict[str, Any]]:
        """What the controller serves (its ``describe``), at most DESCRIBE_TTL_S old; one
        call at a time, shared by whoever asks meanwhile."""
        if self._clock() - self._models_s <= DESCRIBE_TTL_S:
            return self._models
        if self._describing is None:
            self._describing = asyncio.ensure_future(self._describe())
        try:
            return await asyncio.shield(self._describing)
        finally:
            if self._describing is not None and self._describing.done():
                self._describing = None

    async def _describe(self) -> list[dict[str, Any]]:
        answer = await self.client.describe(timeout_s=min(5.0, self.timeout_s))
        self._models = list(answer.get("models", []))
        self._models_s = self._clock()
        return self._models

    async def model(self, name: str) -> dict[str, Any]:
        for m in await self.models():
            if m["name"] == name:
                return m
        raise HttpError(404, f"no model named {name[:100]!r}", kind="unknown_model")

    # -- health and metrics -----------------------------------------------------------------

    async def _live(self, request: Request, send: Send) -> int:
        await respond_json(send, 200, {"live": True})
        return 200

    async def _ready(self, request: Request, send: Send) -> int:
        """Ready: the controller answers and every model has a serving world."""
        try:
            models = await self.models()
        except MeshError as exc:
            await respond_json(send, 503, {"ready": False, "error": exc.message[:200]})
            return 503
        ready = all(m.get("ready") for m in models)
        await respond_json(send, 200 if ready else 503, {"ready": ready})
        return 200 if ready else 503

    async def _metrics(self, request: Request, send: Send) -> int:
        body, content_type = self.metrics.render()
        await respond(send, 200, body, content_type=content_type)
        return 200

    # -- KServe v2 --------------------------------------------------------------------------

    async def _v2_server(self, request: Request, send: Send) -> int:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ours = version("meshserve")
        except PackageNotFoundError:
            ours = "unknown"
        await respond_json(send, 200, {"name": "meshserve", "version": ours,
                                       "extensions": ["binary_tensor_data"]})
        return 200

    async def _v2_metadata(self, request: Request, send: Send, name: str) -> int:
        await respond_json(send, 200, kserve.model_metadata(await self.model(name)))
        return 200

    async def _v2_model_ready(self, request: Request, send: Send, name: str) -> int:
        ready = bool((await self.model(name)).get("ready"))
        await respond_json(send, 200 if ready else 503, {"name": name, "ready": ready})
        return 200 if ready else 503

    async def _v2_infer(self, request: Request, send: Send, name: str) -> int:
        body = await read_body(request, self.limits)
        infer = kserve.parse_infer(body, request.headers.get(kserve.HEADER_LENGTH))
        # Not watched for a disconnect: a task per request costs more than the rare request
        # abandoned mid-way wastes (generations belong on /v1, which is watched).
        outputs = await self.client.infer(name, infer.inputs,
                                          timeout_s=infer.timeout_s or self.timeout_s,
                                          params=infer.params or None)
        payload, headers = kserve.encode_outputs(name, infer, outputs)
        binary = kserve.HEADER_LENGTH in headers
        await respond(send, 200, payload, headers=headers,
                      content_type="application/octet-stream" if binary else "application/json")
        return 200

    # -- OpenAI -------------------------------------------------------------------------------

    async def _v1_models(self, request: Request, send: Send) -> int:
        await respond_json(send, 200, openai.model_list(await self.models()))
        return 200

    async def _v1_model(self, request: Request, send: Send, name: str) -> int:
        listed = openai.model_list([await self.model(name)])["data"]
        if not listed:
            raise HttpError(404, f"{name[:100]!r} does not generate text", kind="unknown_model")
        await respond_json(send, 200, listed[0])
        return 200

    async def _completions(self, request: Request, send: Send) -> int:
        return await self._openai(request, send, chat=False)

    async def _chat(self, request: Request, send: Send) -> int:
        return await self._openai(request, send, chat=True)

    async def _openai(self, request: Request, send: Send, *, chat: bool) -> int:
        call = openai.parse(parse_json(await read_body(request, self.limits)), chat=chat)
        completion = openai.Completion(call)
        chunks = self.client.stream(call.model, call.inputs, params=call.params,
                                    timeout_s=self.timeout_s)
        if not call.stream:
            async def whole() -> None:
                async with aclosing(chunks) as stream:
                    async for chunk in stream:
                        completion.take(chunk)

            await self._until_gone(request, whole())
            await respond_json(send, 200, completion.whole())
            return 200
        sse = EventStream(send)

        async def pump() -> None:
            send_event = sse.raw
            async with aclosing(chunks) as stream:
                async for event in openai.events(completion, stream):
                    await send_event(event)
            await sse.event("[DONE]")
            await sse.close()

        self.metrics.streams.inc()
        try:
            await self._until_gone(request, pump())
        except (MeshError, HttpError) as exc:
            if not sse.started:
                raise
            error = exc if isinstance(exc, HttpError) else http_error(exc)
            await sse.event(json.dumps(openai_body(error)))  # what the SDKs read as an error
            await sse.close()
        finally:
            self.metrics.streams.dec()
        return 200

    # -- a client that goes away ------------------------------------------------------------

    async def _until_gone(self, request: Request, work: Coroutine[Any, Any, Any]) -> Any:
        """Run ``work`` (once the body has been read) until it ends or the client closes its
        connection; then cancel it (a stream's cancel goes to the controller) and raise
        ClientGone."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(disconnected(request.receive))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
            watch.cancel()
        if not task.done() or task.cancelled():
            await asyncio.gather(task, return_exceptions=True)
            raise ClientGone()
        return task.result()


def api_keys_from(path: str) -> ApiKeys | None:
    return ApiKeys(path) if path else None

