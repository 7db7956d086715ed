"""Client connections: counted from the client socket's monitor, and shed beyond a cap.

ZeroMQ accepts every TCP connection on a ROUTER and offers no limit of its own; each holds a
descriptor, and a controller at its descriptor limit answers nobody (new clients, admin,
/metrics) and logs nothing. This watcher reads the socket's monitor events (accepted,
disconnected) to keep the count, and shuts down a connection accepted beyond
``max_client_connections`` at once (``shutdown`` on a duplicate of its descriptor: libzmq sees
the peer go and closes its own side cleanly). Shedding is logged at most every 10 s and
counted (``client_connections_refused``), so an operator sees who is knocking.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from mesh.logs import speaker
from mesh.transport import Pump

log = speaker(logging.getLogger(__name__), "controller")

_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED


class ConnectionWatch:
    def __init__(self, sock: zmq.Socket[Any], cap: int, name: str = "client") -> None:
        self.cap = cap
        self.name = name
        self.open = 0
        self.peak = 0
        self.refused = 0
        self._logged_s = 0.0
        self._sock = sock
        self._pump = Pump(sock.get_monitor_socket(_EVENTS), self._on_event,
                          name=f"{name}-monitor")

    def start(self) -> None:
        self._pump.start()

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass  # the socket is already closed
        self._pump.close()

    def _on_event(self, frames: list[Any]) -> None:
        try:
            event = parse_monitor_message([bytes(f) for f in frames])
        except (ValueError, IndexError):
            return
        if event["event"] == zmq.EVENT_ACCEPTED:
            self.open += 1
            self.peak = max(self.peak, self.open)
            if self.open > self.cap:
                self._shed(int(event["value"]))
        elif event["event"] == zmq.EVENT_DISCONNECTED:
            self.open = max(0, self.open - 1)

    def _shed(self, fd: int) -> None:
        self.refused += 1
        try:
            dup = os.dup(fd)
        except OSError:
            return  # already gone
        try:
            with socket.socket(fileno=dup) as conn:
                conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        now = time.monotonic()
        if now - self._logged_s >= 10.0:
            self._logged_s = now
            log.warning("%d %s connections open, over max_%s_connections = %d: new ones are "
                        "closed at once (%d so far)", self.open, self.name, self.name, self.cap,
                        self.refused)
