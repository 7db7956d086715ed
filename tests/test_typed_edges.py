"""Wrong types at the controller's edges: a worker or admin message that does not fit its
record is refused for its sender alone, and status, /metrics and serving carry on.

Before the typed decoding (mesh/typed.py), one heartbeat with ``busy_s = "x"`` broke
``meshctl status`` and ``/metrics`` for as long as that worker stayed registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

from mesh import codec
from mesh.client import Client
from mesh.errors import BadRequest, UnknownModel
from mesh.messages import ADMIN_ARGS, WORKER_MESSAGES
from mesh.testing.cluster import Cluster
from mesh.testing.ports import free_port
from tests.conftest import StartCluster
from tests.test_serving import http_get

pytestmark = pytest.mark.integration

MLP = """
[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
factory_kwargs = { hidden = 32 }
"""

# Values of every msgpack type, and the edges of each: none of them names a real deployment,
# worker or world of the cluster, so a fuzzed admin command that type-checks still changes
# nothing.
WEIRD: list[Any] = [
    None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, -0.0, math.nan, math.inf,
    -math.inf, 1e308, "", "x", "x" * 300, "\x00\xff", "nan", b"", b"\x00" * 20, [], [1, "a"],
    [[[[[]]]]], {}, {"a": 1}, {1: 2}, {"kind": "heartbeat"},
]


def fuzzed_map(rng: random.Random, kind: str, fields: list[str]) -> dict[Any, Any]:
    message: dict[Any, Any] = {"kind": kind}
    for name in rng.sample(fields, k=rng.randint(0, len(fields))):
        message[name] = rng.choice(WEIRD)
    if rng.random() < 0.1:
        message[rng.choice(WEIRD[3:5])] = "a non-string key"
    return message


async def registered_fake_worker(cluster: Cluster, context: zmq.asyncio.Context,
                                 worker_id: str) -> zmq.asyncio.Socket:
    """A DEALER that registers as a worker on the worker port, as a real one would (the
    caller keeps it alive with ``beat``)."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, worker_id.encode())
    sock.connect(cluster.workers_endpoint)
    # pid 0: no process of ours (teardown ends every worker pid that status showed).
    await sock.send(codec.pack({"kind": "register", "worker_id": worker_id, "pid": 0,
                                "host": "127.0.0.1", "device": "cpu"}))
    assert await sock.poll(5000), "no welcome"
    welcome = msgpack.unpackb((await sock.recv_multipart())[-1])
    assert welcome["kind"] == "welcome"
    return sock


async def beat(sock: zmq.asyncio.Socket, stop: asyncio.Event) -> None:
    """Good heartbeats every 200 ms, so Health keeps the fake worker alive."""
    seq = 0
    while not stop.is_set():
        seq += 1
        await sock.send(codec.pack({"kind": "heartbeat", "seq": seq}))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def still_answering(cluster: Cluster, metrics_port: int) -> dict[str, Any]:
    status = await cluster.status(timeout_s=3.0)
    line, body = await http_get(metrics_port, "/metrics")
    assert line.endswith("200 OK"), line
    assert 'meshserve_requests_total{deployment="mlp",outcome="ok"}' in body
    result = cluster.meshctl("status", timeout_s=20.0)
    assert result.returncode == 0, result.stderr
    return status


async def test_heartbeats_with_wrong_types_are_refused_and_status_keeps_answering(
        cluster_factory: StartCluster) -> None:
    port = free_port()
    cluster = await cluster_factory(MLP, controller=f"metrics_port = {port}\nwarm_workers = 0")
    context = zmq.asyncio.Context()
    try:
        fake = await registered_fake_worker(cluster, context, "w-typed")
        stop = asyncio.Event()
        beating = asyncio.create_task(beat(fake, stop))
        good = {"kind": "heartbeat", "seq": 1, "busy_s": 0.5, "requests": 3, "cpu_s": 0.1}
        await fake.send(codec.pack(good))
        bad = [{**good, "busy_s": "x"}, {**good, "seq": -1}, {**good, "cpu_s": math.nan},
               {**good, "requests": 1.5}, {**good, "queued": True}, {**good, "busy_s": math.inf},
               {**good, "stages": [1]}, {"kind": "heartbeat"}, {**good, "busy": "yes"}]
        for message in bad:
            await fake.send(codec.pack(message))
        status = await cluster.wait_for(
            lambda s: s["controller"]["worker_messages_rejected"] >= len(bad), 10.0,
            "the wrong-typed heartbeats to be counted")
        fake_row = next(w for w in status["workers"] if w["id"] == "w-typed")
        assert fake_row["state"] == "idle"  # still registered, its last good figures kept
        await still_answering(cluster, port)
        _, body = await http_get(port, "/metrics")
        assert f"meshserve_worker_messages_rejected_total {len(bad)}" in body
        async with Client(cluster.client) as client:
            out = await client.infer("mlp", {"x": np.ones((1, 64), np.float32)}, timeout_s=10)
            assert out["y"].shape == (1, 10)
        assert "busy_s: expected `float`" in cluster.log_tail(200)  # logged, naming the field
        stop.set()
        await beating
        fake.close(linger=0)
    finally:
        context.destroy(linger=0)


async def test_a_fuzz_of_worker_and_admin_messages_gets_typed_refusals_only(
        cluster_factory: StartCluster) -> None:
    port = free_port()
    cluster = await cluster_factory(MLP, controller=f"metrics_port = {port}\nwarm_workers = 0")
    rng = random.Random(11)
    context = zmq.asyncio.Context()
    try:
        # Worker port: 1,500 maps of every worker-message kind (and some unknown ones) with
        # fields of random types, from a registered stranger.
        fake = await registered_fake_worker(cluster, context, "w-fuzz")
        stop = asyncio.Event()
        beating = asyncio.create_task(beat(fake, stop))
        kinds = {kind: [f for f in cls.__dataclass_fields__] for kind, cls in
                 WORKER_MESSAGES.items() if kind != "register"}
        kinds["nonsense"] = ["a", "b"]
        for i in range(1500):
            kind = rng.choice(sorted(kinds))
            await fake.send(codec.pack(fuzzed_map(rng, kind, kinds[kind])))
            if i % 100 == 0:
                await still_answering(cluster, port)
        # Admin port: 600 commands with arguments of random types; every one gets exactly
        # one reply, ok or a typed error (never "internal").
        admin = context.socket(zmq.DEALER)
        admin.setsockopt(zmq.LINGER, 0)
        admin.connect(cluster.admin)
        codes: dict[str, int] = {}
        for i in range(600):
            command = rng.choice(sorted(ADMIN_ARGS))
            fields = list(ADMIN_ARGS[command].__dataclass_fields__)
            args = {f: rng.choice(WEIRD) for f in rng.sample(fields, k=rng.randint(0,
                                                                               len(fields)))}
            request: dict[Any, Any] = {"kind": "admin", "id": i, "command": command,
                                       "args": args}
            if rng.random() < 0.1:
                request = fuzzed_map(rng, "admin", ["id", "command", "args", "v"])
            await admin.send(codec.pack(request))
            assert await admin.poll(5000), f"no answer to admin request {request!r}"
            reply = msgpack.unpackb((await admin.recv_multipart())[-1], strict_map_key=False)
            assert reply["kind"] == "admin_reply"
            # A refusal is typed: the arguments do not fit, or they name no deployment (the
            # code a request for that name gets too).
            assert reply["ok"] or reply["code"] in (BadRequest.code, UnknownModel.code), reply
            assert len(msgpack.packb(reply)) < 4096 or command == "status"
            key = "ok" if reply["ok"] else reply["code"]
            codes[key] = codes.get(key, 0) + 1
        assert codes.get(BadRequest.code, 0) > 300, codes  # most of them do not fit
        status = await still_answering(cluster, port)
        assert status["controller"]["worker_messages_rejected"] > 500
        assert any(w["id"] == "w-fuzz" for w in status["workers"])
        dep = status["deployments"][0]
        assert dep["worlds_current"] == 1 and dep["worlds_desired"] == 1
        async with Client(cluster.client) as client:
            for _ in range(20):
                out = await client.infer("mlp", {"x": np.ones((1, 64), np.float32)},
                                         timeout_s=10)
                assert out["y"].shape == (1, 10)
        stop.set()
        await beating
        admin.close(linger=0)
        fake.close(linger=0)
    finally:
        context.destroy(linger=0)
