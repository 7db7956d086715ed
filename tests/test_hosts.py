"""meshserve across hosts, simulated with network namespaces (mesh/testing/hosts.py).

The controller runs on host ``ctl`` (10.77.0.1), workers on hosts ``a`` and ``b``, each
joining with ``meshctl worker --controller tcp://10.77.0.1:5557 --advertise-host ADDR``. The
test process reaches the controller's client and admin ports through ``ipc://`` sockets in a
temporary folder (files cross network namespaces), so it adds nothing to its own namespace.
Skipped, with the reason, where namespaces cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.testing import hosts as netns
from mesh.testing.configs import deployment
from mesh.testing.hosts import Site
from mesh.testing.ledger import LedgerClient
from tests.load import Load

WHY_NOT = netns.unavailable()
pytestmark = [pytest.mark.integration, pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT or "-"),
              pytest.mark.timeout(150)]

@pytest.fixture
def folder() -> Iterator[Path]:
    # ipc:// paths are limited to about 100 bytes: a short folder of our own.
    with tempfile.TemporaryDirectory(prefix="mh") as path:
        yield Path(path)


def serving(status: dict[str, Any], deployment: str, n: int) -> bool:
    return sum(w["state"] == "serving" and w["deployment"] == deployment
               for w in status["worlds"]) >= n


def addresses(status: dict[str, Any], world: dict[str, Any]) -> list[str]:
    where = {w["id"]: w["address"] for w in status["workers"]}
    return [where[w] for w in world["workers"]]


X = np.ones((1, 64), np.float32)

MLP = deployment("mlp", "worker.models.mlp:build", factory_kwargs={"hidden": 64}, worlds=2)

TINYGPT_2_STAGES = """
[[deployments]]
name = "tinygpt"
model = "worker.models.tinygpt:build"
stages = 2
worlds = 1
max_batch_size = 1
"""


async def test_worlds_on_two_hosts_serve_and_a_restarted_controller_adopts_both_hosts(
        folder: Path) -> None:
    with netns.Hosts(["ctl", "a", "b"]) as hosts:
        site = Site(hosts, folder, MLP)
        site.worker("a", "a0")
        site.worker("b", "b0")
        status = await site.cluster.wait_for(lambda s: serving(s, "mlp", 2), timeout_s=90,
                                             what="2 mlp worlds")
        assert sorted(w["address"] for w in status["workers"]) == [hosts.address("a"),
                                                                  hosts.address("b")]
        assert sorted(a for w in status["worlds"] for a in addresses(status, w)) == \
            [hosts.address("a"), hosts.address("b")]  # one world on each host
        pids = {w["id"]: w["pid"] for w in status["workers"]}
        async with LedgerClient(site.cluster.client) as client:
            async with Load(client, callers=4, timeout_s=20.0) as load:
                await asyncio.sleep(1.0)
                assert load.ok > 0 and not load.errors
                # The controller is killed and restarted at once (a supervisor's restart).
                killed = time.monotonic()
                site.restart_controller()
                after = await site.cluster.wait_for(
                    lambda s: serving(s, "mlp", 2), timeout_s=30, interval_s=0.05,
                    what="serving again after the restart")
                back_s = time.monotonic() - killed
                ok = load.ok
                while load.ok == ok:
                    assert time.monotonic() - killed < 10, "the client was not served again"
                    await asyncio.sleep(0.02)
                answered_s = time.monotonic() - killed
                await asyncio.sleep(0.5)
            # Only the requests in flight at the kill failed, each with ControllerLost.
            assert max(client.ledger.answers.values()) == 1
            assert all(type(e).__name__ == "ControllerLost" for e in load.errors)
        assert {w["id"]: w["pid"] for w in after["workers"]} == pids  # adopted, not restarted
        print(f"serving again {back_s:.2f}s after the controller's kill and restart; the "
              f"client answered after {answered_s:.2f}s; {len(load.errors)} lost in flight")


async def test_a_two_stage_world_with_its_ranks_on_two_hosts_streams_over_the_link(
        folder: Path) -> None:
    from worker.models.tinygpt import generate

    with netns.Hosts(["ctl", "a", "b"]) as hosts:
        site = Site(hosts, folder, TINYGPT_2_STAGES)
        site.worker("a", "a0")
        site.worker("b", "b0")  # two workers, two stages: the world must span the hosts
        status = await site.cluster.wait_for(lambda s: serving(s, "tinygpt", 1), timeout_s=90,
                                             what="a 2-stage world across hosts")
        gpt = next(w for w in status["worlds"] if w["deployment"] == "tinygpt")
        assert sorted(addresses(status, gpt)) == [hosts.address("a"), hosts.address("b")]
        assert gpt["backend"] == "gloo"
        async with LedgerClient(site.cluster.client) as client:
            text = "".join([c["text"] async for c in client.stream(
                "tinygpt", {"prompt": "two hosts"}, max_tokens=64, timeout_s=30)])
        assert text == generate("two hosts", 64)
        assert sum(client.ledger.chunks.values()) == 64


async def test_a_partitioned_host_is_routed_around_and_rejoins_as_the_same_workers(
        folder: Path) -> None:
    with netns.Hosts(["ctl", "a", "b"]) as hosts:
        site = Site(hosts, folder, MLP)
        site.worker("a", "a0")
        site.worker("b", "b0")
        status = await site.cluster.wait_for(lambda s: serving(s, "mlp", 2), timeout_s=90,
                                             what="2 mlp worlds")
        pids = {w["id"]: w["pid"] for w in status["workers"]}
        assert set(pids) == {"a0", "b0"}

        def a0(s: dict[str, Any]) -> dict[str, Any]:
            return next(w for w in s["workers"] if w["id"] == "a0")

        async with LedgerClient(site.cluster.client) as client:
            async with Load(client, callers=4, timeout_s=20.0) as load:
                await asyncio.sleep(1.0)
                cut = time.monotonic()
                hosts.cut("a")
                await site.cluster.wait_for(lambda s: a0(s)["state"] == "dead", timeout_s=15,
                                            interval_s=0.05, what="host a's worker dead")
                detect_s = time.monotonic() - cut
                # Served by host b alone meanwhile.
                ok = load.ok
                await asyncio.sleep(4.0)  # past the workers' 3 s controller timeout too
                assert load.ok > ok, "nothing served while host a was cut off"
                hosts.heal("a")
                healed = time.monotonic()
                after = await site.cluster.wait_for(
                    lambda s: a0(s)["state"] == "serving" and serving(s, "mlp", 2),
                    timeout_s=30, interval_s=0.1, what="host a's worker serving again")
                rejoin_s = time.monotonic() - healed
                await asyncio.sleep(1.0)
        # Nothing lost, nothing answered twice: requests on host a were re-sent to host b,
        # and what host a's worker still sent after the heal was fenced.
        assert load.errors == []
        load.assert_exactly_once()
        assert {w["id"]: w["pid"] for w in after["workers"]} == pids  # the same processes
        print(f"host a declared dead {detect_s:.2f}s after the cut; serving again "
              f"{rejoin_s:.2f}s after the heal; {load.ok} requests, 0 lost")
