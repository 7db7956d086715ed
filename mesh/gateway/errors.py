"""A meshserve error (mesh.errors) as HTTP: the status each code means, ``Retry-After`` for an
overload, and the body each convention expects (OpenAI's ``{"error": {...}}`` on ``/v1``,
KServe's ``{"error": "..."}`` on ``/v2``). Messages are meshserve's, which never echo large
values; they are cut at ``MAX_MESSAGE_CHARS`` all the same."""

from __future__ import annotations

import math
from typing import Any

from mesh.errors import MAX_MESSAGE_CHARS, MeshError
from mesh.gateway.http import HttpError

STATUS = {
    "bad_request": 400,
    "payload_too_large": 413,
    "unsupported_version": 400,
    "unknown_model": 404,
    "overloaded": 429,
    "deadline_exceeded": 504,
    "unavailable": 503,
    "controller_lost": 503,
    "stream_interrupted": 503,
    "cancelled": 503,
    "model_error": 500,
    "internal": 500,
}

# OpenAI's error types, by status.
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 408: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error",
                504: "timeout", 500: "server_error"}


def http_error(exc: MeshError) -> HttpError:
    status = STATUS.get(exc.code, 500)
    headers = {}
    if status == 429 or exc.retry_after_ms:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_ms / 1000.0)))
    return HttpError(status, _short(exc.message), headers=headers, kind=exc.code)


def _short(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "..."


def openai_body(error: HttpError) -> dict[str, Any]:
    return {"error": {"message": _short(error.message),
                      "type": OPENAI_TYPES.get(error.status, "server_error"),
                      "param": None, "code": error.kind or None}}


def kserve_body(error: HttpError) -> dict[str, Any]:
    return {"error": _short(error.message)}
