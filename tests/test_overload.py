"""Overload: a deployment offered several times its capacity refuses at once what it cannot
answer in time (``overloaded`` with a retry-after hint), answers everything exactly once, and
never sends a success after its deadline. Goodput figures are measured by bench/overload.py,
not asserted here."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import numpy as np
import pytest

from mesh.client import Client, backoff_s
from mesh.errors import MeshError, Overloaded
from mesh.testing.ledger import LedgerClient
from tests.conftest import StartCluster

SLOW = """
[[deployments]]
name = "slow"
model = "worker.models.fixed:build"
factory_kwargs = { batch_ms = 10.0 }
max_batch_size = 1
max_batch_delay_ms = 0.0
"""
X = {"x": np.ones((1, 4), np.float32)}


@contextlib.contextmanager
def harness_heap_frozen(pauses: list[float]) -> Iterator[None]:
    """Keep the test process's own collector from stalling the client under test: by this
    point of a full run the pytest process holds a large heap, and a full collection of it
    took 37-187 ms (measured), longer than the slack the deadline check allows. Frozen, as
    production processes freeze theirs (mesh/gc_policy.py), a collection walks only what this
    test allocates. ``pauses`` gets every collection's duration, for the failure message."""
    started = [0.0]

    def watch(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - started[0])

    gc.freeze()
    gc.callbacks.append(watch)
    try:
        yield
    finally:
        gc.callbacks.remove(watch)
        gc.unfreeze()


def test_backoff_follows_the_hint_with_jitter_else_doubles() -> None:
    hinted = [backoff_s(200, 1) for _ in range(200)]
    assert 0.1 <= min(hinted) and max(hinted) < 0.3 and len(set(hinted)) > 100
    assert all(0.025 <= backoff_s(0, 1) < 0.075 for _ in range(50))
    assert all(0.1 <= backoff_s(0, 3) < 0.3 for _ in range(50))
    assert all(backoff_s(0, 30) < 3.0 for _ in range(50))


@pytest.mark.integration
async def test_an_overloaded_deployment_refuses_at_once_and_answers_each_request_once(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(SLOW)
    outcomes: Counter[str] = Counter()
    hints: list[int] = []
    late: list[float] = []
    deadline_s = 0.5

    async def one(client: LedgerClient) -> None:
        t0 = time.perf_counter()
        try:
            await client.infer("slow", X, timeout_s=deadline_s)
            outcomes["ok"] += 1
            if time.perf_counter() - t0 > deadline_s + 0.1:
                late.append(time.perf_counter() - t0)
        except Overloaded as exc:
            outcomes["overloaded"] += 1
            hints.append(exc.retry_after_ms)
        except MeshError as exc:
            outcomes[exc.code] += 1

    pauses: list[float] = []
    with harness_heap_frozen(pauses):
        answers = await offer_overload(client_endpoint=cluster.client, one=one)
    assert outcomes["ok"] > 0 and outcomes["overloaded"] > 0, outcomes
    assert all(h > 0 for h in hints), "an overloaded answer without a retry-after hint"
    assert late == [], (f"successes after their deadline: {late}; this process's longest "
                        f"collector pause {max(pauses, default=0.0) * 1000:.0f} ms")
    assert sum(outcomes.values()) == 1800  # every request answered
    assert max(answers.values()) == 1, "a request answered twice"


async def offer_overload(client_endpoint: str, one: Callable[[LedgerClient], Awaitable[None]]
                         ) -> dict[Any, int]:
    """1600 requests at about 400 a second, then 200 more, a patient one and a retrying one;
    returns how many times each request was answered."""
    async with LedgerClient(client_endpoint) as client:
        # About 400 requests a second for 4 s against a capacity near 100.
        tasks = []
        for _ in range(160):
            tasks += [asyncio.create_task(one(client)) for _ in range(10)]
            await asyncio.sleep(0.025)
        await asyncio.gather(*tasks)
        # A request with a long deadline is admitted behind the same backlog, and a caller
        # that retries on the hint gets through within its deadline.
        patient = [asyncio.create_task(one(client)) for _ in range(200)]
        await asyncio.sleep(0.2)
        out = await client.infer("slow", X, timeout_s=10.0)
        assert out["y"].shape == (1, 4)
        async with Client(client_endpoint) as retrying:
            out = await retrying.infer("slow", X, timeout_s=5.0, retries=50)
            assert out["y"].shape == (1, 4)
        await asyncio.gather(*patient)
        await asyncio.sleep(0.5)
        return dict(client.ledger.answers)
