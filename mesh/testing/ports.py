"""Free TCP ports on loopback, for the controllers, workers and gateways tests and benchmarks
start."""

from __future__ import annotations

import socket


def free_port() -> int:
    """One port free at the time of the call."""
    return free_ports("port")["port"]


def free_ports(*names: str) -> dict[str, int]:
    """Distinct free ports, one per name: all held at once while picked, since the kernel may
    hand out a port again as soon as the socket that had it is closed."""
    socks = [socket.socket() for _ in names]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return {name: int(s.getsockname()[1]) for name, s in zip(names, socks, strict=True)}
    finally:
        for s in socks:
            s.close()
