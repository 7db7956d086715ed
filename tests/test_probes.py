"""/healthz and /readyz decisions (controller/probes.py), on a real actor and real tasks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from controller.probes import liveness, readiness
from mesh.actor import Actor

pytestmark = pytest.mark.timeout(10)


class Crashy(Actor):
    async def handle(self, message: Any) -> Any:
        return None


async def boom() -> None:
    raise RuntimeError("boom")


def dep(name: str, current: int, desired: int = 1, **why: str) -> dict[str, Any]:
    return {"name": name, "worlds_current": current, "worlds_desired": desired,
            "quarantined": "", "unavailable": "", "last_error": "", **why}


async def test_live_until_an_actor_fails_or_a_loop_ends() -> None:
    actor = Crashy("world-manager")
    await actor.start()
    loop = asyncio.create_task(asyncio.sleep(60))
    try:
        assert liveness([actor], {"tick": loop}, stopping=False) == (
            True, "ok: the controller's loop answers and every part is running")
        ended = asyncio.create_task(asyncio.sleep(0))
        await ended
        ok, why = liveness([actor], {"tick": loop, "sweep": ended}, stopping=False)
        assert not ok and why == "loop sweep ended: None"
        assert liveness([actor], {"sweep": ended}, stopping=True)[0]  # stopping: expected
        actor.spawn(boom(), name="a task of its own")  # one that crashes fails the actor
        await asyncio.wait_for(actor.failed.wait(), 5)
        ok, why = liveness([actor], {"tick": loop}, stopping=False)
        assert not ok and why.startswith("actor world-manager failed: RuntimeError('boom')")
    finally:
        loop.cancel()
        await actor.aclose()


def test_ready_when_every_deployment_serves_by_default() -> None:
    status = {"deployments": [dep("mlp", 2), dep("gpt", 0, unavailable="forming 1 world")]}
    ok, why = readiness(status, "all", stopping=False)
    assert not ok
    assert why == "1 of 2 deployments have no serving world: gpt (forming 1 world)"
    assert readiness(status, "any", stopping=False) == (True, "ok: serving mlp")
    status["deployments"][1]["worlds_current"] = 1
    assert readiness(status, "all", stopping=False) == (
        True, "ok: every deployment serves (mlp, gpt)")


def test_not_ready_while_stopping_or_with_nothing_serving() -> None:
    status = {"deployments": [dep("mlp", 0, quarantined="3 formation failures")]}
    assert readiness(status, "any", stopping=False) == (
        False, "no deployment has a serving world: mlp (3 formation failures)")
    assert readiness(status, "listening", stopping=False) == (True, "ok: listening")
    ok, why = readiness({"deployments": [dep("mlp", 1)]}, "all", stopping=True)
    assert not ok and why.startswith("stopping")
