"""Where a worker's worlds meet: its rendezvous store, and the address its world traffic uses.

A worker runs one TCPStore server (``rendezvous_store``); the worlds whose rank 0 lives on it
meet there, each under a prefix of its own that holds the world's secret token, so a process
that was not told the token cannot meet its ranks. That is all the protection world traffic
has: the store, gloo and NCCL connections are unauthenticated and unencrypted (docs/security.md).
So they listen on the worker's advertise address only, never on every interface.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
import struct
from typing import Any

SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def rendezvous_store(host: str, timeout_s: float) -> Any:
    """A TCPStore server on an ephemeral port of ``host``, listening there only.

    A TCPStore server binds every interface whatever host it is given, so the listening
    socket is made here, bound to ``host``, and handed to the store, which owns it from then
    on."""
    import torch.distributed as dist

    family, kind, proto, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(addr)
        sock.listen(128)
        port = sock.getsockname()[1]
        store = dist.TCPStore(host, port, 1, True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout_s),
                              master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's now: closed with it
    return store


def interface_of(host: str) -> str | None:
    """The network interface whose IPv4 address is ``host`` (Linux), or None."""
    try:
        wanted = socket.gethostbyname(host)
    except OSError:
        return None
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                answer = fcntl.ioctl(sock.fileno(), SIOCGIFADDR,
                                     struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
        if socket.inet_ntoa(answer[20:24]) == wanted:
            return name
    return None


def pin_nccl_to(host: str) -> None:
    """Make NCCL listen and connect on the interface of ``host`` (the advertise address), as
    gloo and the store do, unless the operator chose one (``NCCL_SOCKET_IFNAME``). NCCL reads
    its settings from the environment when a communicator is made; a worker has one advertise
    address, so setting it for the whole process is what every world of it wants."""
    if "NCCL_SOCKET_IFNAME" in os.environ:
        return
    name = interface_of(host)
    if name is not None:
        os.environ["NCCL_SOCKET_IFNAME"] = f"={name}"  # "=": this name exactly
