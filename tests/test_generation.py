"""Generative serving end to end, with real processes: many streams decoded together on a
2-stage tinygpt world, each token-identical to its prompt decoded alone (the full-recompute
reference), through a tight KV budget that forces preemptions, a SIGKILLed worker and half the
streams cancelled; a seeded sampled stream identical across a kill."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest

from mesh.testing.cluster import Cluster
from mesh.testing.ledger import LedgerClient
from mesh.testing.processes import alive
from tests.conftest import StartCluster
from worker.models.tinygpt import generate

pytestmark = pytest.mark.integration

TINYGPT = """
[[deployments]]
name = "tinygpt"
model = "worker.models.tinygpt:build"
stages = 2
worlds = {worlds}
max_worlds = 2
{extra}
"""
CONTROLLER = "autoscale = false\nwarm_workers = 2"


def prompts(n: int) -> list[str]:
    return [f"stream {i}: " + "abcdefgh"[i % 8] * (1 + i % 5) for i in range(n)]


async def stream_text(client: LedgerClient, prompt: str, n: int, *, stop_after: int = 0,
                      on_chunk: Any = None, **params: Any) -> tuple[str, dict[str, Any]]:
    """The whole text of a stream (or of its first ``stop_after`` chunks, then abandoned), and
    its last chunk."""
    parts: list[str] = []
    last: dict[str, Any] = {}
    async for chunk in client.stream("tinygpt", {"prompt": prompt}, max_tokens=n,
                                     timeout_s=120, params=params):
        parts.append(chunk["text"])
        last = chunk
        if on_chunk is not None:
            await on_chunk(len(parts))
        if stop_after and len(parts) >= stop_after:
            break
    return "".join(parts), last


async def kill_a_stage_of_the_busiest_world(cluster: Cluster) -> int:
    status = await cluster.status()
    world = max(status["worlds"], key=lambda w: w["in_flight"])
    assert world["in_flight"] >= 1
    pid = next(w["pid"] for w in status["workers"] if w["id"] == world["workers"][1])
    os.kill(pid, signal.SIGKILL)
    return int(pid)


async def test_streams_stay_exact_through_a_kill_and_half_of_them_cancelled(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(TINYGPT.format(worlds=2, extra=""), controller=CONTROLLER)
    n = 48
    seeded = {"temperature": 0.8, "top_k": 30, "seed": 5}
    async with LedgerClient(cluster.client) as client:
        # A seeded sampled stream, uninterrupted: what it must be again across a kill.
        want, _ = await stream_text(client, "roll the dice", n, **seeded)
        killed: list[int] = []

        async def kill_once(chunks: int) -> None:
            if chunks == 10 and not killed:
                killed.append(await kill_a_stage_of_the_busiest_world(cluster))

        got, last = await stream_text(client, "roll the dice", n, on_chunk=kill_once, **seeded)
        assert killed and got == want and not alive(killed[0])
        assert last["finish_reason"] == "length" and last["completion_tokens"] == n
        await cluster.wait_for(lambda s: s["deployments"][0]["worlds_current"] == 2,
                               timeout_s=60, what="two serving worlds again")

        # 32 greedy streams together; half abandoned after 5 chunks; a kill in the middle.
        texts = prompts(32)
        killed.clear()

        async def kill_later(chunks: int) -> None:
            if chunks == 15 and not killed:
                killed.append(await kill_a_stage_of_the_busiest_world(cluster))

        results = await asyncio.gather(*(
            stream_text(client, p, n, stop_after=5 if i % 2 else 0,
                        on_chunk=kill_later if i == 0 else None)
            for i, p in enumerate(texts)))
        assert killed
        dep = (await cluster.status())["deployments"][0]
        assert dep["resent"] >= 1
        assert dep["generation"]["ttft_p99_ms"] > 0 and dep["generation"]["tpot_p50_ms"] > 0
        for i, (p, (text, _)) in enumerate(zip(texts, results, strict=True)):
            reference = generate(p, n)
            assert text == (reference[:5] if i % 2 else reference), p
        # Every abandoned sequence is gone from the worlds, and nothing is left decoding.
        gen = (await cluster.wait_for(
            lambda s: s["deployments"][0]["generation"]["running"] == 0,
            timeout_s=5, what="no sequence left running"))["deployments"][0]["generation"]
        assert gen["kv_used_bytes"] == 0 and gen["waiting"] == 0
    # Each chunk once: the finished streams' chunks, and at most what the abandoned ones had
    # when they were abandoned (a chunk on its way may still arrive and be dropped).
    assert all(count <= n for count in client.ledger.chunks.values())


async def test_a_kv_budget_far_too_small_preempts_and_every_stream_still_finishes_exactly(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(TINYGPT.format(worlds=1, extra="kv_cache_mb = 1"),
                                    controller="autoscale = false")
    n = 40
    texts = prompts(32)
    peak = {"kv": 0, "budget": 0}
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            gen = (await cluster.status())["deployments"][0]["generation"]
            peak["kv"] = max(peak["kv"], gen["kv_used_bytes"])
            peak["budget"] = gen["kv_budget_bytes"]
            await asyncio.sleep(0.1)

    async with LedgerClient(cluster.client) as client:
        watcher = asyncio.create_task(watch())
        try:
            results = await asyncio.gather(*(stream_text(client, p, n) for p in texts))
        finally:
            done.set()
            await watcher
    for p, (text, last) in zip(texts, results, strict=True):
        assert text == generate(p, n), p
        assert last["finish_reason"] == "length"
    gen = (await cluster.status())["deployments"][0]["generation"]
    assert gen["preemptions"] > 0
    assert peak["budget"] == 2 * 1024 * 1024  # 1 MB for each of the two stages
    assert 0 < peak["kv"] <= peak["budget"]
