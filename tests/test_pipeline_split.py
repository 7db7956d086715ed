"""Issue 30 end to end: a ResNet-18 in an ``nn.Sequential``, served in two stages by real
workers, is cut by the measured time of its children, and under a closed loop the busier stage
worker is busy at most 1.5 times as long as the other (their ``busy_s`` counters in status, as
the issue measured them). Cut by parameter count, the same world kept stage 0 busy over a
hundred times longer than stage 1; the second test shows that the same measurement tells the
two cuts apart.

On a shared two-core host a burst of other work can stretch one stage's busy time for a
while, so the busy times are compared over several consecutive windows of traffic, each long
enough for both stages to have computed for seconds, and the median window decides."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import numpy as np
import pytest
import torch

from mesh.client import Client
from mesh.errors import MeshError
from mesh.testing.cluster import Cluster
from mesh.testing.configs import deployment
from tests.conftest import StartCluster
from worker.models.resnet import build
from worker.stages import split_points_for

pytestmark = pytest.mark.integration

WIDTH, IMAGE, ROWS = 64, 64, 8
CALLERS = 4
# Requests of ROWS images, two micro-batches of at most max_batch_size / 2 = ROWS rows: every
# micro-batch has the rows the children were measured on.
RESNET = deployment("resnet", "worker.models.resnet:build",
                    factory_kwargs={"width": WIDTH, "image": IMAGE}, stages=2, worlds=1,
                    min_worlds=1, max_worlds=1, micro_batches=2, max_batch_size=2 * ROWS,
                    default_timeout_ms=60000)
# The claim of issue 30. The cut by measured cost gives about 1.1 (docs/benchmarks.md), the
# cut by weight over 100.
MAX_RATIO = 1.5
WINDOWS = 3  # the median of three windows: one disturbed window cannot decide
WINDOW_BUSY_S = 2.5  # a window lasts until the two stages were busy this long together
WINDOWS_DEADLINE_S = 25.0  # for all the windows (about 1.5 s each on an idle two-core host)


def stage_busy_s(status: dict[str, Any]) -> list[float]:
    (world,) = status["worlds"]
    by_id = {w["id"]: w for w in status["workers"]}
    return [by_id[wid]["busy_s"] for wid in world["workers"]]


async def busy_windows(cluster: Cluster, x: np.ndarray, windows: int) -> list[list[float]]:
    """Each stage's busy seconds over ``windows`` consecutive windows of a closed loop of
    CALLERS callers (after two seconds of warm-up), each window until the stages were busy
    WINDOW_BUSY_S together."""
    stop = asyncio.Event()
    failures: list[BaseException] = []

    async def caller(client: Client) -> None:
        while not stop.is_set():
            try:
                out = await client.infer("resnet", {"x": x}, timeout_s=60)
            except MeshError as exc:
                failures.append(exc)
                return
            assert out["y"].shape == (ROWS, 10)

    found: list[list[float]] = []
    async with Client(cluster.client) as client:
        callers = [asyncio.create_task(caller(client)) for _ in range(CALLERS)]
        try:
            await asyncio.sleep(2.0)  # warm: both stages computing
            before = stage_busy_s(await cluster.status())
            deadline = time.monotonic() + WINDOWS_DEADLINE_S
            while len(found) < windows and time.monotonic() < deadline and not failures:
                await asyncio.sleep(0.25)
                now = stage_busy_s(await cluster.status())
                busy = [b - a for a, b in zip(before, now, strict=True)]
                if sum(busy) >= WINDOW_BUSY_S:
                    found.append(busy)
                    before = now
        finally:
            stop.set()
            await asyncio.gather(*callers)
    assert not failures, failures
    assert len(found) == windows, \
        f"only {len(found)} of {windows} windows of work in {WINDOWS_DEADLINE_S} s: {found}"
    return found


def ratio(busy: list[float]) -> float:
    """The busier stage's busy time over the other's."""
    return max(busy) / max(min(busy), 1e-9)


@pytest.mark.timeout(90)
async def test_a_resnet_in_two_stages_keeps_the_busier_stage_within_1_5x_of_the_other(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(RESNET, controller="worker_threads = 1")
    status = await cluster.status()
    [resnet] = status["deployments"]
    split = resnet["split"]
    assert split["basis"] == "measured" and split["rows"] == ROWS, split
    first, second = split["stages"]
    assert first["children"][0] == 0 and second["children"][1] == 10
    assert second["children"][0] == first["children"][1] + 1
    by_weight = split_points_for(build(width=WIDTH, image=IMAGE), 2)
    assert second["children"][0] != by_weight[0], split  # not the cut by weight: 0-7 | 8-10

    x = np.random.default_rng(0).standard_normal((ROWS, 3, IMAGE, IMAGE)).astype(np.float32)
    async with Client(cluster.client) as client:
        [meta] = (await client.describe("resnet"))["models"]
        assert meta["split"] == split  # what a client's describe shows too
        with torch.inference_mode():
            expected = build(width=WIDTH, image=IMAGE)(torch.from_numpy(x)).numpy()
        out = await client.infer("resnet", {"x": x}, timeout_s=60)
        np.testing.assert_allclose(out["y"], expected, rtol=1e-4, atol=1e-4)

    windows = await busy_windows(cluster, x, WINDOWS)
    ratios = [ratio(busy) for busy in windows]
    assert statistics.median(ratios) <= MAX_RATIO, \
        f"stage busy_s per window {windows} (ratios {ratios}) with the cut {split}"


@pytest.mark.timeout(90)
async def test_the_cut_by_parameter_count_fails_the_same_check(
        cluster_factory: StartCluster) -> None:
    """The measurement above tells an uneven cut: the cut by weight, configured, keeps stage 0
    busy far longer than stage 1 (one window is enough for a ratio this large)."""
    by_weight = split_points_for(build(width=WIDTH, image=IMAGE), 2)
    cluster = await cluster_factory(RESNET + f"split_points = {by_weight}\n",
                                    controller="worker_threads = 1")
    [resnet] = (await cluster.status())["deployments"]
    assert resnet["split"]["basis"] == "config", resnet["split"]
    x = np.random.default_rng(0).standard_normal((ROWS, 3, IMAGE, IMAGE)).astype(np.float32)
    [busy] = await busy_windows(cluster, x, 1)
    assert busy[0] > 10 * busy[1], f"stage busy_s {busy} with the cut {by_weight}"
