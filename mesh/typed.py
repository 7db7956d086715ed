"""Untrusted maps into typed records, with one library and one error format.

Every control message (worker and admin) and the TOML config are decoded by ``decode``: msgspec
checks each field's type and constraints against the record's annotations (a frozen dataclass)
in compiled code, and a mismatch becomes one short message that names the field by its dotted
path, e.g. ``heartbeat.busy_s: expected `float`, got `str```. msgspec was chosen over pydantic
because it is several times faster on small maps, reads msgpack natively, and validates plain
dataclasses, so the records stay what the rest of the code already uses.

The data path (request headers, ``req``/``res`` frames) is not decoded here: its fields are
checked by hand in mesh/codec.py and mesh/cli/inputs.py, where a request's microseconds
are measured (docs/benchmarks.md).
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

_MISSING = re.compile(r"^Object missing required field `([^`]+)`(?: - at `\$(.*)`)?$")
_AT = re.compile(r"^(.*?)(?: - at `\$(.*)`)?$", re.DOTALL)


class DecodeError(ValueError):
    """A map that does not fit its record; ``str()`` names the field."""


def decode(data: Any, cls: type[T], where: str) -> T:
    """``data`` (unpacked msgpack or TOML) as a ``cls``; ``where`` names it in errors."""
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as exc:
        raise DecodeError(located(str(exc), where, data)) from None


def located(message: str, where: str, data: Any = None) -> str:
    """msgspec's message with the field's dotted name, and the value that did not fit
    (``controller.busy_poll_us: expected `int` <= 100000, got 200000``)."""
    missing = _MISSING.match(message)
    if missing:
        return f"{where}{missing.group(2) or ''}.{missing.group(1)} is required"
    match = _AT.match(message)
    what, path = (match.group(1), match.group(2)) if match else (message, "")
    text = f"{where}{path or ''}: {what[:1].lower()}{what[1:]}"
    found, value = _at(data, path or "")
    if found and isinstance(value, str | int | float | bool) and "got" not in what:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        if shown not in what:
            text += f", got {shown}"
    return text


_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _at(data: Any, path: str) -> tuple[bool, Any]:
    """The value at a msgspec path (``.a.b[2]``) of ``data``, if there is one."""
    for key, index in _STEP.findall(path):
        try:
            data = data[key] if key else data[int(index)]
        except (KeyError, IndexError, TypeError, ValueError):
            return False, None
    return True, data
