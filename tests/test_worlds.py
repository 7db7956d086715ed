"""Multi-stage worlds on real gloo process groups, workers shared between worlds, streaming."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import numpy as np
import pytest
import torch

from mesh.client import Client
from mesh.errors import UnknownModel
from tests.conftest import StartCluster
from tests.load import Load

TWO_STAGE_MLP = """
[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
stages = 2
micro_batches = 2
max_worlds = 4
"""

TWO_STAGE_TINYGPT = """
[[deployments]]
name = "tinygpt"
model = "worker.models.tinygpt:build"
stages = 2
"""


@pytest.mark.integration
async def test_a_two_stage_mlp_world_computes_the_unsplit_model(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(TWO_STAGE_MLP)
    status = await cluster.status()
    (world,) = status["worlds"]
    assert len(world["workers"]) == 2 and world["ranks"][1]["stage"] == 1
    from worker.models.mlp import build

    model = build()
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((n, 64)).astype(np.float32) for n in (1, 3, 5, 2, 7, 4)]
    async with Client(cluster.client) as client:
        outs = await asyncio.gather(*(client.infer("mlp", {"x": x}, timeout_s=30) for x in xs))
        # 'describe': the model's input is rank 0's, its output the last rank's (stage 1's
        # input, the hidden activations, used to overwrite the deployment's inputs).
        [meta] = (await client.describe("mlp"))["models"]
    assert meta["stages"] == 2 and meta["ready"] and not meta["streaming"]
    assert meta["inputs"] == [{"name": "x", "datatype": "float32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "float32", "shape": [-1, 10]}]
    assert (await cluster.status())["deployments"][0]["inputs"] == {
        "x": {"dtype": "float32", "shape": [1, 64]}}
    shown = await asyncio.to_thread(cluster.meshctl, "describe", "mlp", "--endpoint",
                                    cluster.client)
    assert shown.returncode == 0, shown.stderr
    assert "mlp (ready; 2 stage(s); answers once)" in shown.stdout
    assert "input  x: float32 [-1, 64]" in shown.stdout
    assert "output y: float32 [-1, 10]" in shown.stdout
    with torch.inference_mode():
        for x, out in zip(xs, outs, strict=True):
            torch.testing.assert_close(torch.from_numpy(out["y"]), model(torch.from_numpy(x)))
    # Both stages computed: the stage-1 worker reports batches of its own (in its next
    # heartbeat, within 200 ms).
    def both_computed(s: dict[str, Any]) -> bool:
        by_id = {w["id"]: w for w in s["workers"]}
        return all(by_id[w]["batches"] > 0 for w in world["workers"])

    await cluster.wait_for(both_computed, timeout_s=5.0, what="both stages' batch counters")


@pytest.mark.integration
async def test_a_two_stage_tinygpt_world_streams_exactly_the_reference_tokens(
        cluster_factory: StartCluster) -> None:
    from worker.models.tinygpt import generate

    cluster = await cluster_factory(TWO_STAGE_TINYGPT)
    prompts = ["hello world", "The quick brown fox"]
    async with Client(cluster.client) as client:
        for prompt in prompts:
            chunks = [c async for c in client.stream("tinygpt", {"prompt": prompt},
                                                     max_tokens=24, timeout_s=30)]
            assert all(len(c["text"]) == 1 for c in chunks)  # one character a token
            assert all(set(c) == {"text"} for c in chunks[:-1])
            assert chunks[-1] == {"text": chunks[-1]["text"], "finish_reason": "length",
                                  "prompt_tokens": len(prompt), "completion_tokens": 24}
            assert "".join(c["text"] for c in chunks) == generate(prompt, 24)
        whole = await client.infer("tinygpt", {"prompt": prompts[0]},
                                   params={"max_tokens": 10}, timeout_s=30)
        assert whole == {"text": generate(prompts[0], 10), "finish_reason": "length",
                         "prompt_tokens": len(prompts[0]), "completion_tokens": 10}
        described = await client.describe()
        with pytest.raises(UnknownModel, match="serving \\['tinygpt'\\]"):
            await client.describe("nope")
    assert described["protocol_version"] == 1
    [meta] = described["models"]
    assert meta["name"] == "tinygpt" and meta["streaming"] and meta["stages"] == 2
    assert meta["generative"] and meta["max_context"] == 768 and meta["vocab_size"] == 96
    assert meta["inputs"] == [{"name": "prompt", "datatype": "str", "shape": [],
                               "example": "hello", "max_chars": 512}]
    assert meta["outputs"] == [{"name": "text", "datatype": "str", "shape": []}]
    assert meta["parameters"]["max_tokens"] == {"type": "int", "min": 1, "max": 256,
                                                "default": 16}

    proc = await asyncio.to_thread(cluster.meshctl, "infer", "tinygpt", 'prompt="hello world"',
                                   "--stream", "--max-tokens", "12", "--endpoint",
                                   cluster.client)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip("\n") == generate("hello world", 12)


@pytest.mark.integration
async def test_a_worker_shared_by_two_worlds_serves_both_and_survives_closing_one(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(TWO_STAGE_MLP, controller="warm_workers = 1")
    status = await cluster.wait_for(
        lambda s: any(w["state"] == "idle" for w in s["workers"]), what="a warm idle worker")
    (world_a,) = status["worlds"]
    shared = world_a["workers"][0]
    idle = next(w["id"] for w in status["workers"] if w["state"] == "idle")
    proc = await asyncio.to_thread(cluster.meshctl, "form", "mlp", shared, idle)
    assert proc.returncode == 0, proc.stderr
    status = await cluster.wait_for(
        lambda s: sum(w["state"] == "serving" for w in s["worlds"]) == 2, what="world B")
    world_b = next(w for w in status["worlds"] if w["id"] != world_a["id"])
    assert world_b["workers"] == [shared, idle]
    by_id = {w["id"]: w for w in status["workers"]}
    assert sorted(by_id[shared]["worlds"]) == sorted([world_a["id"], world_b["id"]])
    shared_pid = by_id[shared]["pid"]

    async with Client(cluster.client) as client, Load(client, callers=8, timeout_s=20) as load:
        await asyncio.sleep(2.0)
        status = await cluster.status()
        served = {w["id"]: w["served"] for w in status["worlds"]}
        assert served[world_a["id"]] > 0 and served[world_b["id"]] > 0  # both worlds used

        proc = await asyncio.to_thread(cluster.meshctl, "drain", str(world_b["id"]))
        assert proc.returncode == 0, proc.stderr
        await cluster.wait_for(lambda s: world_b["id"] not in {w["id"] for w in s["worlds"]},
                               what="world B closed")
        before = load.ok
        await asyncio.sleep(1.5)
        assert load.ok > before  # world A kept serving through the shared worker
    assert load.errors == []
    status = await cluster.status()
    by_id = {w["id"]: w for w in status["workers"]}
    assert by_id[shared]["pid"] == shared_pid and by_id[shared]["state"] == "serving"
    assert world_a["id"] in by_id[shared]["worlds"]


@pytest.mark.integration
async def test_a_stopped_peer_gives_a_typed_timeout_while_heartbeats_keep_flowing(
        cluster_factory: StartCluster) -> None:
    # Health would notice the stopped process too; give it no chance here, so what breaks the
    # world is the waiting rank's own typed timeout.
    cluster = await cluster_factory(
        TWO_STAGE_MLP + "world_timeout_ms = 2000\n",
        controller="heartbeat_timeout_ms = 60000\ncontroller_timeout_ms = 60000")
    status = await cluster.status()
    (world,) = status["worlds"]
    stage0, stage1 = world["workers"]
    by_id = {w["id"]: w for w in status["workers"]}
    async with Client(cluster.client) as client:
        await client.infer("mlp", {"x": np.ones((2, 64), np.float32)}, timeout_s=20)

    os.kill(by_id[stage0]["pid"], signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        ages: list[float] = []

        def broken(s: dict[str, Any]) -> bool:
            ages.append(next(w["heartbeat_age_ms"] for w in s["workers"] if w["id"] == stage1))
            return any(e["event"] == "world_broken" and e["world"] == world["id"]
                       for e in s["events"])

        status = await cluster.wait_for(broken, timeout_s=10.0, what="the world to break")
        elapsed = time.monotonic() - stopped_at
        event = next(e for e in status["events"]
                     if e["event"] == "world_broken" and e["world"] == world["id"])
        assert f"reported by {stage1}" in event["reason"]
        assert "WorldTimeout" in event["reason"] or "timed out" in event["reason"].lower()
        # Within the world timeout (2 s) plus the keepalive period that may precede it.
        assert elapsed < 2.0 + 0.5 + 1.5
        # The waiting worker kept heartbeating the whole time (interval 200 ms).
        assert max(ages) < 1000.0, ages
        stage1_state = next(w["state"] for w in status["workers"] if w["id"] == stage1)
        assert stage1_state != "dead"
    finally:
        os.kill(by_id[stage0]["pid"], signal.SIGCONT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_world_on_a_cuda_device_uses_nccl() -> None:
    import datetime

    import torch.distributed as dist

    from worker.comm import Comm

    store = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=10))
    comm = Comm(world_id=1, epoch=1, rank=0, size=1, store=store, device="cuda:0",
                timeout_s=10.0)
    assert comm.backend == "nccl"
    comm.abort()


@pytest.mark.integration
async def test_a_stream_the_caller_abandons_stops_decoding_on_the_worker(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory("""
[[deployments]]
name = "tinygpt"
model = "worker.models.tinygpt:build"
max_batch_size = 1
""")
    prompt = "x" * 200
    async with Client(cluster.client) as client:
        started = time.monotonic()
        full = [c async for c in client.stream("tinygpt", {"prompt": prompt}, max_tokens=256)]
        full_s = time.monotonic() - started
        assert len(full) == 256
        chunks = 0
        async for _ in client.stream("tinygpt", {"prompt": prompt}, max_tokens=256):
            chunks += 1
            if chunks == 5:
                break  # the client sends cancel for the stream
        started = time.monotonic()
        await client.infer("tinygpt", {"prompt": "hi"}, params={"max_tokens": 1})
        follow_up_s = time.monotonic() - started
    # The only world was free again long before the abandoned stream could have finished.
    assert follow_up_s < full_s / 3, (follow_up_s, full_s)
    status = await cluster.status()
    assert status["deployments"][0]["in_flight"] == 0


THREE_ECHO_DEPLOYMENTS = "".join(f"""
[[deployments]]
name = "{name}"
model = "worker.models.echo:build"
stages = 1
worlds = {worlds}
min_worlds = {worlds}
""" for name, worlds in (("a", 1), ("b", 0), ("c", 0)))


@pytest.mark.integration
async def test_a_worker_keeps_its_stages_in_use_and_at_most_max_idle_stages_others(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(
        THREE_ECHO_DEPLOYMENTS,
        controller="warm_workers = 1\npreload_warm = true\nmax_idle_stages = 1\nautoscale = false")

    def spare(s: dict[str, Any]) -> dict[str, Any] | None:
        return next((w for w in s["workers"] if w["state"] == "idle" and w["stages_loaded"]),
                    None)

    status = await cluster.wait_for(lambda s: spare(s) is not None, what="a preloaded spare")
    # Preloading stops at the budget: one stage (deployment a's), not all three.
    assert (spare(status) or {}).get("stages_idle") == 1
    assert (spare(status) or {}).get("stages_loaded") == 1
    # The worker serving a takes worlds of b, then c, beside it (a worker shared by worlds).
    (world_a,) = status["worlds"]
    (shared,) = world_a["workers"]

    def stages(s: dict[str, Any]) -> tuple[int, int]:
        w = next(w for w in s["workers"] if w["id"] == shared)
        return w["stages_loaded"], w["stages_idle"]

    await cluster.wait_for(lambda s: stages(s) == (1, 0), what="a serves with its one stage")
    for name, loaded_while_serving in (("b", (2, 0)), ("c", (3, 1))):
        proc = await asyncio.to_thread(cluster.meshctl, "form", name, shared)
        assert proc.returncode == 0, proc.stderr
        status = await cluster.wait_for(
            lambda s, name=name, want=loaded_while_serving: stages(s) == want and any(
                w["deployment"] == name and w["state"] == "serving" for w in s["worlds"]),
            what=f"{name} serving beside a with stages {loaded_while_serving}")
        async with Client(cluster.client) as client:
            out = await client.infer(name, {"x": np.arange(3, dtype=np.float32)}, timeout_s=10)
        np.testing.assert_array_equal(out["x"], np.arange(3, dtype=np.float32))
        world = next(w for w in status["worlds"] if w["deployment"] == name)
        proc = await asyncio.to_thread(cluster.meshctl, "drain", str(world["id"]))
        assert proc.returncode == 0, proc.stderr
        # Its stage stays as the newest idle one; an older idle stage (b's, when c goes) is
        # dropped. a's stage is in use throughout.
        await cluster.wait_for(lambda s: stages(s) == (2, 1), what=f"{name} released")
    log = cluster.log_path.read_text(errors="replace")
    assert f"[worker {shared}] dropped b stage 0/1" in log, cluster.log_tail()


SLOW_LOADING = """
[[deployments]]
name = "quick"
model = "worker.models.echo:build"

[[deployments]]
name = "slowload"
model = "worker.models.faulty:build"
factory_kwargs = { mode = "ok", load_s = 3.0 }
worlds = 0
min_worlds = 0
"""


@pytest.mark.integration
async def test_a_world_drained_while_its_worker_still_loads_is_never_served_or_kept(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(SLOW_LOADING)
    (serving,) = (await cluster.status())["worlds"]
    (worker,) = serving["workers"]  # it serves quick throughout, so it is never retired
    proc = await asyncio.to_thread(cluster.meshctl, "form", "slowload", worker)
    assert proc.returncode == 0, proc.stderr
    status = await cluster.wait_for(
        lambda s: any(w["deployment"] == "slowload" for w in s["worlds"]),
        what="the slowload world forming")
    (forming,) = [w for w in status["worlds"] if w["deployment"] == "slowload"]
    assert forming["state"] == "forming"
    proc = await asyncio.to_thread(cluster.meshctl, "drain", str(forming["id"]))
    assert proc.returncode == 0, proc.stderr

    def stages(s: dict[str, Any]) -> tuple[int, int]:
        w = next(w for w in s["workers"] if w["id"] == worker)
        return w["stages_loaded"], w["stages_idle"]

    # Once the load finishes, the worker lets the world go: its stage is idle, not pinned by a
    # world nobody will ever use.
    status = await cluster.wait_for(lambda s: stages(s) == (2, 1), timeout_s=30,
                                    what="the late join let go")
    assert [w["id"] for w in status["worlds"]] == [serving["id"]]
    assert "leaving before its join completed" in cluster.log_path.read_text(errors="replace")


IDLE_PIPELINES = """
[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
factory_kwargs = { hidden = 128 }
stages = 2
max_worlds = 3
world_timeout_ms = 2000
"""


@pytest.mark.integration
@pytest.mark.timeout(240)
async def test_idle_pipeline_worlds_and_a_worker_shared_by_three_outlive_fifteen_timeouts(
        cluster_factory: StartCluster) -> None:
    # World timeout 2 s: 31 s without traffic is over 15 timeouts, and longer than every
    # other timeout (heartbeats 1.5 s, the workers' controller watchdog 10 s). Before the fix,
    # an idle world broke about 2.5 s after each timeout ('a send has been pending...'), and
    # every world of a shared worker broke together. (It idled a minute at a 4 s timeout, then
    # 45 s at 3 s: the same 15 timeouts, more of the suite's 15 minutes.)
    cluster = await cluster_factory(IDLE_PIPELINES, controller="warm_workers = 2")
    status = await cluster.wait_for(
        lambda s: sum(w["state"] == "idle" for w in s["workers"]) >= 2, what="2 idle workers")
    (first,) = status["worlds"]
    shared = first["workers"][0]
    for spare in [w["id"] for w in status["workers"] if w["state"] == "idle"][:2]:
        proc = await asyncio.to_thread(cluster.meshctl, "form", "mlp", shared, spare)
        assert proc.returncode == 0, proc.stderr
    status = await cluster.wait_for(
        lambda s: sum(w["state"] == "serving" for w in s["worlds"]) == 3, what="3 worlds")
    worlds = sorted(w["id"] for w in status["worlds"])
    assert all(w["workers"][0] == shared for w in status["worlds"])
    assert all(w["backend"] == "gloo" for w in status["worlds"])
    await asyncio.sleep(31.0)
    status = await cluster.status()
    assert [e for e in status["events"] if e["event"] == "world_broken"] == []
    assert sorted(w["id"] for w in status["worlds"]) == worlds
    assert all(w["state"] == "serving" for w in status["worlds"])
    # And they still serve: concurrent requests spread over all three.
    async with Client(cluster.client) as client:
        xs = [np.ones((1, 64), np.float32) * i for i in range(60)]
        outs = await asyncio.gather(*(client.infer("mlp", {"x": x}, timeout_s=20) for x in xs))
    assert all(o["y"].shape == (1, 10) for o in outs)
    status = await cluster.status()
    assert all(w["served"] > 0 for w in status["worlds"]), status["worlds"]


STREAM_BESIDE = """
[[deployments]]
name = "tinygpt"
model = "worker.models.tinygpt:build"
stages = 2
max_batch_size = 1

[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
factory_kwargs = { hidden = 256 }
worlds = 0
min_worlds = 0
"""


@pytest.mark.integration
async def test_a_long_stream_does_not_hold_up_another_world_on_the_same_worker(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(STREAM_BESIDE)
    status = await cluster.status()
    (gpt,) = status["worlds"]
    stage0 = gpt["workers"][0]
    proc = await asyncio.to_thread(cluster.meshctl, "form", "mlp", stage0)
    assert proc.returncode == 0, proc.stderr
    await cluster.wait_for(lambda s: any(w["deployment"] == "mlp" and w["state"] == "serving"
                                         for w in s["worlds"]), what="mlp beside tinygpt")
    latencies: list[float] = []
    async with Client(cluster.client) as client:
        async def stream() -> int:
            n = 0
            async for _ in client.stream("tinygpt", {"prompt": "x" * 200}, max_tokens=256,
                                         timeout_s=120):
                n += 1
            return n

        streaming = asyncio.create_task(stream())
        await asyncio.sleep(0.5)  # the stream is decoding
        x = np.ones((1, 64), np.float32)
        while not streaming.done():
            started = time.monotonic()
            await client.infer("mlp", {"x": x}, timeout_s=30)
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.01)
        assert await streaming == 256
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    assert len(latencies) >= 20, latencies  # the stream took a while: many answers beside it
    assert p99 < 0.25, (p99, latencies[-5:])
