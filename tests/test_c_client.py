"""The C client (clients/c): built with its Makefile, then its test program run against a
live controller (echo and tinygpt) and the conformance vectors, and mesh-infer run once."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

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
