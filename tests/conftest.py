"""Shared fixtures: real clusters on loopback, ended by PID, with a leak check on teardown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster, reap, start_cluster

StartCluster = Callable[..., Awaitable[Cluster]]


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
