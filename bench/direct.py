"""A client that talks to one worker directly over ZeroMQ, with no controller in between.

It binds the ROUTER socket a worker connects to, answers the worker's registration, has it
join a one-rank world of the given deployment, and then sends requests exactly as the
controller would (the same dispatch header, the client's own header and tensor frames). It
exposes the same ``infer`` as ``mesh.client.Client``, so one load loop drives both paths and
the difference between them is what the controller costs. Like the controller, it sends what
one loop iteration dispatched as one message: the worker's side of both paths is the same.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
from typing import Any

import zmq

from mesh import codec, dataplane
from mesh.errors import DeadlineExceeded, error_from_wire
from mesh.messages import (
    WORKER_MESSAGES,
    ClientKind,
    Join,
    Joined,
    Register,
    Welcome,
    parse_control,
    request_header,
)
from mesh.spec import DeploymentSpec
from mesh.transport import Pump, make_socket


class DirectWorker:
    """One worker subprocess, driven directly (bench only)."""

    def __init__(self, port: int, deployment: dict[str, Any], *, threads: int = 1,
                 device: str = "cpu") -> None:
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.deployment = deployment
        self.threads = threads
        self.device = device
        self.worker_id = f"direct-{os.getpid()}"
        self._context: zmq.Context[Any] = zmq.Context()
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ready = asyncio.Event()
        self._joined = asyncio.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self._pump: Pump | None = None
        self.inputs_spec: dict[str, Any] = {}
        self._entry = b""  # the world runner's socket, from Joined
        self._packed = False  # it reads packed dispatch batches (its Joined)
        self._outbox: list[tuple[int, int, list[Any]]] = []  # (rid, deadline ms, frames)
        self._closed = False

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    async def start(self, timeout_s: float = 120.0) -> None:
        sock = make_socket(self._context, zmq.ROUTER)
        sock.bind(self.endpoint)
        pump = self._pump = Pump(sock, self._on_message, name="direct", copy_prefix=3)
        pump.start()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--controller", self.endpoint, "--worker-id",
             self.worker_id, "--device", self.device, "--threads", str(self.threads),
             "--parent-pid", str(os.getpid())],
            stdin=subprocess.DEVNULL)
        async with asyncio.timeout(timeout_s):
            await self._ready.wait()
            spec = DeploymentSpec(**self.deployment)
            pump.send([self.worker_id.encode(), codec.pack(
                Join(world_id=1, epoch=1, rank=0, size=1, deployment=spec).to_wire())])
            await self._joined.wait()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._pump is not None:
            self._pump.close()
        self._context.term()

    def _on_message(self, frames: list[Any]) -> None:
        if dataplane.is_data(codec.frame_buffer(frames[1])):
            data = dataplane.unpack(frames[1])
            if type(data) is dataplane.Hello:
                assert self._pump is not None
                self._pump.send([frames[0], dataplane.HELLO_ECHO])  # as the controller's Backend
                return
            for reply, part in dataplane.replies(data, frames[2:]):
                self._answer(reply, part)
            return
        msg = parse_control(codec.unpack_header(frames[1]), WORKER_MESSAGES)
        if isinstance(msg, Register):
            assert self._pump is not None  # messages only come after start()
            self._pump.send([frames[0], codec.pack(Welcome(
                heartbeat_interval_ms=200, controller_timeout_ms=3_600_000,
                packed_replies=True).to_wire())])
            self._ready.set()
        elif isinstance(msg, Joined):
            self._entry = msg.entry.encode()
            self._packed = msg.packed_dispatches
            self.inputs_spec = msg.inputs
            self._joined.set()

    def _answer(self, reply: dataplane.Reply, frames: list[Any]) -> None:
        fut = self._calls.pop(reply.rid, None)
        if fut is None or fut.done():
            return
        header = codec.unpack_header(codec.frame_buffer(frames[0]))
        if reply.status == dataplane.ERROR:
            fut.set_exception(error_from_wire(header.get("code", ""), header.get("message", "")))
        else:
            body = codec.decode_tensors(header, frames, codec.to_numpy)
            fut.set_result(body.get("outputs", {}))

    def _flush(self) -> None:
        """Send what this loop iteration dispatched as one message, as the controller does."""
        held, self._outbox = self._outbox, []
        assert self._pump is not None
        if len(held) == 1:
            rid, deadline_ms, frames = held[0]
            self._pump.send([self._entry, dataplane.pack_dispatch(rid, 1, 1, deadline_ms),
                             *frames])
            return
        if self._packed:
            self._pump.send([self._entry, *dataplane.pack_dispatches(1, 1, held)])
            return
        items = [(rid, deadline_ms, len(frames)) for rid, deadline_ms, frames in held]
        self._pump.send([self._entry, dataplane.pack_dispatch_batch(1, 1, items),
                         *[f for _, _, frames in held for f in frames]])

    async def infer(self, model: str, inputs: dict[str, Any], *, timeout_s: float = 30.0,
                    params: dict[str, Any] | None = None) -> dict[str, Any]:
        rid = next(self._ids)
        frames = codec.encode(request_header(ClientKind.INFER, rid, model, inputs,
                                             int(timeout_s * 1000), params))
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._calls[rid] = fut
        if self._pump is None:
            raise RuntimeError("DirectWorker is not started")
        if not self._outbox:
            loop.call_soon(self._flush)
        self._outbox.append((rid, int(timeout_s * 1000), frames))
        try:
            async with asyncio.timeout(timeout_s + 2.0):
                return await fut
        except TimeoutError:
            raise DeadlineExceeded("direct worker did not answer") from None
        finally:
            self._calls.pop(rid, None)
