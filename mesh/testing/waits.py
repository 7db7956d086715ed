"""Waiting for a state: poll until it holds, or fail after a deadline saying what was awaited
(never a fixed sleep standing in for the state).

- ``until(predicate, timeout_s, what)``: a predicate (plain or async) on anything;
  ``until_blocking`` the same where no event loop runs (a thread, a sync fixture).
- ``wait_status(fetch, predicate, timeout_s, what)``: a controller's admin ``status`` until a
  predicate on it holds; the failure quotes an excerpt of the last status seen.
- ``serving(status)``: the usual predicate, every deployment serving.
- ``http_ready(port)``: whether an HTTP server answers 200 on a path (for ``until``).
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mesh.admin_client import admin_call

Status = dict[str, Any]
Fetch = Callable[[], Awaitable[Status]]


class TimedOut(AssertionError):
    """A wait ran past its deadline. An AssertionError, so a test reports it as the check
    that failed; a benchmark stops with it."""


def _timed_out(timeout_s: float, what: str, detail: Callable[[], str] | None) -> TimedOut:
    more = detail() if detail is not None else ""
    return TimedOut(f"timed out after {timeout_s} s waiting for {what}" +
                    (f"\n{more}" if more else ""))


async def until(predicate: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str,
                *, interval_s: float = 0.02, detail: Callable[[], str] | None = None) -> None:
    """Return once ``predicate()`` (awaited, if it returns an awaitable) is true; raise
    ``TimedOut`` naming ``what`` (and ``detail()``, read at that moment) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = predicate()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise _timed_out(timeout_s, what, detail)
        await asyncio.sleep(interval_s)


def until_blocking(predicate: Callable[[], bool], timeout_s: float, what: str, *,
                   interval_s: float = 0.02, detail: Callable[[], str] | None = None) -> None:
    """``until`` for code with no event loop: sleeps between looks."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise _timed_out(timeout_s, what, detail)
        time.sleep(interval_s)


def admin_status(admin: str, *, curve: Any = None, timeout_s: float = 2.0) -> Fetch:
    """A ``fetch`` for ``wait_status``: the admin ``status`` of the controller at ``admin``
    (``curve``: an allowed admin's ``mesh.security.ClientKeys`` when CURVE is on)."""

    async def fetch() -> Status:
        return await admin_call(admin, "status", timeout_s=timeout_s, curve=curve)

    return fetch


async def wait_status(fetch: Fetch, predicate: Callable[[Status], bool], timeout_s: float,
                      what: str, *, interval_s: float = 0.1,
                      exit_code: Callable[[], int | None] | None = None,
                      detail: Callable[[], str] | None = None) -> Status:
    """Poll ``fetch()`` until ``predicate`` holds on the status, and return that status.

    A status that cannot be read yet, or a predicate that raises on it (a deployment not
    listed yet), counts as not yet. ``exit_code``: the controller's process, if this side
    started it; once it has exited nothing will change, so the wait fails at once. The
    failure says what was awaited, the last error, an excerpt of the last status and
    ``detail()`` (a log tail, say)."""
    deadline = time.monotonic() + timeout_s
    last: Status = {}
    error = ""
    while True:
        try:
            last = await fetch()
            if predicate(last):
                return last
            error = ""
        except Exception as exc:  # not up yet, or not the shape the predicate expects yet
            error = f"{type(exc).__name__}: {exc}"
        code = exit_code() if exit_code is not None else None
        if code is not None or time.monotonic() > deadline:
            gone = "" if code is None else f" (the controller exited with code {code})"
            more = detail() if detail is not None else ""
            raise TimedOut(f"timed out after {timeout_s} s waiting for {what}{gone}"
                           + (f"\nlast error: {error}" if error else "")
                           + f"\nlast status: {status_excerpt(last)}"
                           + (f"\n{more}" if more else ""))
        await asyncio.sleep(interval_s)


def serving(status: Status, worlds: int | None = None) -> bool:
    """Every deployment has ``worlds`` worlds serving (none given: as many as it wants)."""
    return all(d["worlds_current"] >= (d["worlds_desired"] if worlds is None else worlds)
               for d in status["deployments"])


def status_excerpt(status: Status, max_chars: int = 2000) -> str:
    """What a failed wait needs to see of a status: each deployment's worlds, queue and
    availability, each world's and worker's state, and the last few events."""
    if not status:
        return "none read"
    parts = []
    for d in status.get("deployments", []):
        parts.append(f"deployment {d.get('name')}: worlds {d.get('worlds_current')}/"
                     f"{d.get('worlds_desired')}, queued {d.get('queued')}, in flight "
                     f"{d.get('in_flight')}" +
                     (f", unavailable: {d['unavailable']}" if d.get("unavailable") else ""))
    worlds = [f"{w.get('id')} {w.get('deployment')} {w.get('state')}"
              for w in status.get("worlds", [])]
    workers = [f"{w.get('id')} {w.get('state')}" for w in status.get("workers", [])]
    parts.append(f"worlds: {', '.join(worlds) or 'none'}")
    parts.append(f"workers: {', '.join(workers) or 'none'}")
    for e in status.get("events", [])[-5:]:
        parts.append(f"event: {e}")
    text = "\n  ".join(parts)
    return text if len(text) <= max_chars else text[:max_chars] + " ..."


async def http_ready(port: int, path: str = "/v2/health/ready", *, tls: bool = False,
                     timeout_s: float = 2.0) -> bool:
    """Whether an HTTP server on loopback ``port`` answers ``GET path`` with 200 (``tls``:
    over TLS, its certificate not checked)."""
    context = None
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                             "connection: close\r\n\r\n".encode())
                return b" 200 " in await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):  # refused, reset, a TLS error: not ready
        return False
