"""Hostile values on the client port, and strangers on the worker port (issue 12, first part).

Client port: each hostile value gets exactly one small typed answer (never the client's value
beyond a short excerpt) while a good client beside it sees no error, and the controller's
memory stays put. Worker port, with security off: a registered stranger cannot break or join
a world it is not in, and a socket that is not a member cannot answer for a world.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

from controller.frontend import CLIENT_SEND_HWM
from mesh import codec, dataplane
from mesh.client import Client
from mesh.messages import request_header, result_header
from tests.conftest import GUARDED_LIMIT as LIMIT
from tests.conftest import StartCluster
from tests.test_bad_input import send_raw_sized
from tests.test_typed_edges import MLP, beat, registered_fake_worker

pytestmark = pytest.mark.integration

SMALL = 4096  # every answer to a hostile request is at most this many bytes


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS")


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def header_with(**fields: Any) -> bytes:
    header = request_header("infer", 9, "mlp", {"x": 1}, 5000)
    header.update(fields)
    return msgpack.packb(header, use_bin_type=True)


async def test_each_hostile_value_gets_one_small_typed_answer(serving: Any) -> None:
    cluster, failures = serving
    rss_start = rss_mb(cluster.pid)
    big = "x" * (LIMIT // 2)
    cases: dict[str, list[Any]] = {
        "timeout NaN": [header_with(timeout_ms=math.nan)],
        "timeout inf": [header_with(timeout_ms=math.inf)],
        "timeout -inf": [header_with(timeout_ms=-math.inf)],
        "nested 1000 in inputs": [header_with(inputs={"x": nested(1000)})],
        "nested 1020 in params": [header_with(params={"p": nested(1020)})],
        "nested 40 maps": [header_with(inputs={"x": {"$tensor": nested(40)}})],
        "big kind": [header_with(kind=big)],
        "big model": [header_with(model=big)],
        "big version": [header_with(v=big)],
        "big id": [header_with(id=big)],
        "big timeout string": [header_with(timeout_ms=big)],
        "big dtype": [header_with(inputs={"x": {"$tensor": [big, [1], 1]}}), b"\0" * 4],
        "long shape": [header_with(inputs={"x": {"$tensor": ["float32", [1] * 5000, 1]}}),
                       b"\0" * 4],
        "big ref": [header_with(inputs={"x": {"$tensor": [1] * 5000}}), b"\0" * 4],
        "not msgpack": [b"\xc1" * 1000],
        "array header": [msgpack.packb([big])],
    }
    for name, frames in cases.items():
        reply, size = await send_raw_sized(cluster, frames)
        assert reply["kind"] == "error", (name, reply)
        assert reply["code"] in ("bad_request", "unsupported_version", "unknown_model"), name
        assert size < SMALL, (name, size)
        if "big" in name:
            assert big[:100] not in reply["message"], name
    assert failures == []
    assert rss_mb(cluster.pid) - rss_start < 100


NEVER_READ = 100_000


def kernel_queued_bytes(server_port: int) -> int:
    """Bytes the kernel holds on the busiest connection to ``server_port`` (loopback, IPv4):
    what the server side has not yet sent plus what the client side has not yet read
    (/proc/net/tcp ``tx_queue`` and ``rx_queue``)."""
    rows = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
        tx, rx = (int(q, 16) for q in fields[4].split(":"))
        rows.append((local, remote, tx, rx))
    local, remote, tx, _ = max((r for r in rows if r[0] == server_port), key=lambda r: r[2])
    rx = sum(r[3] for r in rows if (r[0], r[1]) == (remote, local))
    return tx + rx


async def test_a_client_that_never_reads_cannot_grow_the_controller(serving: Any) -> None:
    cluster, failures = serving
    rss_start = rss_mb(cluster.pid)
    before = (await cluster.status())["controller"]
    context = zmq.asyncio.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)  # it reads nothing, and takes almost nothing in
    sock.setsockopt(zmq.RCVBUF, 4096)
    try:
        sock.connect(cluster.client)
        # 100,000 one-byte requests, each answered bad_request (about 90 bytes): more than
        # the 1,000 answers the controller queues for one connection plus what the kernel's
        # socket buffers hold.
        for i in range(NEVER_READ):
            await sock.send(b"\xc1")
            if i % 10_000 == 0:
                await asyncio.sleep(0)
        status = await cluster.wait_for(
            lambda s: refused(s) - refused({"controller": before}) >= NEVER_READ, 60.0,
            "every request of the client that never reads answered or dropped")
        dropped = status["controller"]["answers_dropped"] - before["answers_dropped"]
        kept = NEVER_READ - dropped
        in_kernel = kernel_queued_bytes(int(cluster.client.rsplit(":", 1)[1]))
        # Every answer kept is there for the client to read, no more and no fewer.
        sizes = []
        while len(sizes) < kept and await sock.poll(5000):
            sizes += [len(f) for f in await sock.recv_multipart()]
        assert len(sizes) == kept and len(set(sizes)) == 1, (len(sizes), kept, set(sizes))
        assert not await sock.poll(100)  # and none of those dropped
        # The cap: of what was kept, the kernel's socket buffers held ``in_kernel`` bytes
        # (a frame of ``sizes[0]`` bytes and its 2-byte header an answer); ZeroMQ held the
        # rest: at most CLIENT_SEND_HWM for the connection, and the 8 KiB batch each end's
        # I/O thread encodes or decodes at a time.
        in_zeromq = kept - in_kernel / (sizes[0] + 2)
        batches = 2 * 8192 / (sizes[0] + 2)
        assert in_zeromq <= CLIENT_SEND_HWM + batches, (kept, in_kernel, in_zeromq)
    finally:
        sock.close(0)
        context.term()
    assert rss_mb(cluster.pid) - rss_start < 100
    assert failures == []


def refused(status: dict[str, Any]) -> int:
    """Requests the controller's frontend refused before any deployment saw them."""
    return sum(status["controller"]["requests_rejected"].values())


