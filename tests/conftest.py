"""Shared fixtures: real clusters on loopback, ended by PID, with a leak check on teardown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster, reap, start_cluster
from tests.gloo_peer import Peer

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
