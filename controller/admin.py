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
from controller.router import Router
from controller.world_manager import DrainTarget, FormWorld, Scale, WorldManager
from mesh import codec
from mesh.actor import Actor
from mesh.errors import BadRequest, MeshError
from mesh.messages import ADMIN_COMMANDS, AdminReply, AdminRequest, Fault
from mesh.transport import Pump, bind_socket, make_socket

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Call:
    peer: bytes
    request: AdminRequest


class Admin(Actor):
    def __init__(
        self,
        context: zmq.Context[Any],
        endpoint: str,
        *,
        world_manager: WorldManager,
        routers: dict[str, Router],
        launcher: Launcher,
        snapshot: Callable[[], dict[str, Any]],
        send_worker: Callable[[str, Any], bool] | None = None,
    ) -> None:
        super().__init__("admin")
        self.endpoint = endpoint
        self._wm = world_manager
        self._routers = routers
        self._launcher = launcher
        self._snapshot = snapshot
        self._send_worker = send_worker
        sock = make_socket(context, zmq.ROUTER, max_msg_bytes=1 << 20)
        bind_socket(sock, endpoint)
        self._pump = Pump(sock, self._on_message, name="admin")

    async def on_start(self) -> None:
        self._pump.start()

    async def on_stop(self) -> None:
        self._pump.close()

    def _on_message(self, frames: list[Any]) -> None:
        peer = frames[0]
        try:
            data = codec.unpack_header(codec.frame_buffer(frames[-1]))
            if not isinstance(data, dict):
                raise BadRequest("admin request must be a map")
            request = AdminRequest.from_wire(data)
            if not isinstance(request.args, dict) or not isinstance(request.command, str):
                raise BadRequest("admin 'command' must be a string and 'args' a map")
            if request.v != 1:
                raise BadRequest(f"admin protocol version {request.v!r} is not supported")
        except (MeshError, TypeError) as exc:
            self._reply(peer, AdminReply(id=-1, ok=False, code="bad_request", message=str(exc)))
            return
        self.tell(_Call(peer, request))

    def _reply(self, peer: bytes, reply: AdminReply) -> None:
        self._pump.send([peer, codec.pack(reply.to_wire())])

    async def handle(self, message: Any) -> None:
        if not isinstance(message, _Call):
            return
        req = message.request
        try:
            result = await self._run(req.command, req.args)
        except MeshError as exc:
            self._reply(message.peer, AdminReply(id=req.id, ok=False, code=exc.code,
                                                 message=exc.message))
            return
        except Exception as exc:
            log.exception("[controller] admin command %s failed", req.command)
            self._reply(message.peer, AdminReply(id=req.id, ok=False, code="internal",
                                                 message=f"{type(exc).__name__}: {exc}"))
            return
        self._reply(message.peer, AdminReply(id=req.id, ok=True, result=result))

    async def _run(self, command: str, args: dict[str, Any]) -> Any:
        if command not in ADMIN_COMMANDS:
            raise BadRequest(f"unknown admin command {command!r}; known: {sorted(ADMIN_COMMANDS)}")
        if command == "ping":
            return "pong"
        if command == "status":
            return self._snapshot()
        if command == "scale":
            return await self._wm.ask(Scale(
                deployment=_str(args, "deployment"),
                worlds=_opt_int(args, "worlds"),
                min_worlds=_opt_int(args, "min_worlds"),
                max_worlds=_opt_int(args, "max_worlds"),
            ), timeout_s=10.0)
        if command == "slo":
            name = _str(args, "deployment")
            router = self._routers.get(name)
            if router is None:
                raise BadRequest(f"no deployment named {name!r}")
            p99 = args.get("p99_ms")
            if isinstance(p99, bool) or not isinstance(p99, int | float) or not 0 < p99 <= 3.6e6:
                raise BadRequest(f"p99_ms must be a positive number of milliseconds, got {p99!r}")
            router.slo_p99_ms = float(p99)
            log.info("[controller] %s latency target set to p99 %.1f ms", name, p99)
            return {"deployment": name, "slo_p99_ms": float(p99)}
        if command == "form":
            workers = args.get("workers")
            if not isinstance(workers, list) or not all(isinstance(w, str) for w in workers):
                raise BadRequest("argument 'workers' must be a list of worker ids")
            return await self._wm.ask(FormWorld(_str(args, "deployment"), tuple(workers)),
                                      timeout_s=10.0)
        if command == "drain":
            return await self._wm.ask(DrainTarget(_str(args, "target")), timeout_s=10.0)
        if command == "fault":
            worker_id = _str(args, "worker")
            if worker_id == "controller":
                return self._stall(args.get("stall_ms"))
            delay = args.get("delay_ms", 0.0)
            if isinstance(delay, bool) or not isinstance(delay, int | float) or \
                    not 0 <= delay <= 600_000:
                raise BadRequest("delay_ms must be a number of milliseconds in [0, 600000]")
            worker = self._wm.workers.get(worker_id)
            if worker is None or worker.state == "dead" or self._send_worker is None or \
                    not self._send_worker(worker_id, Fault(delay_ms=float(delay))):
                raise BadRequest(f"worker {worker_id!r} is not live")
            log.warning("[controller] fault injected: worker %s computes %.0f ms slower",
                        worker_id, delay)
            return {"worker": worker_id, "delay_ms": float(delay)}
        if command == "kill":
            worker_id = _str(args, "worker")
            pid = self._launcher.pids().get(worker_id)
            if pid is None or not self._launcher.kill(worker_id):
                raise BadRequest(f"worker {worker_id!r} is not a live process of this "
                                 "controller's launcher")
            log.warning("[controller] SIGKILL sent to worker %s (pid %d) by operator", worker_id,
                        pid)
            return {"killed": worker_id, "pid": pid}
        raise BadRequest(f"unhandled command {command!r}")  # pragma: no cover


    def _stall(self, stall_ms: Any) -> dict[str, Any]:
        """Fault injection: block the controller's own event loop, as a long synchronous call
        would (game days: does a stalled controller blame its workers?). The stall runs in an
        I/O callback, where a slow message handler would block (the case where, once it
        returns, timers run before the sockets are read again), just after this reply."""
        if isinstance(stall_ms, bool) or not isinstance(stall_ms, int | float) or \
                not 0 < stall_ms <= 60_000:
            raise BadRequest("stall_ms must be a number of milliseconds in (0, 60000]")
        log.warning("[controller] fault injected: the controller's loop stalls for %.0f ms",
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


def _str(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"argument {key!r} must be a non-empty string")
    return value


def _opt_int(args: dict[str, Any], key: str) -> int | None:
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"argument {key!r} must be an integer")
    return value
