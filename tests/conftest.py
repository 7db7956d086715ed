"""Shared fixtures: real clusters on loopback, ended by PID, with a leak check on teardown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.client import Client
from mesh.errors import MeshError
from mesh.testing.cluster import Cluster
from tests.cluster import reap, start_cluster
from tests.gloo_peer import Peer
from tests.process_guard import (  # noqa: F401 (hooks: a test that starts a process is marked)
    pytest_runtest_makereport,
    pytest_runtest_protocol,
)

StartCluster = Callable[..., Awaitable[Cluster]]

# The cluster of ``serving``: an mlp with a small request limit, for bad-input tests.
GUARDED_LIMIT = 65536
GUARDED_MLP = """
[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
factory_kwargs = { hidden = 128 }
"""


@pytest.fixture
async def cluster_factory(tmp_path: Path) -> AsyncIterator[StartCluster]:
    """Start clusters with ``await cluster_factory(deployments_toml, controller=...)``.

    On teardown every controller is stopped and every worker process is ended by its PID; a
    worker that outlived its controller's shutdown fails the test.
    """
    started: list[Cluster] = []

    async def start(deployments: str, **kwargs: Any) -> Cluster:
        cluster = await start_cluster(tmp_path, deployments, **kwargs)
        started.append(cluster)
        return cluster

    yield start
    leaks = {c.pid: reap(c) for c in started}
    leaked = {pid: pids for pid, pids in leaks.items() if pids}
    assert not leaked, f"worker processes outlived their controller: {leaked}"


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    """Start rank 1 of a gloo pair in its own process: ``peers("echo")`` (tests/gloo_peer.py);
    this process holds rank 0 as ``peer.comm``. Every peer is killed by its PID on teardown."""
    started: list[Peer] = []

    def start(*scenario: str, **kwargs: Any) -> Peer:
        peer = Peer(*scenario, **kwargs)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.close()


@pytest.fixture
async def serving(cluster_factory: StartCluster) -> AsyncIterator[tuple[Cluster, list[Any]]]:
    """A cluster plus a good client under steady load; yields (cluster, good-client failures)."""
    cluster = await cluster_factory(GUARDED_MLP, controller=f"max_request_bytes = {GUARDED_LIMIT}")
    failures: list[Any] = []
    answered = 0
    stop = asyncio.Event()
    x = np.ones((2, 64), dtype=np.float32)

    async def good_caller(client: Client) -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                out = await client.infer("mlp", {"x": x}, timeout_s=10)
                assert out["y"].shape == (2, 10)
                answered += 1
            except (MeshError, AssertionError) as exc:
                failures.append(exc)

    async with Client(cluster.client) as client:
        tasks = [asyncio.create_task(good_caller(client)) for _ in range(4)]
        await asyncio.sleep(0.2)
        before = answered
        yield cluster, failures
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*tasks)
    assert answered > before, "the good client stopped being served"
