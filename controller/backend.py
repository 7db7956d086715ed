"""The Backend: the worker-facing ROUTER socket.

Sorts what workers send: data-path replies (frame 0 a msgpack array; one answer, or a batch
of them) go straight to the router of the world they answer for; heartbeats go to Health;
every other control message goes to the WorldManager's mailbox. ROUTER_MANDATORY makes a
send to a worker that is gone fail at once (the router then re-queues the request) instead
of vanishing silently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from controller.router import Router
from mesh import codec, dataplane
from mesh.errors import BadRequest
from mesh.logs import speaker
from mesh.messages import WORKER_MESSAGES, Heartbeat, Message, parse_control
from mesh.security import ServerKeys
from mesh.transport import Pump, bind_socket, make_socket

log = speaker(logging.getLogger(__name__), "controller")


def _ignore(worker_id: str, message: Any) -> None:
    return None


def _no_route(world_id: int) -> Router | None:
    return None


class Backend:
    def __init__(self, context: zmq.Context[Any], endpoint: str, *,
                 curve: ServerKeys | None = None,
                 after_batch: Callable[[], None] | None = None) -> None:
        self.endpoint = endpoint
        # Run what a batch of replies made the frontend hold: its answers go to their clients
        # before the next message is read (controller/held_sends.py).
        self._after_batch = after_batch or (lambda: None)
        # world id -> the router of its deployment (controller/routers.py ``by_world``).
        self._route: Callable[[int], Router | None] = _no_route
        self._on_heartbeat: Callable[[str, Heartbeat], None] = _ignore
        self._on_control: Callable[[str, Message], None] = _ignore
        sock = make_socket(context, zmq.ROUTER, curve=curve)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        bind_socket(sock, endpoint)
        self.pump = Pump(sock, self._on_message, name="backend", copy_prefix=3)
        self.unroutable = 0  # data-path frames for no known world, or malformed
        self.rejected = 0  # control messages that did not decode or type-check
        self._rejected_logged_s = 0.0

    def start(self, *, route: Callable[[int], Router | None],
              on_heartbeat: Callable[[str, Heartbeat], None],
              on_control: Callable[[str, Message], None]) -> None:
        """Start delivering: replies to the router ``route`` names for their world,
        heartbeats and other control messages to these callbacks."""
        self._route = route
        self._on_heartbeat = on_heartbeat
        self._on_control = on_control
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
        first = codec.frame_buffer(frames[1])
        if dataplane.is_data(first):
            head = dataplane.unpack(first)
            if type(head) is dataplane.Reply or type(head) is dataplane.PackedReplyBatch or \
                    type(head) is dataplane.ReplyBatch:
                router = self._route(head.world_id)
                answers = dataplane.replies(head, frames[2:]) if router is not None else []
                if answers:
                    sender = frames[0]
                    for reply, part in answers:
                        router.on_reply(reply, part, sender)  # type: ignore[union-attr]
                    if len(answers) > 1:
                        self._after_batch()
                    return
            elif type(head) is dataplane.Hello:
                # A world runner's socket announcing itself: echo, so it knows that its
                # identity is routable from here before its world is called joined.
                self.pump.send([frames[0], dataplane.HELLO_ECHO])
                return
            self.unroutable += 1
            return
        worker_id = frames[0].decode(errors="replace")
        try:
            message = parse_control(codec.unpack_header(first), WORKER_MESSAGES)
        except BadRequest as exc:
            self._reject(worker_id, exc.message)
            return
        if isinstance(message, Heartbeat):
            self._on_heartbeat(worker_id, message)
        else:
            self._on_control(worker_id, message)

    def _reject(self, worker_id: str, why: str) -> None:
        """Drop a control message that does not fit its type; count it, and say so at most
        once a second (a sender that keeps at it must not flood the log)."""
        self.rejected += 1
        now = time.monotonic()
        if now - self._rejected_logged_s >= 1.0:
            self._rejected_logged_s = now
            log.warning("dropped a message from worker %s: %s (%d dropped so far)",
                        worker_id[:64], why, self.rejected)
