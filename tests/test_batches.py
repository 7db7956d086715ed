"""Batches on the client link (protocol section 3.9), against a live controller.

A raw socket sends batches as a client in another language would: each request in a batch is
handled as if it had come alone (its own answer, its own error), a batch that does not add up
is refused whole, and the answers come back in batches. The Python client batches what one
loop iteration sends, once the controller's pong offers it, and only then.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

from mesh import codec
from mesh.client import Client
from mesh.messages import MAX_BATCH, batch_header, request_header, split_batch
from mesh.testing.waits import until
from tests.conftest import GUARDED_LIMIT as LIMIT


def request(req_id: Any, x: np.ndarray, model: str = "mlp") -> list[bytes]:
    return [bytes(f) for f in codec.encode(request_header("infer", req_id, model, {"x": x},
                                                          5000))]


def batch(*messages: list[bytes]) -> list[bytes]:
    frames = [codec.pack(batch_header([len(m) for m in messages]))]
    for m in messages:
        frames += m
    return frames


async def exchange(endpoint: str, frames: list[Any], answers: int, timeout_s: float = 10.0
                   ) -> tuple[list[tuple[dict[str, Any], list[bytes]]], int]:
    """Send one message on a fresh DEALER; read until ``answers`` answers came (and 0.3 s more
    for extras). Returns each answer's header and frames, and how many messages carried them."""
    context = zmq.asyncio.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    got: list[tuple[dict[str, Any], list[bytes]]] = []
    messages = 0
    try:
        sock.connect(endpoint)
        await sock.send_multipart(frames)
        async with asyncio.timeout(timeout_s):
            while len(got) < answers or await sock.poll(300):
                reply = await sock.recv_multipart()
                messages += 1
                header = msgpack.unpackb(reply[0], raw=False)
                if header["kind"] != "batch":
                    got.append((header, reply))
                    continue
                parts = split_batch(header, reply[1:])
                assert parts is not None, header
                got += [(msgpack.unpackb(part[0], raw=False), part) for part in parts]
        return got, messages
    finally:
        sock.close(0)
        context.term()


