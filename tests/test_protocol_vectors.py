"""docs/protocol-vectors/vectors.json holds: offline (each encodable request is the msgpack of
its value, each recorded answer decodes to its fields, the file is what the generator makes),
and live (a controller answers every request exactly as recorded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.cluster import Cluster, free_ports, start_controller, write_config
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
        from tests.cluster import end_processes

        end_processes([cluster.proc])
    assert [stable(c) for c in live] == [stable(c) for c in recorded()]
