"""Bad input gets a typed error for its sender alone; everyone else keeps being served.

Each test sends one kind of malformed request on a raw ZeroMQ socket (as a client in another
language might) while a well-behaved client keeps a steady load on the same controller, and
checks both sides: the bad sender gets exactly one error with the right code, and the good
client sees no failure at all.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

from mesh import codec
from mesh.messages import request_header
from mesh.testing.cluster import Cluster
from tests.conftest import GUARDED_LIMIT as LIMIT

pytestmark = pytest.mark.integration


async def send_raw(cluster: Cluster, frames: list[Any], timeout_s: float = 10.0) -> dict[str, Any]:
    """Send frames on a fresh DEALER; return the one answer's header."""
    header, _ = await send_raw_sized(cluster, frames, timeout_s)
    return header


async def send_raw_sized(cluster: Cluster, frames: list[Any], timeout_s: float = 10.0
                         ) -> tuple[dict[str, Any], int]:
    """Send frames on a fresh DEALER; return the one answer's header and its size in bytes."""
    context = zmq.asyncio.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(cluster.client)
        await sock.send_multipart(frames)
        assert await sock.poll(int(timeout_s * 1000)), "no answer to a bad request"
        reply = await sock.recv_multipart()
        assert not await sock.poll(200), "more than one answer to one request"
        header: dict[str, Any] = msgpack.unpackb(reply[0], raw=False)
        return header, sum(len(f) for f in reply)
    finally:
        sock.close(0)
        context.term()


def request_frames(inputs: dict[str, Any], model: str = "mlp", req_id: Any = 1) -> list[Any]:
    return [bytes(f) for f in codec.encode(request_header("infer", req_id, model, inputs, 5000))]


async def test_an_unknown_model_is_answered_unknown_model(serving: Any) -> None:
    cluster, failures = serving
    reply = await send_raw(cluster, request_frames({"x": np.zeros((1, 64), np.float32)},
                                                   model="resnet"))
    assert (reply["kind"], reply["code"], reply["id"]) == ("error", "unknown_model", 1)
    assert "resnet" in reply["message"]
    assert failures == []


async def test_a_wrong_dtype_is_answered_bad_request(serving: Any) -> None:
    cluster, failures = serving
    reply = await send_raw(cluster, request_frames({"x": np.zeros((1, 64), np.int32)}, req_id=2))
    assert (reply["code"], reply["id"]) == ("bad_request", 2)
    assert "float32" in reply["message"]
    assert failures == []


async def test_a_wrong_shape_is_answered_bad_request(serving: Any) -> None:
    cluster, failures = serving
    reply = await send_raw(cluster, request_frames({"x": np.zeros((1, 65), np.float32)}, req_id=3))
    assert (reply["code"], reply["id"]) == ("bad_request", 3)
    assert "shape" in reply["message"]
    assert failures == []


async def test_garbage_tensor_frames_are_answered_bad_request(serving: Any) -> None:
    cluster, failures = serving
    frames = request_frames({"x": np.zeros((1, 64), np.float32)}, req_id=4)
    # The header promises 256 bytes of float32; the frame holds 7 bytes of junk, and an extra
    # frame nobody references follows.
    reply = await send_raw(cluster, [frames[0], b"\xde\xad\xbe\xef\x00\x01\x02", b"junk"])
    assert (reply["code"], reply["id"]) == ("bad_request", 4)
    reply = await send_raw(cluster, [frames[0], b"\x00" * 7])
    assert (reply["code"], reply["id"]) == ("bad_request", 4)
    assert "bytes" in reply["message"]
    assert failures == []


async def test_a_header_that_is_not_msgpack_is_answered_bad_request(serving: Any) -> None:
    cluster, failures = serving
    reply = await send_raw(cluster, [b"\xc1\xc1 this is not msgpack", b"x"])
    assert (reply["kind"], reply["code"], reply["id"]) == ("error", "bad_request", None)
    reply = await send_raw(cluster, [msgpack.packb([1, 2, 3])])  # msgpack, but not a map
    assert reply["code"] == "bad_request"
    reply = await send_raw(cluster, [msgpack.packb({"v": 99, "kind": "infer", "id": 5})])
    assert (reply["code"], reply["id"]) == ("unsupported_version", 5)
    assert failures == []


async def test_a_string_id_over_256_bytes_is_answered_bad_request(serving: Any) -> None:
    # Ids travel with their request through every pipeline stage, in a bounded header.
    cluster, failures = serving
    x = {"x": np.zeros((1, 64), np.float32)}
    long_id = "é" * 129  # 258 bytes in UTF-8, 129 characters
    reply = await send_raw(cluster, request_frames(x, req_id=long_id))
    assert (reply["code"], reply["id"]) == ("bad_request", long_id)
    assert "256" in reply["message"]
    reply = await send_raw(cluster, request_frames(x, req_id="a" * 256))
    assert (reply["kind"], reply["id"]) == ("result", "a" * 256)
    assert failures == []


async def test_a_payload_over_the_configured_limit_is_answered_payload_too_large(
        serving: Any) -> None:
    cluster, failures = serving
    big = np.zeros((LIMIT // 256 + 1, 64), dtype=np.float32)  # just over LIMIT bytes
    reply = await send_raw(cluster, request_frames({"x": big}, req_id=6))
    assert (reply["code"], reply["id"]) == ("payload_too_large", 6)
    assert str(LIMIT) in reply["message"]
    # Just under the limit is served.
    ok = np.zeros(((LIMIT - 1024) // 256, 64), dtype=np.float32)
    reply = await send_raw(cluster, request_frames({"x": ok}, req_id=7))
    assert reply["kind"] == "result"
    assert failures == []
