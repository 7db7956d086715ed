"""The error taxonomy: one exception class per wire error code.

Errors cross process boundaries as data (a code and a message in an ``error`` header) and are
re-raised on the caller's side as the same typed exception, so client code can write
``except mesh.errors.Overloaded``. Every class says whether retrying the same request later
can succeed (``retryable``).
"""

from __future__ import annotations

from typing import Any, ClassVar


class MeshError(Exception):
    """Base class of every error meshserve reports to a caller."""

    code: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str = "", *, retry_after_ms: int = 0) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        # A hint for retryable errors: when trying again may succeed (0: no hint).
        self.retry_after_ms = retry_after_ms

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class BadRequest(MeshError):
    """The request is malformed: bad frames, wrong dtype or shape, missing inputs."""

    code = "bad_request"


class UnknownModel(MeshError):
    """No deployment has the requested name."""

    code = "unknown_model"


class PayloadTooLarge(MeshError):
    """The request's frames add up to more than the controller's configured limit."""

    code = "payload_too_large"


class UnsupportedVersion(MeshError):
    """The header names a protocol version this controller does not speak."""

    code = "unsupported_version"


class DeadlineExceeded(MeshError):
    """No answer was produced before the request's deadline."""

    code = "deadline_exceeded"
    retryable = True


class Overloaded(MeshError):
    """The deployment's queue is full; back off and retry."""

    code = "overloaded"
    retryable = True


class Unavailable(MeshError):
    """No world of the deployment can take the request right now (none formed, all broken)."""

    code = "unavailable"
    retryable = True


class ControllerLost(Unavailable):
    """The client lost its controller (no answer to its pings, or a pong from a restarted
    controller) while this request was in flight. Raised by the client itself, never sent over
    the wire: the request may or may not have been computed, but it will not be answered.
    Retrying is safe (inference is idempotent) and, with ``retries``, automatic."""

    code = "controller_lost"


class Cancelled(MeshError):
    """The request was cancelled, by its caller or because the server is shutting down."""

    code = "cancelled"
    retryable = True


class StreamInterrupted(MeshError):
    """A stream's world failed and the stream could not be resumed elsewhere."""

    code = "stream_interrupted"
    retryable = True


class ModelError(MeshError):
    """The model raised while computing this request."""

    code = "model_error"


class InternalError(MeshError):
    """A fault inside meshserve itself; the message says what."""

    code = "internal"


class ActorStopped(MeshError):
    """Raised to every pending ask of an actor that stopped (never sent over the wire)."""

    code = "actor_stopped"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


ERROR_CLASSES: dict[str, type[MeshError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        UnknownModel,
        PayloadTooLarge,
        UnsupportedVersion,
        DeadlineExceeded,
        Overloaded,
        Unavailable,
        Cancelled,
        StreamInterrupted,
        ModelError,
        InternalError,
    )
}


def error_from_wire(code: str, message: str, retry_after_ms: Any = 0) -> MeshError:
    """Rebuild the typed exception for a wire error code; unknown codes become InternalError."""
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        return InternalError(f"[{code}] {message}")
    hint = retry_after_ms if type(retry_after_ms) is int and 0 < retry_after_ms < 3_600_000 \
        else 0
    return cls(message, retry_after_ms=hint)


MAX_MESSAGE_CHARS = 512  # an error message's length on the wire, at most


def excerpt(value: Any, limit: int = 40) -> str:
    """A short, escaped rendering of a value from the wire, for an error message: a scalar's
    repr cut to ``limit`` characters, a container only by its type (never walked)."""
    if value is None or isinstance(value, bool | int | float | str | bytes):
        text = repr(value[:limit + 1] if isinstance(value, str | bytes) else value)
    else:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."
