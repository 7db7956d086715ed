"""The Frontend's typed pass for the usual request (controller/plain_request.py) against its
general path: for good headers and hostile ones, hand-picked and generated, both must end the
same way: the same dispatch (id, kind, timeout, frames) or the same answer to the client.

A real Frontend and Router, on a real ROUTER socket (inproc) with a DEALER as the client; the
Router's worker side is the list its ``send_worker`` writes to.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from controller import plain_request
from controller.config import DeploymentConfig
from controller.frontend import Frontend
from controller.router import Router
from controller.routers import Routers
from mesh import codec, dataplane
from mesh.messages import MAX_ID_BYTES, request_header

LIMIT = 1 << 16
X = np.arange(64, dtype=np.float32).reshape(1, 64)


class Rig:
    def __init__(self, context: zmq.Context[Any], name: str) -> None:
        self.to_worker: list[list[Any]] = []
        self.router = Router(
            DeploymentConfig(name="mlp", model="worker.models.mlp:build", max_timeout_ms=60_000,
                             default_timeout_ms=5_000),
            send_client=lambda frames: self.frontend.send(frames),
            send_worker=self._to_worker,
            next_rid=itertools.count(1).__next__, tell=lambda report: None)
        self.router.add_world(1, 1, b"w1", frozenset({b"w1"}))
        self.frontend = Frontend(context, f"inproc://{name}", max_request_bytes=LIMIT)
        # Driven by hand (``outcome`` hands it each message), so never started: its routers
        # are given here instead of to ``start``.
        self.frontend.routers = Routers.of({"mlp": self.router})
        self.client = context.socket(zmq.DEALER)
        self.client.setsockopt(zmq.IDENTITY, b"c1")
        self.client.setsockopt(zmq.LINGER, 0)
        self.client.connect(f"inproc://{name}")
        self.client.send(b"hi")  # the ROUTER learns this peer's identity
        assert self.frontend.pump.sock.recv_multipart() == [b"c1", b"hi"]

    def _to_worker(self, frames: list[Any]) -> bool:
        self.to_worker.append(frames)
        return True

    def outcome(self, frames: list[bytes]) -> tuple[Any, ...]:
        """Hand one message to the Frontend; what came of it."""
        self.frontend._on_message([b"c1", *frames])
        if self.to_worker:
            sent = self.to_worker.pop()
            head = dataplane.unpack(sent[1])
            assert isinstance(head, dataplane.Dispatch)
            p = self.router.pending.pop(head.rid)
            self.router._by_client.pop((p.client, p.client_id))
            self.router.worlds[1].inflight.clear()
            timeout_ms = round((p.deadline_s - p.arrived_s) * 1000)
            return ("dispatched", p.client_id, type(p.client_id), p.kind, timeout_ms,
                    [bytes(f) for f in sent[2:]])
        if self.client.poll(1000):
            answer = self.client.recv_multipart()
            return ("answered", msgpack.unpackb(answer[0], raw=False, strict_map_key=False))
        return ("nothing",)

    def close(self) -> None:
        self.client.close(0)
        self.frontend.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    context: zmq.Context[Any] = zmq.Context()
    made = Rig(context, f"plain-{random.randrange(1 << 30)}")
    try:
        yield made
    finally:
        made.close()
        context.term()


def request(header: Any, *extra: bytes) -> list[bytes]:
    """``header`` with its arrays encoded as the client does, then ``extra`` frames."""
    return [*(bytes(f) for f in codec.encode(header)), *extra]


message = request  # for headers whose tensor references are written out by hand


def good(**changes: Any) -> dict[str, Any]:
    header = request_header("infer", 7, "mlp", {"x": X}, 2000)
    header.update(changes)
    return header


def ref(dtype: str, shape: list[Any], index: Any) -> dict[str, Any]:
    return {codec.TENSOR_KEY: [dtype, shape, index]}


FLOATS = X.tobytes()
TWICE: list[Any] = ["v", 1, "kind", "infer", "id", 5, "model", "mlp", "inputs", {}, "model", "nope"]
GOOD = {
    "infer": request(good()),
    "no timeout": request({k: v for k, v in good().items() if k != "timeout_ms"}),
    "stream": request(good(kind="stream")),
    "float timeout": request(good(timeout_ms=1500.5)),
    "str id": request(good(id="request-1")),
    "str id of 64 four-byte chars": request(good(id="\U0001F600" * 64)),
    "largest id": request(good(id=2**64 - 1)),
    "smallest id": request(good(id=-(2**63))),
    "plain params": request(good(params={"max_tokens": 4, "temperature": 0.5, "stop": None})),
    "empty params": request(good(params={})),
    "two tensors and a scalar": request(good(inputs={"a": X, "n": 3, "b": X[:, :8]})),
    "no inputs": request(good(inputs={})),
}
HOSTILE = {
    "timeout NaN": request(good(timeout_ms=math.nan)),
    "timeout inf": request(good(timeout_ms=math.inf)),
    "timeout zero": request(good(timeout_ms=0)),
    "timeout negative": request(good(timeout_ms=-5)),
    "timeout bool": request(good(timeout_ms=True)),
    "timeout str": request(good(timeout_ms="5")),
    "timeout over the limit": request(good(timeout_ms=60_001)),
    "timeout null": request(good(timeout_ms=None)),
    "version 2": request(good(v=2)),
    "version true": request(good(v=True)),
    "version str": request(good(v="1")),
    "id float": request(good(id=1.0)),
    "id bool": request(good(id=True)),
    "id null": request(good(id=None)),
    "id too long": request(good(id="x" * (MAX_ID_BYTES + 1))),
    "id too long in bytes": request(good(id="\U0001F600" * 65)),
    "kind result": request(good(kind="result")),
    "kind ping": request(good(kind="ping")),
    "kind int": request(good(kind=1)),
    "unknown model": request(good(model="resnet")),
    "model int": request(good(model=3)),
    "inputs a list": message(good(inputs=[ref("float32", [1, 64], 1)]), FLOATS),
    "an input a list": message(good(inputs={"x": [ref("float32", [1, 64], 1)]}), FLOATS),
    "refs out of order": message(good(inputs={"a": ref("float32", [1, 64], 2),
                                              "b": ref("float32", [1, 64], 1)}), FLOATS, FLOATS),
    "ref index 0": message(good(inputs={"x": ref("float32", [1, 64], 0)}), FLOATS),
    "ref index past the frames": message(good(inputs={"x": ref("float32", [1, 64], 2)}), FLOATS),
    "ref index bool": message(good(inputs={"x": ref("float32", [1, 64], True)}), FLOATS),
    "unknown dtype": message(good(inputs={"x": ref("float128", [1, 64], 1)}), FLOATS),
    "negative dim": message(good(inputs={"x": ref("float32", [-1, 64], 1)}), FLOATS),
    "bool dim": message(good(inputs={"x": ref("float32", [True, 64], 1)}), FLOATS),
    "33 dims": message(good(inputs={"x": ref("float32", [1] * 32 + [64], 1)}), FLOATS),
    "short frame": message(good(inputs={"x": ref("float32", [1, 64], 1)}), FLOATS[:-4]),
    "extra frame": request(good(), FLOATS),
    "missing frame": message(good(inputs={"x": ref("float32", [1, 64], 1)})),
    "ref with another key": message(good(inputs={"x": {**ref("float32", [1, 64], 1), "y": 1}}),
                                    FLOATS),
    "ref not a list": message(good(inputs={"x": {codec.TENSOR_KEY: "float32"}}), FLOATS),
    "another header key": request(good(trace="abc")),
    "a ref under another key": message(good(extra=ref("float32", [1, 64], 1)), FLOATS),
    "params null": request(good(params=None)),
    "params a list": request(good(params=[1])),
    "params with a map": request(good(params={"a": {"b": 1}})),
    "params with a ref": message(good(inputs={}, params={"w": ref("float32", [1, 64], 1)}),
                                 FLOATS),
    "header a list": [msgpack.packb([1, 2])],
    "header a batch": [msgpack.packb({"v": 1, "kind": "batch", "counts": [1]}), b"\x80"],
    "garbage": [b"\xc1\xc1\xc1"],
    "too big": request(good(inputs={"x": np.zeros((1, LIMIT // 4 + 1), np.float32)})),
    # Raw msgpack: "model" twice (both keep the last: an unknown model) and a non-str key.
    "model twice": [b"\x86" + b"".join(msgpack.packb(item) for item in TWICE)],
    "int key in inputs": message(good(inputs={1: 2})),
}


def both_ways(rig: Rig, monkeypatch: pytest.MonkeyPatch, frames: list[bytes]
              ) -> tuple[tuple[Any, ...], tuple[Any, ...], bool]:
    """(the general path's outcome, the typed pass's, whether the typed pass took it)."""
    with monkeypatch.context() as m:
        m.setattr(plain_request, "read", lambda *args: None)
        general = rig.outcome(frames)
    took = plain_request.read(codec.frame_buffer(frames[0]), [b"c1", *frames], 2,
                              sum(len(f) for f in frames), LIMIT) is not None
    return general, rig.outcome(frames), took


def test_the_usual_requests_take_the_typed_pass_and_end_as_the_general_path_ends(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, frames in GOOD.items():
        general, typed, took = both_ways(rig, monkeypatch, frames)
        assert took, name
        assert general[0] == "dispatched", (name, general)
        assert typed == general, name


def test_hostile_headers_end_as_the_general_path_ends_them(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, frames in HOSTILE.items():
        general, typed, took = both_ways(rig, monkeypatch, frames)
        assert typed == general, name
        if general[0] != "dispatched":
            assert typed[0] == "answered", (name, typed)
            # Only what depends on the deployment is left to the Frontend after the pass.
            assert not took or name in ("unknown model", "model twice",
                                        "timeout over the limit"), name


def mutated(rng: random.Random) -> list[bytes]:
    """A usual request with a few fields replaced by values a fuzzer would try."""
    values: list[Any] = [
        None, True, False, 0, 1, -1, 2**63, 2**64 - 1, -(2**63), 1.5, math.nan, math.inf,
        "", "mlp", "infer", "stream", "x" * 300, [], [1], {}, {"a": 1}, b"\x00",
        ref("float32", [1, 64], 1), ref("int8", [256], 1), ref("float32", [64], 2)]
    header = good(inputs={"x": ref("float32", [1, 64], 1), "n": 1})
    tensors = [FLOATS]
    for _ in range(rng.randint(1, 3)):
        where = rng.choice(["v", "kind", "id", "model", "timeout_ms", "params", "extra",
                            "inputs", "input", "ref dtype", "ref shape", "ref index", "frames"])
        value = rng.choice(values)
        inputs = header["inputs"] if isinstance(header["inputs"], dict) else {}
        if where == "input":
            header["inputs"] = {**inputs, rng.choice(["x", "n", "y"]): value}
        elif where.startswith("ref "):
            parts = {"ref dtype": 0, "ref shape": 1, "ref index": 2}
            r = ["float32", [1, 64], 1]
            r[parts[where]] = value
            header["inputs"] = {**inputs, "x": {codec.TENSOR_KEY: r}}
        elif where == "frames":
            tensors = rng.choice([[], [FLOATS, FLOATS], [FLOATS[:8]], [b""]])
        else:
            header[where] = value
    return message(header, *tensors)


def test_generated_headers_end_the_same_either_way(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(16)
    took = dispatched = 0
    for i in range(400):
        frames = mutated(rng)
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
        general, typed, fast = both_ways(rig, monkeypatch, frames)
        assert typed == general, (i, header)
        took += fast
        dispatched += general[0] == "dispatched"
    # The generator reaches both sides: some pass both ways, most fail both ways.
    assert 0 < took <= dispatched < 400