async def test_a_registered_stranger_cannot_break_or_join_a_world_it_is_not_in(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(MLP, controller="warm_workers = 0")
    status = await cluster.wait_for(lambda s: s["deployments"][0]["worlds_current"] == 1)
    [world] = status["worlds"]
    context = zmq.asyncio.Context()
    stop = asyncio.Event()
    try:
        evil = await registered_fake_worker(cluster, context, "w-evil")
        beating = asyncio.create_task(beat(evil, stop))
        for message in ({"kind": "world_broken", "world_id": world["id"],
                         "epoch": world["epoch"], "reason": "I say so", "peer_lost": True},
                        {"kind": "join_failed", "world_id": world["id"],
                         "epoch": world["epoch"], "error": "no"},
                        {"kind": "joined", "world_id": world["id"], "epoch": world["epoch"],
                         "entry": "w-evil/x"},
                        {"kind": "left", "world_id": world["id"], "epoch": world["epoch"]}):
            await evil.send(codec.pack(message))
        status = await cluster.wait_for(
            lambda s: s["controller"]["foreign_messages"] >= 4, 10.0,
            "the stranger's messages to be refused")
        assert [(w["id"], w["state"]) for w in status["worlds"]] == [(world["id"], "serving")]
        assert not any(e["event"] == "world_broken" for e in status["events"])
        async with Client(cluster.client) as client:
            out = await client.infer("mlp", {"x": np.ones((1, 64), np.float32)}, timeout_s=10)
            assert out["y"].shape == (1, 10)
        stop.set()
        await beating
        evil.close(0)
    finally:
        stop.set()
        context.destroy(0)


# 5 ms a request: each one stays in flight long enough for the injected answers to hit it.
SLOW = """
[[deployments]]
name = "mlp"
model = "worker.models.fixed:build"
factory_kwargs = { batch_ms = 5.0, features = 64 }
"""


async def test_a_socket_that_is_not_a_member_cannot_answer_for_a_world(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(SLOW, controller="warm_workers = 0")
    status = await cluster.wait_for(lambda s: s["deployments"][0]["worlds_current"] == 1)
    [world] = status["worlds"]
    member = world["ranks"][0]["worker"]
    context = zmq.asyncio.Context()
    injected = 0
    stop = asyncio.Event()

    async def inject(identity: bytes) -> None:
        # Answers for every request id the controller is likely to have in flight (it
        # numbers requests from 1: the client's 300 below), from a socket that guesses a
        # member's old-style runner identity. With the model's 5 ms, a good share of them
        # land on a request in flight; over ids up to 3000 and a 0.1 ms model, few did, and
        # once none at all (the check at the end then failed in CI).
        nonlocal injected
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, identity)
        sock.connect(cluster.workers_endpoint)
        rid = 1
        try:
            while not stop.is_set():
                for _ in range(200):
                    head = dataplane.pack_reply(rid, world["id"], world["epoch"], dataplane.OK)
                    body = codec.encode(result_header(rid, {"y": np.full((1, 10), 777.0,
                                                                          np.float32)}))
                    await sock.send_multipart([head, *[bytes(f) for f in body]])
                    injected += 1
                    rid = rid % 400 + 1
                await asyncio.sleep(0.01)
        finally:
            sock.close(0)

    injectors = [asyncio.create_task(inject(f"{member}/{world['id']}.{world['epoch']}"
                                            .encode())),
                 asyncio.create_task(inject(b"nobody"))]
    try:
        async with Client(cluster.client) as client:
            for _ in range(300):
                out = await client.infer("mlp", {"x": np.ones((1, 64), np.float32)},
                                         timeout_s=10)
                # The model doubles x; an injected answer would read 777.
                assert out["y"].shape == (1, 64) and np.all(out["y"] == 2.0), out["y"]
    finally:
        stop.set()
        for task in injectors:
            with contextlib.suppress(Exception):
                await task
        context.destroy(0)
    status = await cluster.status()
    c = status["controller"]
    assert injected > 1000
    assert c["foreign_replies"] + c["unroutable_replies"] > 0
    assert status["deployments"][0]["errors"] == {} or \
        sum(status["deployments"][0]["errors"].values()) == 0


# -- a seeded fuzz of client frames -------------------------------------------------------

KINDS = ["infer", "stream", "result", "error", "", None, 1, "x" * 50]
VALUES: list[Any] = [None, True, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, math.nan, math.inf,
                     "", "mlp", "x" * 300, b"\x00\xff", [], [1, "a"], {}, {"$tensor": 1},
                     {"$tensor": ["float32", [1, 64], 1]}, {"$tensor": ["float32", [-1], 1]},
                     {"$tensor": ["nope", [1], 9]}, nested(40), {"a": nested(40)}]


def fuzzed_request(rng: random.Random, i: int) -> list[bytes]:
    """A request that may be anything: a mutated valid one mostly, sometimes pure noise."""
    roll = rng.random()
    if roll < 0.1:
        return [rng.randbytes(rng.randint(0, 64))]
    header: dict[Any, Any] = request_header("infer", i, "mlp", {"x": {
        "$tensor": ["float32", [1, 64], 1]}}, 5000)
    frames = [b"\x00" * 256]
    for _ in range(rng.randint(1, 4)):
        key = rng.choice(["v", "kind", "id", "model", "inputs", "timeout_ms", "params",
                          rng.choice(["extra", 7, ""])])
        header[key] = rng.choice(KINDS if key == "kind" else VALUES)
    if header.get("kind") == "cancel":
        header["kind"] = "infer"  # a cancel is answered by nothing: not this test's subject
    if rng.random() < 0.3:
        frames = [rng.randbytes(rng.randint(0, 300)) for _ in range(rng.randint(0, 3))]
    return [msgpack.packb(header, use_bin_type=True), *frames]


async def test_a_fuzz_of_client_frames_gets_exactly_one_answer_each(serving: Any) -> None:
    cluster, failures = serving
    rng = random.Random(12)
    context = zmq.asyncio.Context()
    sent = answered = 0
    codes: dict[str, int] = {}
    deadline = asyncio.get_running_loop().time() + 15.0
    try:
        while asyncio.get_running_loop().time() < deadline:
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(cluster.client)
            batch = [fuzzed_request(rng, sent + i) for i in range(50)]
            for frames in batch:
                await sock.send_multipart(frames)
            sent += len(batch)
            got = 0
            while got < len(batch) and await sock.poll(10_000):
                reply = await sock.recv_multipart()
                header = msgpack.unpackb(reply[0], raw=False)
                assert sum(len(f) for f in reply) < SMALL or header["kind"] == "result"
                key = header["code"] if header["kind"] == "error" else header["kind"]
                codes[key] = codes.get(key, 0) + 1
                got += 1
            assert got == len(batch), f"{len(batch) - got} of a batch got no answer"
            assert not await sock.poll(100), "more answers than requests"
            answered += got
            sock.close(0)
    finally:
        context.destroy(0)
    assert sent >= 500 and answered == sent, (sent, answered)
    assert "internal" not in codes, codes
    assert failures == []


async def test_connections_over_the_cap_are_closed_at_once_and_counted(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(MLP, controller="max_client_connections = 10")
    context = zmq.asyncio.Context()
    socks = []
    try:
        for _ in range(30):  # connect only: strangers that never send anything
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RECONNECT_IVL, 60_000)  # a closed one stays away a while
            sock.connect(cluster.client)
            socks.append(sock)
        await cluster.wait_for(
            lambda s: s["controller"]["client_connections_refused"] >= 20
            and s["controller"]["client_connections"] <= 10, 20.0,
            "connections over the cap to be closed")
        assert "over max_client_connections = 10" in cluster.log_tail(100)
    finally:
        for sock in socks:
            sock.close(0)
        context.destroy(0)
    # Once they are gone, a client gets in and is served.
    await cluster.wait_for(lambda s: s["controller"]["client_connections"] == 0, 20.0,
                           "the strangers' connections to close")
    async with Client(cluster.client) as client:
        out = await client.infer("mlp", {"x": np.ones((1, 64), np.float32)}, timeout_s=10)
        assert out["y"].shape == (1, 10)