@pytest.mark.integration
async def test_a_batch_is_answered_request_by_request_and_in_batches(serving: Any) -> None:
    cluster, failures = serving
    xs = {i: np.full((1, 64), i, np.float32) for i in range(1, 9)}
    too_big = request(100, np.zeros((1, LIMIT // 4 + 1), np.float32))
    frames = batch(*(request(i, x) for i, x in xs.items()),
                   request(101, np.zeros((1, 3), np.float32)),  # the model refuses its shape
                   request(102, xs[1], model="resnet"),
                   too_big,
                   [codec.pack({"v": 1, "kind": "ping", "id": 103})])
    got, messages = await exchange(cluster.client, frames, answers=12)
    by_id = {h["id"]: (h, f) for h, f in got}
    assert sorted(by_id) == [*xs, 100, 101, 102, 103] and len(got) == 12  # each once
    async with Client(cluster.client, batch=False) as client:
        for i, x in xs.items():  # the same answers as requests sent alone
            header, reply = by_id[i]
            assert header["kind"] == "result"
            alone = await client.infer("mlp", {"x": x})
            body = codec.decode(reply)
            # (batched rows may differ from a row alone in the last bits of a float32)
            np.testing.assert_allclose(body["outputs"]["y"], alone["y"], rtol=1e-5, atol=1e-6)
    assert by_id[100][0]["code"] == "payload_too_large"  # the limit holds per request
    assert by_id[101][0]["code"] == "bad_request"
    assert by_id[102][0]["code"] == "unknown_model"
    assert by_id[103][0]["kind"] == "pong"
    assert messages < len(got)  # a client that sends batches is answered in batches
    assert failures == []


BAD_COUNTS = [[1, 1], [2, 1, 1], [0, 2, 1], [1.0, 1, 1], "3", [1] * (MAX_BATCH + 1)]


@pytest.mark.integration
async def test_a_batch_that_does_not_add_up_is_refused_whole_and_batches_do_not_nest(
        serving: Any) -> None:
    cluster, failures = serving
    x = np.zeros((1, 64), np.float32)
    parts = [request(1, x), [codec.pack({"v": 1, "kind": "ping", "id": 2})]]
    for counts in BAD_COUNTS:
        frames = [codec.pack({"v": 1, "kind": "batch", "counts": counts}), *parts[0],
                  *parts[1]]
        got, _ = await exchange(cluster.client, frames, answers=1)
        assert [(h["kind"], h["code"], h["id"]) for h, _ in got] == \
            [("error", "bad_request", None)], counts
        assert "counts" in got[0][0]["message"]
    inner = batch([codec.pack({"v": 1, "kind": "ping", "id": 1})],
                  [codec.pack({"v": 1, "kind": "ping", "id": 2})])
    got, _ = await exchange(cluster.client, batch(inner, [codec.pack(
        {"v": 1, "kind": "ping", "id": 3})]), answers=2)
    assert sorted((h["kind"], h["id"]) for h, _ in got) == [("error", None), ("pong", 3)]
    assert failures == []


@pytest.mark.integration
async def test_the_python_client_batches_once_offered_and_only_when_allowed(
        serving: Any) -> None:
    cluster, failures = serving
    xs = [np.full((1, 64), i / 64, np.float32) for i in range(64)]
    results = {}
    for allowed in (True, False):
        async with Client(cluster.client, batch=allowed) as client:
            # The pong to the ping sent on connecting says whether batches are taken; the
            # controller answers in order, so it has come once a describe is answered.
            await client.describe()
            assert client._batching is allowed
            assert client._pump is not None
            sent = client._pump.sent
            results[allowed] = await asyncio.gather(*(client.infer("mlp", {"x": x})
                                                      for x in xs))
            messages = client._pump.sent - sent
            if allowed:
                assert messages <= 4, messages  # 64 requests from one loop iteration
            else:
                assert messages >= 64
    for batched, alone in zip(results[True], results[False], strict=True):
        np.testing.assert_allclose(batched["y"], alone["y"], rtol=1e-5, atol=1e-6)
    assert failures == []


@pytest.mark.integration
async def test_streams_keep_their_chunks_in_order_beside_batched_short_requests(
        cluster_factory: Any) -> None:
    cluster = await cluster_factory("""
[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
factory_kwargs = { hidden = 128 }

[[deployments]]
name = "tinygpt"
model = "worker.models.tinygpt:build"
max_batch_size = 4
""")
    prompts = ["hello", "batches", "in order", "zeromq"]
    x = np.ones((1, 64), np.float32)

    async def read(client: Client, prompt: str) -> str:
        return "".join([c["text"] async for c in client.stream("tinygpt", {"prompt": prompt},
                                                                max_tokens=24)])

    async def short(client: Client) -> int:
        done = 0
        for _ in range(20):
            outs = await asyncio.gather(*(client.infer("mlp", {"x": x}) for _ in range(16)))
            done += len(outs)
        return done

    async with Client(cluster.client) as client:
        await client.describe()
        assert client._batching
        assert client._pump is not None
        received = client._pump.received
        results = await asyncio.gather(*(read(client, p) for p in prompts), short(client))
        messages = client._pump.received - received
    async with Client(cluster.client, batch=False) as alone:
        reference = [await read(alone, p) for p in prompts]
    assert results[:4] == reference  # each chunk once, in order, to its own stream
    assert all(len(text) == 24 for text in reference)
    assert results[4] == 320
    assert messages < 320 + 4 * 25  # answers and chunks came in batches


async def test_a_frontend_holds_a_batching_clients_answers_and_counts_each_one_dropped(
        ) -> None:
    from controller.frontend import Frontend
    from controller.routers import Routers

    pings = batch(*([codec.pack({"v": 1, "kind": "ping", "id": i})] for i in (1, 2, 3)))
    context = zmq.asyncio.Context()
    for deferred in (True, False):
        held: list[Any] = []
        front = Frontend(context, f"inproc://frontend-{deferred}", max_request_bytes=1 << 20,
                         defer=held.append if deferred else None)
        front.start(Routers.of({}))
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(front.endpoint)
            await sock.send_multipart(pings)
            replies = []
            if deferred:  # held until the loop turn's flush, then one batch
                await until(lambda: bool(held), 5.0, "answers held", interval_s=0.01)  # noqa: B023
                assert not await sock.poll(100)
                held.pop()()
                async with asyncio.timeout(5):
                    reply = await sock.recv_multipart()
                header = msgpack.unpackb(reply[0], raw=False)
                parts = split_batch(header, reply[1:])
                assert parts is not None
                replies = [msgpack.unpackb(p[0], raw=False) for p in parts]
            else:  # no deferral: each answer at once (nothing is left behind)
                async with asyncio.timeout(5):
                    for _ in range(3):
                        reply = await sock.recv_multipart()
                        replies.append(msgpack.unpackb(reply[0], raw=False))
            assert [(r["kind"], r["id"]) for r in replies] == [("pong", 1), ("pong", 2),
                                                              ("pong", 3)]
            if deferred:  # a client gone before its batch goes out: each answer is counted
                await sock.send_multipart(pings)
                await until(lambda: bool(held), 5.0, "answers held", interval_s=0.01)  # noqa: B023
                sock.close(0)
                await asyncio.sleep(0.3)  # the frontend's side of the connection ends
                held.pop()()
                assert front.pump.dropped == 3
        finally:
            sock.close(0)
            front.close()
    context.term()
