"""The Backend: the worker-facing ROUTER socket.

Sorts what workers send: data-path replies (frame 0 a msgpack array) go straight to the
router of the world they answer for; heartbeats go to Health; every other control message
goes to the WorldManager's mailbox. ROUTER_MANDATORY makes a send to a worker that is gone
fail at once (the router then re-queues the request) instead of vanishing silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import zmq

from controller.router import Router
from mesh import codec
from mesh.errors import BadRequest
from mesh.messages import HELLO, REPLY, WORKER_MESSAGES, Heartbeat, Message, parse_control
from mesh.transport import Pump, bind_socket, make_socket

log = logging.getLogger(__name__)

_HELLO_ECHO = codec.pack([HELLO])


class Backend:
    def __init__(
        self,
        context: zmq.Context[Any],
        endpoint: str,
        *,
        route_of: Callable[[int], Router | None],
        on_heartbeat: Callable[[str, Heartbeat], None],
        on_control: Callable[[str, Message], None],
    ) -> None:
        self.endpoint = endpoint
        self._route_of = route_of
        self._on_heartbeat = on_heartbeat
        self._on_control = on_control
        sock = make_socket(context, zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        bind_socket(sock, endpoint)
        self.pump = Pump(sock, self._on_message, name="backend", copy_prefix=3)
        self.unroutable = 0

    def start(self) -> None:
        self.pump.start()

    def close(self) -> None:
        self.pump.close()

    def send(self, frames: list[Any]) -> bool:
        return self.pump.send(frames)

    def send_control(self, worker_id: str, message: Message) -> bool:
        return self.pump.send([worker_id.encode(), codec.pack(message.to_wire())])

    def _on_message(self, frames: list[Any]) -> None:
        if len(frames) < 2:
            return
        try:
            head = codec.unpack_header(codec.frame_buffer(frames[1]))
        except BadRequest:
            log.warning("[controller] dropped a worker message with a garbage header")
            return
        if isinstance(head, list):
            if len(head) >= 5 and head[0] == REPLY:
                router = self._route_of(head[2])
                if router is not None:
                    router.on_reply(head, frames[2:])
                    return
            elif head and head[0] == HELLO:
                # A world runner's socket announcing itself: echo, so it knows that its
                # identity is routable from here before its world is called joined.
                self.pump.send([frames[0], _HELLO_ECHO])
                return
            self.unroutable += 1
            return
        worker_id = frames[0].decode(errors="replace")
        try:
            message = parse_control(head, WORKER_MESSAGES)
        except BadRequest as exc:
            log.warning("[controller] dropped a message from worker %s: %s", worker_id, exc)
            return
        if isinstance(message, Heartbeat):
            self._on_heartbeat(worker_id, message)
        else:
            self._on_control(worker_id, message)
