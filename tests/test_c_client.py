"""The C client (clients/c): built with its Makefile, then its test program run against a
live controller (echo and tinygpt) and the conformance vectors, and mesh-infer run once."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

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

pytestmark = pytest.mark.timeout(180)


def build() -> None:
    if shutil.which("make") is None or shutil.which("cc") is None:
        pytest.skip("no make or C compiler (.ci/run installs build-essential)")
    if not Path("/usr/include/zmq.h").exists() or not Path("/usr/include/msgpack.h").exists():
        pytest.skip("libzmq3-dev or libmsgpack-dev is missing (.ci/run installs them)")
    result = subprocess.run(["make", "-s", "all"], cwd=C, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_the_c_client_passes_its_tests_and_mesh_infer_answers(tmp_path: Path) -> None:
    build()
    lines = []
    vectors_doc = json.loads(VECTORS.read_text())
    answers = [(c["answer"]["fields"], c["answer"]["frames"][0])
               for c in vectors_doc["cases"] if c["answer"] is not None]
    answers += [(r["fields"], r["frames"][0]) for r in vectors_doc["replies"]]
    for fields, frame in answers:
        retry = "-" if "retryable" not in fields else str(int(fields["retryable"]))
        lines.append(f"{fields['kind']} {fields.get('code', '-')} {retry} {frame}")
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("\n".join(lines) + "\n")
    cluster = await start_cluster(tmp_path, DEPLOYMENTS, controller="warm_workers = 0")
    try:
        env = {"MESH_ENDPOINT": cluster.client, "MESH_VECTORS": str(vectors), "PATH": "/usr/bin"}
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
