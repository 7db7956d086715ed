"""The worker's link to the controller: one DEALER socket, control messages and the data path.

Incoming frames are sorted by frame 0: a msgpack array is a data-path dispatch (answered
through the executor), a map is a control message (handed to the agent). The link never
blocks: sends are non-blocking, receives come from the socket's FD callback (mesh.transport).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import zmq

from mesh import codec
from mesh.errors import BadRequest
from mesh.messages import (
    CONTROLLER_MESSAGES,
    REPLY,
    REPLY_CHUNK,
    REPLY_ERROR,
    REPLY_OK,
    Message,
    error_header,
    parse_control,
)
from mesh.transport import Pump, make_socket

log = logging.getLogger(__name__)

OnDispatch = Callable[[list[Any], list[Any]], None]  # (routing array, frames[1:])
OnControl = Callable[[Message], None]


class Link:
    def __init__(
        self,
        context: zmq.Context[Any],
        endpoint: str,
        worker_id: str,
        *,
        on_dispatch: OnDispatch,
        on_control: OnControl,
    ) -> None:
        self.endpoint = endpoint
        self.worker_id = worker_id
        self._on_dispatch = on_dispatch
        self._on_control = on_control
        sock = make_socket(context, zmq.DEALER, identity=worker_id.encode())
        sock.connect(endpoint)
        self._pump = Pump(sock, self._on_message, name=f"link {worker_id}")

    def start(self) -> None:
        self._pump.start()

    def close(self) -> None:
        self._pump.close()

    def send(self, message: Message) -> None:
        self._pump.send([codec.pack(message.to_wire())])

    def send_result(self, rid: Any, world_id: int, epoch: int, client_header: dict[str, Any],
                    *, chunk: bool = False) -> None:
        frames = codec.encode(client_header)
        status = REPLY_CHUNK if chunk else REPLY_OK
        self._pump.send([codec.pack([REPLY, rid, world_id, epoch, status]), *frames])

    def send_error(self, rid: Any, world_id: int, epoch: int, client_id: Any, code: str,
                   message: str, retryable: bool) -> None:
        header = codec.pack(error_header(client_id, code, message, retryable))
        self._pump.send([codec.pack([REPLY, rid, world_id, epoch, REPLY_ERROR]), header])

    def _on_message(self, frames: list[Any]) -> None:
        try:
            head = codec.unpack_header(codec.frame_buffer(frames[0]))
        except BadRequest:
            log.warning("[worker %s] dropped a message whose header is not msgpack", self.worker_id)
            return
        if isinstance(head, list):
            self._on_dispatch(head, frames[1:])
            return
        try:
            message = parse_control(head, CONTROLLER_MESSAGES)
        except BadRequest as exc:
            log.warning("[worker %s] dropped a control message: %s", self.worker_id, exc)
            return
        self._on_control(message)
