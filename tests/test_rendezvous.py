"""Where world traffic listens and who can meet a world at its store (worker/rendezvous.py),
with real stores, real gloo groups and a real stranger process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.comm import Comm, CommError
from worker.rendezvous import interface_of, pin_nccl_to, rendezvous_store

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parent.parent


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            raw = bytes.fromhex(addr_hex)
            # /proc writes each 32-bit word of the address in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            family = socket.AF_INET if width == 8 else socket.AF_INET6
            found.add((socket.inet_ntop(family, raw), int(port_hex, 16)))
    return found


def test_the_rendezvous_store_listens_on_the_advertise_address_only() -> None:
    # 127.0.0.2 is this host too, through another address: a peer that reaches the host by
    # any address but the advertised one finds nothing listening.
    store = rendezvous_store("127.0.0.2", timeout_s=5.0)
    assert ("127.0.0.2", store.port) in listening(os.getpid())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", store.port), timeout=2.0).close()
    import datetime

    import torch.distributed as dist

    client = dist.TCPStore("127.0.0.2", store.port, 1, False, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=5))
    client.set("k", "v")
    assert store.get("k") == b"v"


@pytest.fixture
def peer_processes() -> Iterator[Any]:
    """Start rank 1 of world 1/1 (tests/gloo_peer.py, scenario echo) against a store port;
    each is ended by its PID on teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(port: int, *, token: str, connect_s: float) -> subprocess.Popen[str]:
        env = {**os.environ, "MESH_PEER_TOKEN": token, "MESH_PEER_CONNECT_S": str(connect_s)}
        proc = subprocess.Popen([sys.executable, "-m", "tests.gloo_peer", str(port), "5",
                                 "echo"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=ROOT, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def form(store: Any, token: str, connect_s: float) -> Comm:
    return Comm(world_id=1, epoch=1, rank=0, size=2, store=store, device="cpu", timeout_s=5.0,
                backend="gloo", connect_timeout_s=connect_s, token=token, bind_host="127.0.0.1")


@pytest.mark.integration
def test_a_stranger_without_the_world_token_cannot_join_its_store_prefix(
        peer_processes: Any) -> None:
    # The stranger reaches the store and knows the world's id and epoch, not its token: it
    # meets nobody, and the world's rank 0 meets nobody either.
    store = rendezvous_store("127.0.0.1", timeout_s=10.0)
    stranger = peer_processes(store.port, token="", connect_s=4)
    with pytest.raises(CommError):
        form(store, "7f3a9c", connect_s=3)
    out, _ = stranger.communicate(timeout=30)
    assert "joined" not in out and stranger.returncode != 0, out
    # Told the token, the same process joins: the token, nothing else, kept it out.
    store = rendezvous_store("127.0.0.1", timeout_s=10.0)
    member = peer_processes(store.port, token="7f3a9c", connect_s=30)
    comm = form(store, "7f3a9c", connect_s=30)
    comm.send(1, {"hello": 1})
    assert comm.recv(1)[0] == {"hello": 1}
    comm.send(1, {"k": "x"})
    assert member.wait(10) == 0
    comm.close()


@pytest.mark.integration
def test_a_world_listens_on_its_advertise_address_only(peer_processes: Any) -> None:
    before = listening(os.getpid())
    store = rendezvous_store("127.0.0.1", timeout_s=10.0)
    member = peer_processes(store.port, token="t0k", connect_s=30)
    comm = form(store, "t0k", connect_s=30)
    opened = listening(os.getpid()) - before
    assert opened and {addr for addr, _ in opened} == {"127.0.0.1"}, opened
    comm.send(1, {"k": "x"})
    assert member.wait(10) == 0
    comm.close()


def test_nccl_is_pinned_to_the_interface_of_the_advertise_address(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("192.0.2.1") is None  # an address no interface here holds
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    pin_nccl_to("127.0.0.1")
    assert os.environ["NCCL_SOCKET_IFNAME"] == "=lo"
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth7")  # the operator's choice stands
    pin_nccl_to("127.0.0.1")
    assert os.environ["NCCL_SOCKET_IFNAME"] == "eth7"
