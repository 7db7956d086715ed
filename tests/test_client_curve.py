"""CURVE with the Node.js and C clients: against a controller with [security] curve = true,
an allowed key pair is served and a key nobody allowed gets silence (its handshake is refused),
from each client, one test each. Keys come from 'meshctl keys generate'."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.cluster import start_cluster
from tests.test_c_client import C, build
from tests.test_js_client import JS, node_or_skip

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ECHO = """
[[deployments]]
name = "echo"
model = "worker.models.echo:build"
"""

JS_PROBE = """
import { Client } from "INDEX";
const [endpoint, serverKey, publicKey, secretKey] = process.argv.slice(2);
const client = new Client(endpoint, { curve: { serverKey, publicKey, secretKey }, graceMs: 0 });
try {
  const out = await client.infer("echo", { n: 7 }, { timeoutMs: 1500 });
  console.log(JSON.stringify({ ok: out }));
} catch (e) {
  console.log(JSON.stringify({ error: e.code }));
} finally {
  client.close();
}
"""


def z85(path: Path, which: str) -> str:
    """The Z85 key 'public' or 'secret' from a zmq certificate file."""
    for line in path.read_text().splitlines():
        key, _, value = line.strip().partition("=")
        if key.strip() == f"{which}-key":
            return value.strip().strip('"')
    raise AssertionError(f"no {which} key in {path}")


@asynccontextmanager
async def curve_controller(tmp_path: Path) -> AsyncIterator[Callable[[str], list[str]]]:
    """A controller with [security] curve = true serving echo, where the key pair "alice" is
    allowed and "mallory" is not: yields keys(name), the client endpoint followed by the
    controller's public key and that pair's public and secret keys (Z85)."""
    meshctl = [sys.executable, "-m", "mesh.cli"]
    own = tmp_path / "keys"
    for name in ("controller", "alice", "mallory"):
        subprocess.run([*meshctl, "keys", "generate", name, "--dir", str(own)], check=True,
                       capture_output=True, timeout=30)
    for folder in ("clients", "workers", "admins"):
        (tmp_path / folder).mkdir()
    shutil.copy(own / "alice.key", tmp_path / "clients" / "alice.key")
    shutil.copy(own / "alice.key", tmp_path / "admins" / "alice.key")
    security = (f'\n[security]\ncurve = true\ncontroller_key = "{own / "controller.key_secret"}"'
                f'\nclient_keys = "{tmp_path / "clients"}"\nworker_keys = '
                f'"{tmp_path / "workers"}"\nadmin_keys = "{tmp_path / "admins"}"\n')
    from mesh.security import ClientKeys

    admin = ClientKeys.load(own / "alice.key_secret", own / "controller.key")
    cluster = await start_cluster(tmp_path, ECHO + security, controller="warm_workers = 0",
                                  admin_curve=admin)
    server = z85(own / "controller.key", "public")

    def keys(name: str) -> list[str]:
        pair = own / f"{name}.key_secret"
        return [cluster.client, server, z85(pair, "public"), z85(pair, "secret")]

    try:
        yield keys
    finally:
        cluster.stop()


# One test per client, each skipping with its reason when its client cannot run here, so a
# run where only one of them could be checked says so.

async def test_the_js_client_speaks_curve_and_a_stranger_gets_silence(tmp_path: Path) -> None:
    node = node_or_skip()
    probe = tmp_path / "curve-probe.mjs"
    probe.write_text(JS_PROBE.replace("INDEX", (JS / "index.js").as_uri()))
    async with curve_controller(tmp_path) as keys:
        for name, want in (("alice", {"ok": {"n": 7}}), ("mallory",
                                                       {"error": "deadline_exceeded"})):
            out = subprocess.run([node, str(probe), *keys(name)], capture_output=True,
                                 text=True, timeout=30)
            assert json.loads(out.stdout) == want, (name, out.stdout, out.stderr)


async def test_the_c_client_speaks_curve_and_a_stranger_gets_silence(tmp_path: Path) -> None:
    build()  # skips, saying why, without a compiler or the libraries
    async with curve_controller(tmp_path) as keys:
        for name, rc in (("alice", 0), ("mallory", 1)):
            endpoint, *curve = keys(name)
            out = subprocess.run(["./mesh-infer", "--endpoint", endpoint, "--timeout-ms", "500",
                                  "--curve", *curve, "echo", "n:int=7"], cwd=C,
                                 capture_output=True, text=True, timeout=30, env={**os.environ})
            assert out.returncode == rc, (name, out.stdout, out.stderr)
            if rc == 0:
                assert out.stdout.strip() == "n: 7"
            else:
                assert "[deadline_exceeded]" in out.stderr
