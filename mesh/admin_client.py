"""A small client for the admin socket, used by meshctl and by tests."""

from __future__ import annotations

import itertools
from typing import Any

import zmq
import zmq.asyncio

from mesh import codec
from mesh.errors import DeadlineExceeded, error_from_wire
from mesh.messages import AdminReply, AdminRequest
from mesh.security import ClientKeys

_ids = itertools.count(1)


async def admin_call(endpoint: str, command: str, args: dict[str, Any] | None = None, *,
                     timeout_s: float = 10.0, curve: ClientKeys | None = None) -> Any:
    """Send one admin command and return its result; raise the typed error it answered.
    ``curve``: this admin's keys, for a controller with CURVE on."""
    context = zmq.asyncio.Context()
    sock: zmq.asyncio.Socket = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(sock)
    try:
        sock.connect(endpoint)
        req = AdminRequest(id=next(_ids), command=command, args=args or {})
        await sock.send(codec.pack(req.to_wire()))
        if not await sock.poll(timeout=int(timeout_s * 1000)):
            raise DeadlineExceeded(f"no answer from the controller at {endpoint} within "
                                   f"{timeout_s:g}s (is it running?)")
        frames = await sock.recv_multipart()
        reply = AdminReply.from_wire(codec.unpack_header(frames[-1]))
    finally:
        sock.close(linger=0)
        context.term()
    if not reply.ok:
        raise error_from_wire(reply.code, reply.message)
    return reply.result
