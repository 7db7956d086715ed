"""The Admin API: a ROUTER socket taking ``AdminRequest`` maps from meshctl.

Requests are handled one at a time in the Admin actor's mailbox (so a status snapshot never
sees a half-applied scale), and every request gets exactly one ``AdminReply``: a result, or a
typed error code and message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from controller.launcher import Launcher
from mesh import codec
from mesh.actor import Actor
from mesh.errors import BadRequest, MeshError, excerpt
from mesh.logs import speaker
from mesh.messages import (
    ADMIN_ARGS,
    PROTOCOL_VERSION,
    AdminReply,
    AdminRequest,
    FaultArgs,
    KillArgs,
    NoArgs,
)
from mesh.security import ServerKeys
from mesh.transport import Pump, bind_socket, make_socket

log = speaker(logging.getLogger(__name__), "controller")


@dataclass(frozen=True, slots=True)
class _Call:
    peer: bytes
    request: AdminRequest
    args: Any  # the command's typed arguments (mesh.messages ADMIN_ARGS)


class Admin(Actor):
    def __init__(
        self,
        context: zmq.Context[Any],
        endpoint: str,
        *,
        fleet: Actor,
        launcher: Launcher,
        snapshot: Callable[[], dict[str, Any]],
        curve: ServerKeys | None = None,
    ) -> None:
        super().__init__("admin")
        self.endpoint = endpoint
        self._fleet = fleet  # the WorldManager: the fleet's commands are asked of it
        self._launcher = launcher
        self._snapshot = snapshot
        sock = make_socket(context, zmq.ROUTER, max_msg_bytes=1 << 20, curve=curve)
        bind_socket(sock, endpoint)
        self._pump = Pump(sock, self._on_message, name="admin")

    @property
    def pump(self) -> Pump:
        return self._pump

    async def on_start(self) -> None:
        self._pump.start()

    async def on_stop(self) -> None:
        self._pump.close()

    def close(self) -> None:
        """Release the socket of an Admin that never started (the controller failed first)."""
        self._pump.close()

    def _on_message(self, frames: list[Any]) -> None:
        peer = frames[0]
        request_id = -1
        try:
            data = codec.unpack_header(codec.frame_buffer(frames[-1]))
            request = AdminRequest.from_wire(data)
            request_id = request.id
            if request.v != PROTOCOL_VERSION:
                raise BadRequest(f"admin protocol version {request.v} is not supported")
            kind = ADMIN_ARGS.get(request.command)
            if kind is None:
                raise BadRequest(f"unknown admin command {excerpt(request.command)}; "
                                 f"known: {sorted(ADMIN_ARGS)}")
            args = AdminRequest.args_of(request.command, request.args, kind)
        except MeshError as exc:
            self._reply(peer, AdminReply(id=request_id, ok=False, code=exc.code,
                                         message=exc.message))
            return
        self.tell(_Call(peer, request, args))

    def _reply(self, peer: bytes, reply: AdminReply) -> None:
        self._pump.send([peer, codec.pack(reply.to_wire())])

    async def handle(self, message: _Call) -> None:
        req = message.request
        try:
            result = await self._run(req.command, message.args)
        except MeshError as exc:
            self._reply(message.peer, AdminReply(id=req.id, ok=False, code=exc.code,
                                                 message=exc.message))
            return
        except Exception as exc:
            log.exception("admin command %s failed", req.command)
            self._reply(message.peer, AdminReply(id=req.id, ok=False, code="internal",
                                                 message=f"{type(exc).__name__}: {exc}"))
            return
        self._reply(message.peer, AdminReply(id=req.id, ok=True, result=result))

    async def _run(self, command: str, args: Any) -> Any:
        """One command: the controller process's own here; the fleet's go to the
        WorldManager as they are (controller/fleet_commands.py)."""
        match args:
            case NoArgs():
                return "pong" if command == "ping" else self._snapshot()
            case KillArgs(worker):
                pid = self._launcher.pids().get(worker)
                if pid is None or not self._launcher.kill(worker):
                    raise BadRequest(f"worker {excerpt(worker)} is not a live process of "
                                     "this controller's launcher")
                log.warning("SIGKILL sent to worker %s (pid %d) by operator", worker, pid)
                return {"killed": worker, "pid": pid}
            case FaultArgs(worker="controller", stall_ms=stall_ms):
                if stall_ms is None:
                    raise BadRequest("fault controller needs stall_ms")
                return self._stall(stall_ms)
            case _:
                return await self._fleet.ask(args, timeout_s=10.0)

    def _stall(self, stall_ms: float) -> dict[str, Any]:
        """Fault injection: block the controller's own event loop, as a long synchronous call
        would (game days: does a stalled controller blame its workers?). The stall runs in an
        I/O callback, where a slow message handler would block (the case where, once it
        returns, timers run before the sockets are read again), just after this reply."""
        log.warning("fault injected: the controller's loop stalls for %.0f ms",
                    stall_ms)
        loop = asyncio.get_running_loop()
        wake_r, wake_w = os.pipe()

        def stall() -> None:
            loop.remove_reader(wake_r)
            os.close(wake_r)
            time.sleep(stall_ms / 1000.0)

        def start() -> None:
            os.write(wake_w, b"\x01")
            os.close(wake_w)

        loop.add_reader(wake_r, stall)
        loop.call_later(0.05, start)
        return {"controller": "stalled", "stall_ms": float(stall_ms)}
