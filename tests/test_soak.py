"""The short soak (bench/soak.py --short): about 60 s of load steps, streams, a worker shared
by worlds, a SIGKILL and a SIGSTOP, with a 22 s idle stretch (11 world timeouts of 2 s, and
longer than the workers' 10 s controller watchdog).
Asserted from the client's ledger and the controller's events: nothing lost, duplicated or
failed, every stream's text exact, no world break that no fault explains, and the
controller's memory and descriptors bounded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.testing.processes import pids_with

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(420)
def test_the_short_soak_loses_nothing_and_breaks_no_world_without_a_fault(
        tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "-m", "bench.soak", "--short", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["requests_sent"] > 500 and r["streams"] >= 3
    assert (r["failed"], r["lost"], r["duplicated"]) == (0, 0, 0), r["failed_codes"]
    assert r["streams_wrong_text"] == 0
    assert [f["kind"] for f in r["faults"]] == ["kill", "stop"]
    assert r["world_breaks_explained"] >= 2  # each fault broke its worlds...
    assert r["world_breaks_unexplained"] == []  # ...and nothing else broke any
    start, end = r["processes_start"]["controller"], r["processes_end"]["controller"]
    assert end["rss_mb"] < start["rss_mb"] * 1.5 + 50, (start, end)
    assert end["fds"] <= start["fds"] + 20, (start, end)
    # The soak's controller stopped its workers by PID: none outlived it.
    assert pids_with(f"--controller {r['worker_endpoint']}") == []
