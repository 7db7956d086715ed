"""The worker's control link to the controller: one DEALER socket on the event loop.

Registration, heartbeats, joins and leaves travel here; requests and answers travel on the
data plane's own socket (worker/runner.py), so neither can hold up the other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import zmq

from mesh import codec
from mesh.errors import BadRequest
from mesh.messages import CONTROLLER_MESSAGES, Message, parse_control
from mesh.security import ClientKeys
from mesh.transport import Pump, make_socket

log = logging.getLogger(__name__)


class Link:
    def __init__(
        self,
        context: zmq.Context[Any],
        endpoint: str,
        worker_id: str,
        *,
        on_control: Callable[[Message], None],
        curve: ClientKeys | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.worker_id = worker_id
        self._on_control = on_control
        sock = make_socket(context, zmq.DEALER, identity=worker_id.encode(), curve=curve)
        sock.connect(endpoint)
        self._pump = Pump(sock, self._on_message, name=f"link {worker_id}", copy_prefix=1)

    def start(self) -> None:
        self._pump.start()

    def close(self) -> None:
        self._pump.close()

    def send(self, message: Message) -> None:
        self._pump.send([codec.pack(message.to_wire())])

    def _on_message(self, frames: list[Any]) -> None:
        try:
            head = codec.unpack_header(frames[0])
            message = parse_control(head, CONTROLLER_MESSAGES)
        except BadRequest as exc:
            log.warning("[worker %s] dropped a control message: %s", self.worker_id, exc)
            return
        self._on_control(message)
