"""docs/protocol-vectors/vectors.json holds: offline (each encodable request is the msgpack of
its value, each recorded answer decodes to its fields, the file is what the generator makes),
and live (a controller answers every request exactly as recorded); and the Python client
builds every encodable request byte for byte (the Node.js and C clients' tests check theirs).
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from mesh import client as client_module
from mesh import codec
from mesh.client import Client
from mesh.errors import DeadlineExceeded
from mesh.testing.cluster import Cluster
from mesh.testing.configs import write_config
from mesh.testing.ports import free_ports
from tests.cluster import start_controller
from tests.protocol_vectors import (
    DEPLOYMENTS,
    MAX_REQUEST_BYTES,
    VECTORS,
    answer_fields,
    cases,
    replies,
    run_against,
    stable,
)

pytestmark = pytest.mark.timeout(120)


def recorded() -> list[dict[str, Any]]:
    return list(json.loads(VECTORS.read_text())["cases"])


def test_the_file_is_what_the_generator_makes_and_reads_back() -> None:
    made = cases()
    assert [(c["name"], c["frames"]) for c in made] == \
        [(c["name"], c["frames"]) for c in recorded()], \
        "regenerate: python -m tests.protocol_vectors --write"
    errors = set()
    for case in recorded():
        frames = [bytes.fromhex(f) for f in case["frames"]]
        if "value" in case:
            assert msgpack.packb(case["value"]) == frames[0], case["name"]
        if case["answer"] is not None:
            answer = [bytes.fromhex(f) for f in case["answer"]["frames"]]
            assert answer_fields(answer) == case["answer"]["fields"], case["name"]
            errors.add(case["answer"]["fields"].get("code"))
    # The reply vectors: every error code of the taxonomy, a result, a chunk, an end.
    recorded_replies = json.loads(VECTORS.read_text())["replies"]
    assert recorded_replies == replies(), "regenerate: python -m tests.protocol_vectors --write"
    from mesh.errors import ERROR_CLASSES

    assert {r["fields"].get("code") for r in recorded_replies} - {None} == set(ERROR_CLASSES)
    for r in recorded_replies:
        assert answer_fields([bytes.fromhex(f) for f in r["frames"]]) == r["fields"], r["name"]
    # Every error a request can get from the frontend without load is covered.
    assert errors >= {"bad_request", "unknown_model", "payload_too_large",
                      "unsupported_version"}


@pytest.mark.integration
async def test_a_live_controller_answers_every_vector_as_recorded(tmp_path: Path) -> None:
    ports = free_ports("client", "admin", "worker")
    config = tmp_path / "vectors.toml"
    write_config(config, ports, DEPLOYMENTS,
                 f'max_request_bytes = {MAX_REQUEST_BYTES}\nlauncher = "local"')
    log = tmp_path / "controller.log"
    cluster = Cluster(start_controller(config, log), f"tcp://127.0.0.1:{ports['client']}",
                      f"tcp://127.0.0.1:{ports['admin']}", f"tcp://127.0.0.1:{ports['worker']}",
                      config, log)
    try:
        await cluster.wait_for(lambda s: s["deployments"][0]["worlds_current"] == 1,
                               what="the echo world")
        live = await run_against(cluster.client)
    finally:
        from mesh.testing.processes import end_processes

        end_processes([cluster.proc])
    assert [stable(c) for c in live] == [stable(c) for c in recorded()]


class Recorder:
    """A controller that only listens: a ROUTER on loopback that hands back each message a
    client sends, as its frames, and never answers."""

    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"

    async def received(self, timeout_s: float = 5.0) -> list[bytes]:
        assert await self.sock.poll(int(timeout_s * 1000)), "the client sent nothing"
        _peer, *frames = await self.sock.recv_multipart()
        return frames

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def encoder_cases() -> list[dict[str, Any]]:
    return [c for c in recorded() if "value" in c]


async def python_client_sends(recorder: Recorder, value: dict[str, Any],
                              frames: list[bytes]) -> list[bytes]:
    """The frames the Python client builds for the request ``value`` (a vector's, with its
    tensors' data in ``frames``), through the code it sends with: _encode_request for infer
    and stream (infer() passes it the time left, so its timeout_ms would not be the
    vector's), and a real Client against ``recorder`` for ping, describe and cancel."""
    kind = value["kind"]
    if kind in ("infer", "stream"):
        header = codec.decode_tensors(copy.deepcopy(value), frames, codec.to_numpy)
        return [bytes(f) for f in client_module._encode_request(
            kind, header["id"], header["model"], header["inputs"], header["timeout_ms"] / 1000,
            header.get("params"))]
    # A client numbers its requests from 1; the vectors' ids are fixed, so its counter starts
    # at the vector's. Nothing answers: each call ends at its deadline.
    client = Client(recorder.endpoint, heartbeat_s=1.0 if kind == "ping" else 0.0, grace_s=0.0)
    client._ids = itertools.count(value["id"])
    try:
        await client.connect()  # with a heartbeat: the first ping goes out at once
        if kind == "describe":
            with pytest.raises(DeadlineExceeded):
                await client.describe(value["model"], timeout_s=0.2)
        elif kind == "cancel":  # a stream that ends at its deadline is cancelled, same id
            with pytest.raises(DeadlineExceeded):
                async for _ in client.stream("echo", {}, timeout_s=0.2):
                    pass
            await recorder.received()  # the stream itself
        elif kind != "ping":
            raise AssertionError(f"the Python client builds no {kind}")
        return await recorder.received()
    finally:
        await client.aclose()


async def test_the_python_client_builds_every_encoder_vector_byte_for_byte() -> None:
    recorder = Recorder()
    try:
        for case in encoder_cases():
            want = [bytes.fromhex(f) for f in case["frames"]]
            got = await python_client_sends(recorder, case["value"], want)
            assert got == want, (case["name"], [f.hex() for f in got], case["frames"])
        assert {c["value"]["kind"] for c in encoder_cases()} == \
            {"infer", "stream", "ping", "describe", "cancel"}
    finally:
        recorder.close()
