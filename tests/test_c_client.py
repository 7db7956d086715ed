"""The C client (clients/c): built with its Makefile, then its test program run on the
conformance vectors (its own request builder and decoder, offline) and against a live
controller (echo and tinygpt), and mesh-infer run once."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from mesh import codec
from tests.cluster import start_cluster
from tests.protocol_vectors import VECTORS

C = Path(__file__).resolve().parent.parent / "clients" / "c"
DEPLOYMENTS = """
[[deployments]]
name = "echo"
model = "worker.models.echo:build"

[[deployments]]
name = "tinygpt"
model = "worker.models.tinygpt:build"
max_batch_size = 1
"""

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def build() -> None:
    if shutil.which("make") is None or shutil.which("cc") is None:
        pytest.skip("no make or C compiler (.ci/run installs build-essential)")
    if not Path("/usr/include/zmq.h").exists() or not Path("/usr/include/msgpack.h").exists():
        pytest.skip("libzmq3-dev or libmsgpack-dev is missing (.ci/run installs them)")
    result = subprocess.run(["make", "-s", "all"], cwd=C, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the conformance vectors as lines test_client.c reads (its comment gives the format) ---

def _blob(data: bytes) -> str:
    return "x" + data.hex()


def _word(text: str) -> str:
    assert text and not any(ch.isspace() for ch in text), f"{text!r} cannot be one token"
    return text


def _tensor(name: str, dtype: str, shape: list[int], data: bytes) -> str:
    return " ".join([_word(name), "t", dtype, str(len(shape)), *map(str, shape), _blob(data)])


def _value(name: str, value: Any, frames: list[str] | None = None) -> str:
    """One value: a tensor reference (with the request's frames) or a recorded tensor
    ({dtype, shape, data}), a string or an int; the C client's mesh_value has nothing else."""
    if isinstance(value, dict) and "$tensor" in value and frames is not None:
        dtype, shape, index = value["$tensor"]
        return _tensor(name, dtype, shape, bytes.fromhex(frames[index]))
    if isinstance(value, dict) and set(value) == {"dtype", "shape", "data"}:
        np_dtype = codec.DTYPES[value["dtype"]][0]
        assert np_dtype is not None, f"{value['dtype']}: no numpy dtype to write it with"
        data = np.asarray(value["data"], dtype=np_dtype).tobytes()
        return _tensor(name, value["dtype"], value["shape"], data)
    if isinstance(value, str):
        return f"{_word(name)} s {_blob(value.encode())}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{_word(name)} i {value}"
    raise AssertionError(f"{name}: {value!r} is not a value the C client reads")


def _values(values: dict[str, Any] | None, frames: list[str] | None = None) -> list[str]:
    values = values or {}
    return [str(len(values)), *(_value(k, v, frames) for k, v in values.items())]


def encode_line(case: dict[str, Any]) -> str:
    value, frames = case["value"], case["frames"]
    return " ".join(["encode", _word(case["name"]), _word(value["kind"]), str(value["id"]),
                     _word(value.get("model", "-")), str(value.get("timeout_ms", "-")),
                     *_values(value.get("inputs"), frames), *_values(value.get("params"), frames),
                     str(len(frames)), *(_blob(bytes.fromhex(f)) for f in frames)])


def reply_line(name: str, frames: list[str], fields: dict[str, Any]) -> str:
    answer_id = fields["id"]
    ident = ["n", "-"] if answer_id is None else ["s", _blob(answer_id.encode())] \
        if isinstance(answer_id, str) else ["i", str(answer_id)]
    retry = "-" if "retryable" not in fields else str(int(fields["retryable"]))
    outputs = ["-"] if "outputs" not in fields else _values(fields["outputs"])
    return " ".join(["reply", _word(name), str(len(frames)),
                     *(_blob(bytes.fromhex(f)) for f in frames), _word(fields["kind"]), *ident,
                     fields.get("code", "-"), retry, str(fields.get("retry_after_ms", "-")),
                     *outputs])


def vector_lines() -> tuple[list[str], int, int]:
    """Every encoder case and every recorded answer and reply: the lines, and how many of
    each."""
    doc = json.loads(VECTORS.read_text())
    encoders = [encode_line(c) for c in doc["cases"] if "value" in c]
    answers = [reply_line(c["name"], c["answer"]["frames"], c["answer"]["fields"])
               for c in doc["cases"] if c["answer"] is not None]
    answers += [reply_line(r["name"], r["frames"], r["fields"]) for r in doc["replies"]]
    return encoders + answers, len(encoders), len(answers)


def test_the_c_client_builds_and_reads_every_conformance_vector(tmp_path: Path) -> None:
    # Its own request builder (mesh_encode_request, mesh_encode_control) against every encoder
    # case, and its own decoder (mesh_decode_reply, what mesh_infer and mesh_stream_next read
    # with) against every recorded answer and reply: ids, error fields and outputs.
    build()
    lines, encoders, answers = vector_lines()
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("\n".join(lines) + "\n")
    result = subprocess.run(["./test_client"], cwd=C, env={"MESH_VECTORS": str(vectors)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: 0 failure(s)" in result.stdout
    # The C client sends no describe; every other encoder case went through its builder.
    assert f"vectors: {encoders - 1} encoded, {answers} decoded; not built: describe\n" in \
        result.stdout, result.stdout


async def test_the_c_client_passes_its_tests_and_mesh_infer_answers(tmp_path: Path) -> None:
    build()
    cluster = await start_cluster(tmp_path, DEPLOYMENTS, controller="warm_workers = 0")
    try:
        env = {"MESH_ENDPOINT": cluster.client, "PATH": "/usr/bin"}
        result = subprocess.run(["./test_client"], cwd=C, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "ok: 0 failure(s)" in result.stdout
        out = subprocess.run(["./mesh-infer", "--endpoint", cluster.client, "echo",
                              "x:float32[1,4]=1,2,3,4", "s=hi", "n:int=7"], cwd=C,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["n: 7", "s: hi", "x: float32[1,4] = 1 2 3 4"] or \
            sorted(out.stdout.splitlines()) == ["n: 7", "s: hi", "x: float32[1,4] = 1 2 3 4"]
        bad = subprocess.run(["./mesh-infer", "--endpoint", cluster.client, "nope", "a=1"],
                             cwd=C, capture_output=True, text=True, timeout=30)
        assert bad.returncode == 1 and "[unknown_model]" in bad.stderr
    finally:
        cluster.stop()


class FakeController:
    """A ROUTER on a free port that reads requests and answers pings with the incarnations
    given (None: silence), never answering a request: a controller that is gone or restarted."""

    def __init__(self, incarnations: list[str | None]) -> None:
        self.incarnations = incarnations
        self.pings = 0
        self.requests = 0
        self._context = zmq.Context()
        self._sock = self._context.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(50):
                continue
            peer, head, *_ = self._sock.recv_multipart()
            header = msgpack.unpackb(head)
            if header.get("kind") != "ping":
                self.requests += 1
                continue
            incarnation = self.incarnations[min(self.pings, len(self.incarnations) - 1)]
            self.pings += 1
            if incarnation is not None:
                self._sock.send_multipart([peer, msgpack.packb(
                    {"v": 1, "kind": "pong", "id": header["id"], "incarnation": incarnation})])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(0)
        self._context.term()


def against_fake(incarnations: list[str | None], *options: str, timeout_ms: int = 30000
                 ) -> tuple[subprocess.CompletedProcess[str], float, FakeController]:
    """``mesh-infer`` (one echo call) against a FakeController: its output, how long it took,
    and the fake (what it received)."""
    build()
    fake = FakeController(incarnations)
    started = time.monotonic()
    try:
        out = subprocess.run(["./mesh-infer", "--endpoint", fake.endpoint, "--timeout-ms",
                              str(timeout_ms), *options, "echo", "n:int=1"], cwd=C,
                             capture_output=True, text=True, timeout=60)
    finally:
        fake.close()
    return out, time.monotonic() - started, fake


def test_the_c_client_fails_a_call_to_a_silent_controller_as_lost_long_before_its_deadline(
        ) -> None:
    out, took_s, fake = against_fake([None], "--heartbeat-ms", "100",
                                     "--controller-timeout-ms", "400")
    assert out.returncode == 1 and "[controller_lost]" in out.stderr, out.stderr
    assert "(retryable)" in out.stderr
    assert took_s < 5.0, took_s  # the deadline was 30 s
    assert fake.requests == 1 and fake.pings >= 2


def test_the_c_client_fails_a_call_sent_before_a_pong_from_a_restarted_controller() -> None:
    out, took_s, _ = against_fake(["one", "two"], "--heartbeat-ms", "100",
                                  "--controller-timeout-ms", "5000")
    assert out.returncode == 1 and "[controller_lost]" in out.stderr, out.stderr
    assert "restarted" in out.stderr
    assert took_s < 5.0, took_s


def test_without_liveness_the_c_client_waits_for_the_deadline() -> None:
    # The two checks above can fail: with pings off, the same call waits out its deadline.
    out, took_s, fake = against_fake([None], "--heartbeat-ms", "0", timeout_ms=500)
    assert out.returncode == 1 and "[deadline_exceeded]" in out.stderr, out.stderr
    assert took_s >= 2.4  # 500 ms and the client's 2 s grace
    assert fake.pings == 0
