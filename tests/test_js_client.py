"""The Node.js client's own tests (clients/js/test), run here so CI runs them: they start a
controller of their own and check infer (every dtype, bit for bit), streams and their cancel,
typed errors, deadlines, describe, and the conformance vectors offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parent.parent / "clients" / "js"

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def node_or_skip() -> str:
    """The node that runs the JS client, or a skip saying what is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (.ci/run installs it)")
    if not (JS / "node_modules" / "zeromq").is_dir():
        pytest.skip("clients/js has no node_modules: run 'npm ci' there (.ci/run does)")
    return node


def test_the_js_client_passes_its_tests_against_a_live_controller() -> None:
    node = node_or_skip()
    env = {**os.environ, "MESHSERVE_PYTHON": sys.executable}
    result = subprocess.run([node, "--test", "test/"], cwd=JS, env=env, capture_output=True,
                            text=True, timeout=170)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "# fail 0" in result.stdout
