"""ZeroMQ CURVE on every port: with ``[security] curve = true`` a client, admin or worker whose
key is not in the right folder gets nothing, and revoking a key needs no restart."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from mesh import codec
from mesh.admin_client import admin_call
from mesh.client import Client
from mesh.errors import ControllerLost, DeadlineExceeded
from mesh.messages import AdminReply, AdminRequest
from mesh.security import ClientKeys
from mesh.testing.waits import until
from tests.conftest import StartCluster

pytestmark = pytest.mark.integration

X = {"x": np.ones((1, 64), np.float32)}


def meshctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """controller, alice (client), ops (admin), mallory (nobody's); the allowed folders hold
    copies of the public keys, as an operator would hand them over."""
    root = tmp_path / "keys"
    for name in ("controller", "alice", "ops", "mallory"):
        result = meshctl("keys", "generate", name, "--dir", str(root / "own"))
        assert result.returncode == 0, result.stderr
        assert "mode 600" in result.stdout
    assert (root / "own" / "alice.key_secret").stat().st_mode & 0o077 == 0
    for folder, name in (("clients", "alice"), ("admins", "ops"), ("workers", None)):
        (root / folder).mkdir()
        if name:
            shutil.copy(root / "own" / f"{name}.key", root / folder / f"{name}.key")
    return root


def security(keys: Path) -> str:
    return f"""
[security]
curve = true
controller_key = "{keys / 'own' / 'controller.key_secret'}"
client_keys = "{keys / 'clients'}"
worker_keys = "{keys / 'workers'}"
admin_keys = "{keys / 'admins'}"
"""


MLP = """
[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
factory_kwargs = { hidden = 32 }
"""


def client(cluster: Any, keys: Path, name: str | None) -> Client:
    # A refused CURVE handshake is silence: a short controller timeout notices it in about
    # a second instead of at the request's deadline.
    quick = {"heartbeat_s": 0.2, "controller_timeout_s": 1.0}
    if name is None:
        return Client(cluster.client, **quick)
    return Client(cluster.client, key=str(keys / "own" / f"{name}.key_secret"),
                  controller_key=str(keys / "own" / "controller.key"), **quick)


async def served(cluster: Any, keys: Path, name: str | None) -> bool:
    """Whether ``name``'s key gets an answer (a fresh connection each time)."""
    async with client(cluster, keys, name) as c:
        try:
            out = await c.infer("mlp", X, timeout_s=1.5)
        except (DeadlineExceeded, ControllerLost):  # a refused handshake is silence
            return False
        assert out["y"].shape == (1, 10)
        return True


async def keys_reloaded(cluster: Any, domain: str, count: int, timeout_s: float) -> None:
    """Poll the controller's log until its latest reload of the key folders allows ``count``
    keys on ``domain`` (a reload is logged with each domain's count, when the keys changed)."""

    def reloads() -> list[str]:
        return [line for line in cluster.log_tail(200).splitlines()
                if "CURVE keys reloaded: " in line]

    def reloaded() -> bool:
        found = reloads()
        if not found:
            return False
        counts = dict(item.rsplit(" ", 1) for item in
                      found[-1].split("CURVE keys reloaded: ", 1)[1].split(", "))
        return counts.get(domain) == str(count)

    await until(reloaded, timeout_s, f"a reload with {count} {domain} keys",
                detail=lambda: f"last reload: {reloads()[-1:]}")


def admin_keys(keys: Path, name: str) -> ClientKeys:
    return ClientKeys.load(keys / "own" / f"{name}.key_secret", keys / "own" / "controller.key")


async def test_only_allowed_keys_are_served_and_a_revoked_key_is_refused_without_restart(
        cluster_factory: StartCluster, keys: Path) -> None:
    cluster = await cluster_factory(MLP + security(keys), admin_curve=admin_keys(keys, "ops"))
    # The local launcher's workers hold the controller's own keys: the world formed.
    assert (await cluster.status())["deployments"][0]["worlds_current"] == 1
    assert await served(cluster, keys, "alice")
    assert not await served(cluster, keys, None)  # no CURVE at all
    assert not await served(cluster, keys, "mallory")  # CURVE, a key nobody allowed
    assert not await served(cluster, keys, "ops")  # an admin key is not a client key

    # Admin: only ops.
    with pytest.raises(DeadlineExceeded):
        await admin_call(cluster.admin, "status", timeout_s=1.0)
    with pytest.raises(DeadlineExceeded):
        await admin_call(cluster.admin, "scale", {"deployment": "mlp", "worlds": 0},
                         timeout_s=1.0, curve=admin_keys(keys, "alice"))
    own = keys / "own"
    result = cluster.meshctl("--key", str(own / "ops.key_secret"),
                             "--controller-key", str(own / "controller.key"), "status", "--json")
    assert result.returncode == 0, result.stderr
    result = cluster.meshctl("--admin-timeout-s", "1", "status")
    assert result.returncode == 1 and "no answer" in result.stderr

    # A stranger on the worker port without an allowed key cannot even register.
    context = zmq.asyncio.Context()
    try:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, b"w-stranger")
        admin_keys(keys, "mallory").apply(sock)
        sock.connect(cluster.workers_endpoint)
        await sock.send(codec.pack({"kind": "register", "worker_id": "w-stranger", "pid": 0,
                                    "host": "h", "device": "cpu"}))
        assert not await sock.poll(1500), "a stranger got an answer on the worker port"
        sock.close(0)
    finally:
        context.destroy(0)
    status = await cluster.status()
    assert [w["id"] for w in status["workers"]] == ["w1"]

    # Revocation: delete alice's key; the folder is watched (and SIGHUP re-reads it at once).
    # A connection alice opened before is cut off too, not only her new ones: ZeroMQ checks
    # a key at the handshake only, the controller at every message.
    async with Client(cluster.client, key=str(keys / "own" / "alice.key_secret"),
                      controller_key=str(keys / "own" / "controller.key"),
                      heartbeat_s=0) as open_before:
        assert (await open_before.infer("mlp", X, timeout_s=5.0))["y"].shape == (1, 10)
        (keys / "clients" / "alice.key").unlink()
        cluster.proc.send_signal(signal.SIGHUP)
        # At once: the folder watch alone would take up to a second. One client key stays
        # allowed: the controller's own, which its HTTP gateway holds (mesh/security.py).
        await keys_reloaded(cluster, "client", 1, timeout_s=0.5)
        assert not await served(cluster, keys, "alice")
        with pytest.raises(DeadlineExceeded):
            await open_before.infer("mlp", X, timeout_s=1.0)
    status = await cluster.status()
    assert status["controller"]["revoked_messages"]["client"] >= 1
    # Allowing a key is copying it in: picked up without a signal, within a couple of seconds.
    shutil.copy(keys / "own" / "mallory.key", keys / "clients" / "mallory.key")
    for _ in range(30):
        if await served(cluster, keys, "mallory"):
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError("a key copied into the clients folder was never allowed")
    assert "CURVE keys reloaded" in cluster.log_tail(100)


def test_a_curve_config_without_its_keys_is_refused_by_name(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(MLP + "\n[security]\ncurve = true\ncontroller_key = \"nope.key_secret\"\n")
    result = meshctl("up", "--config", str(config))
    assert result.returncode == 2
    assert "security.client_keys is required" in result.stderr or \
        "security.controller_key" in result.stderr


async def test_the_profile_bench_under_curve_sees_the_fleet_and_keeps_its_rate(
        cluster_factory: StartCluster, keys: Path) -> None:
    # ops is allowed on the client port too here: one key for the load and the status polls.
    shutil.copy(keys / "own" / "ops.key", keys / "clients" / "ops.key")
    cluster = await cluster_factory(MLP + security(keys), admin_curve=admin_keys(keys, "ops"))
    own = keys / "own"
    result = await asyncio.to_thread(
        cluster.meshctl, "--key", str(own / "ops.key_secret"), "--controller-key",
        str(own / "controller.key"), "bench", "mlp", "--endpoint", cluster.client,
        "--profile", "step", "--duration-s", "4", "--base-rps", "20", "--peak-x", "1",
        "--json", timeout_s=90.0)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    rows = summary["per_second"]
    # The per-second status polls carry the caller's keys: the fleet is seen, not -1.
    assert rows and all(r["worlds"] >= 1 and r["workers"] >= 1 for r in rows[1:]), rows
    # And they never hold up the arrivals: 20/s for 4 s. A status call the controller did not
    # answer used to stall the sender 2 s a second, halving what was sent.
    assert summary["requests"] >= 60, summary["requests"]
    assert summary["errors"] == {}


@pytest.fixture
def remote_workers(tmp_path: Path) -> Any:
    """Start ``meshctl worker`` processes that join a controller with a CURVE key pair; each
    is ended by its PID on teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(endpoint: str, worker_id: str, key: Path, controller_key: Path
              ) -> subprocess.Popen[bytes]:
        with open(tmp_path / f"{worker_id}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mesh.cli", "worker", "--controller", endpoint,
                 "--worker-id", worker_id, "--device", "cpu", "--threads", "1",
                 "--key", str(key), "--controller-key", str(controller_key)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def worker_state(status: dict[str, Any], worker_id: str) -> str:
    return next((w["state"] for w in status["workers"] if w["id"] == worker_id), "")


async def test_a_remote_worker_with_an_allowed_key_joins_and_an_unknown_key_is_refused(
        cluster_factory: StartCluster, keys: Path, remote_workers: Any) -> None:
    own = keys / "own"
    assert meshctl("keys", "generate", "w7", "--dir", str(own)).returncode == 0
    shutil.copy(own / "w7.key", keys / "workers" / "w7.key")
    cluster = await cluster_factory(MLP + security(keys), admin_curve=admin_keys(keys, "ops"))
    # mallory holds a key pair, just not one the workers folder allows.
    stranger = remote_workers(cluster.workers_endpoint, "w-mallory",
                              own / "mallory.key_secret", own / "controller.key")
    allowed = remote_workers(cluster.workers_endpoint, "w7", own / "w7.key_secret",
                             own / "controller.key")
    status = await cluster.wait_for(lambda s: worker_state(s, "w7") == "idle", timeout_s=60,
                                    what="the remote worker w7 registered")
    assert worker_state(status, "w-mallory") == ""
    # The stranger's process has been running as long as w7's: it was refused, not late.
    # Give it two more heartbeat periods' worth of chances.
    for _ in range(20):
        status = await cluster.status()
        assert worker_state(status, "w-mallory") == "", "an unknown worker key registered"
        await asyncio.sleep(0.1)
    assert stranger.poll() is None and allowed.poll() is None


async def test_a_revoked_worker_key_cuts_its_open_connection(
        cluster_factory: StartCluster, keys: Path, remote_workers: Any) -> None:
    own = keys / "own"
    assert meshctl("keys", "generate", "w7", "--dir", str(own)).returncode == 0
    shutil.copy(own / "w7.key", keys / "workers" / "w7.key")
    cluster = await cluster_factory(MLP + security(keys), admin_curve=admin_keys(keys, "ops"))
    remote_workers(cluster.workers_endpoint, "w7", own / "w7.key_secret",
                   own / "controller.key")
    await cluster.wait_for(lambda s: worker_state(s, "w7") == "idle", timeout_s=60,
                           what="the remote worker w7 registered")
    # Revoked while connected: ZeroMQ would keep the connection (it checks a key at the
    # handshake only); the controller drops its every message, so it falls silent and is
    # declared dead.
    (keys / "workers" / "w7.key").unlink()
    cluster.proc.send_signal(signal.SIGHUP)
    status = await cluster.wait_for(lambda s: worker_state(s, "w7") == "dead", timeout_s=15,
                                    what="the revoked worker declared dead")
    assert status["controller"]["revoked_messages"]["worker"] >= 1
    assert worker_state(status, "w1") == "serving"  # the controller's own worker keeps on


async def test_a_revoked_admin_key_cuts_its_open_connection(
        cluster_factory: StartCluster, keys: Path) -> None:
    own = keys / "own"
    assert meshctl("keys", "generate", "ops2", "--dir", str(own)).returncode == 0
    shutil.copy(own / "ops2.key", keys / "admins" / "ops2.key")
    cluster = await cluster_factory(MLP + security(keys), admin_curve=admin_keys(keys, "ops2"))
    context = zmq.asyncio.Context()
    try:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        admin_keys(keys, "ops").apply(sock)
        sock.connect(cluster.admin)

        async def status_on_the_open_connection(request_id: int) -> bool:
            await sock.send(codec.pack(AdminRequest(id=request_id, command="status",
                                                    args={}).to_wire()))
            if not await sock.poll(1500):
                return False
            reply = AdminReply.from_wire(codec.unpack_header((await sock.recv_multipart())[-1]))
            return reply.ok and reply.id == request_id

        assert await status_on_the_open_connection(1)
        (keys / "admins" / "ops.key").unlink()
        cluster.proc.send_signal(signal.SIGHUP)
        await keys_reloaded(cluster, "admin", 1, timeout_s=5.0)
        assert not await status_on_the_open_connection(2), "a revoked admin key was answered"
        sock.close(0)
    finally:
        context.destroy(0)
    status = await cluster.status()  # ops2's key still works
    assert status["controller"]["revoked_messages"]["admin"] >= 1
