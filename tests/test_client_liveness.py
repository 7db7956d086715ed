"""The client notices a lost or restarted controller, against a scripted controller on a real
ZeroMQ ROUTER socket: requests in flight fail at once with ControllerLost instead of waiting
out their deadlines, retries ride through, and an idle client stays silent."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import zmq
import zmq.asyncio

from mesh import codec
from mesh.client import Client
from mesh.errors import ControllerLost, Unavailable
from mesh.messages import PROTOCOL_VERSION, result_header
from mesh.testing.ports import free_ports

pytestmark = pytest.mark.timeout(30)


class ScriptedController:
    """Answers pings with ``incarnation``, and ``infer`` while ``serving`` (else accepts it and
    never answers, as a controller that is about to crash). ``hang()`` stops it reading at
    all, like a stopped process; ``wake()`` resumes. Counts what it receives by kind."""

    def __init__(self, port: int) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(f"tcp://127.0.0.1:{port}")
        self.incarnation = "first"
        self.awake = asyncio.Event()
        self.awake.set()
        self.serving = True
        self.seen: dict[str, int] = {}
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            await self.awake.wait()
            header: dict[str, Any] = codec.unpack_header(frames[1])
            kind = header["kind"]
            self.seen[kind] = self.seen.get(kind, 0) + 1
            if kind == "ping":
                await self.sock.send_multipart([frames[0], codec.pack(
                    {"v": PROTOCOL_VERSION, "kind": "pong", "id": header["id"],
                     "incarnation": self.incarnation})])
            elif kind == "infer" and self.serving:
                await self.sock.send_multipart(
                    [frames[0], codec.pack(result_header(header["id"], {"y": 1}))])

    async def close(self) -> None:
        self.task.cancel()
        self.sock.close()
        self.ctx.term()


async def test_a_silent_controller_fails_requests_in_flight_at_once_and_retries_ride_through(
        ) -> None:
    port = free_ports("client")["client"]
    fake = ScriptedController(port)
    try:
        async with Client(f"tcp://127.0.0.1:{port}", heartbeat_s=0.2,
                          controller_timeout_s=0.6) as client:
            assert await client.infer("m", {}, timeout_s=5) == {"y": 1}
            fake.awake.clear()  # the controller hangs (or its host is cut off)
            started = time.monotonic()
            with pytest.raises(ControllerLost) as lost:
                await client.infer("m", {}, timeout_s=20)
            assert time.monotonic() - started < 1.5  # not the 20 s deadline
            assert isinstance(lost.value, Unavailable) and lost.value.retryable
            assert client.controller_lost and client.controller_losses == 1
            # A caller that allows retries is answered once the controller is back.
            patient = asyncio.create_task(client.infer("m", {}, timeout_s=20, retries=50))
            await asyncio.sleep(1.5)
            assert not patient.done()
            fake.awake.set()
            assert await asyncio.wait_for(patient, 5) == {"y": 1}
            assert not client.controller_lost
            assert client.controller_losses == 1  # one loss, however many reconnects
    finally:
        await fake.close()


async def test_a_restarted_controller_is_noticed_by_its_incarnation(
        ) -> None:
    port = free_ports("client")["client"]
    fake = ScriptedController(port)
    try:
        async with Client(f"tcp://127.0.0.1:{port}", heartbeat_s=0.2,
                          controller_timeout_s=0.6) as client:
            assert await client.infer("m", {}, timeout_s=5) == {"y": 1}
            fake.serving = False  # accepted, never answered: the old controller's requests
            held = asyncio.create_task(client.infer("m", {}, timeout_s=20))
            await asyncio.sleep(0.5)
            assert not held.done()  # pongs keep coming: not lost
            fake.incarnation, fake.serving = "second", True
            started = time.monotonic()
            with pytest.raises(ControllerLost, match="restarted"):
                await held
            assert time.monotonic() - started < 1.0
            assert client.controller_losses == 0  # never silent
            assert await client.infer("m", {}, timeout_s=5) == {"y": 1}
    finally:
        await fake.close()


async def test_an_idle_client_does_not_ping() -> None:
    port = free_ports("client")["client"]
    fake = ScriptedController(port)
    try:
        async with Client(f"tcp://127.0.0.1:{port}", heartbeat_s=0.1,
                          controller_timeout_s=0.3) as client:
            await client.infer("m", {}, timeout_s=5)
            await asyncio.sleep(0.3)
            before = fake.seen.get("ping", 0)
            await asyncio.sleep(1.0)
            assert fake.seen.get("ping", 0) == before
            assert not client.controller_lost
    finally:
        await fake.close()


def test_liveness_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        Client(heartbeat_s=1.0, controller_timeout_s=1.5)
    with pytest.raises(ValueError):
        Client(heartbeat_s=float("nan"))
    Client(heartbeat_s=0)  # never ping: allowed
