"""Liveness and readiness, as an orchestrator's probes ask for them (``/healthz``,
``/readyz`` on the metrics port). Pure functions of what the controller shows; the HTTP side
is controller/metrics.py.

- **Live**: the controller's loop answers (the probe being served proves it), and none of the
  parts that keep it working has died: the WorldManager, Health and Admin actors, and the
  loops that tick them. A dead one is never restarted in place; the process must be.
- **Ready**: it can serve. ``readiness = "all"`` (the default): every deployment has a
  serving world; ``"any"``: at least one has; ``"listening"``: as soon as the ports are
  open. Never while it is stopping (draining).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

READINESS_RULES = ("all", "any", "listening")


class _Part(Protocol):
    name: str
    failed: asyncio.Event
    failure: BaseException | None


def liveness(actors: Iterable[_Part], loops: Mapping[str, asyncio.Task[Any]],
             stopping: bool) -> tuple[bool, str]:
    """(live, why): not live once an actor failed or a loop ended while not stopping."""
    for actor in actors:
        if actor.failed.is_set():
            return False, f"actor {actor.name} failed: {actor.failure!r}"
    if not stopping:
        for name, task in sorted(loops.items()):
            if task.done():
                why = "cancelled" if task.cancelled() else repr(task.exception())
                return False, f"loop {name} ended: {why}"
    return True, "ok: the controller's loop answers and every part is running"


def readiness(status: Mapping[str, Any], rule: str, stopping: bool) -> tuple[bool, str]:
    """(ready, why) from a status snapshot (controller/status.py)."""
    if stopping:
        return False, "stopping: draining, no new requests are accepted"
    if rule == "listening":
        return True, "ok: listening"
    deps = status["deployments"]
    down = [d for d in deps if d["worlds_current"] < 1]
    serving = [d["name"] for d in deps if d["worlds_current"] >= 1]
    if rule == "any":
        if serving or not deps:
            return True, f"ok: serving {', '.join(serving) or 'nothing (no deployments)'}"
        return False, "no deployment has a serving world: " + _why(down)
    if down:
        return False, f"{len(down)} of {len(deps)} deployments have no serving world: " + \
            _why(down)
    return True, f"ok: every deployment serves ({', '.join(serving) or 'none configured'})"


def _why(deps: list[Mapping[str, Any]]) -> str:
    parts = []
    for d in deps[:10]:
        reason = d.get("quarantined") or d.get("unavailable") or d.get("last_error") or \
            f"{d['worlds_current']} of {d['worlds_desired']} worlds"
        parts.append(f"{d['name']} ({reason})")
    return "; ".join(parts) + (f"; and {len(deps) - 10} more" if len(deps) > 10 else "")
