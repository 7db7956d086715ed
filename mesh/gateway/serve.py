"""Running the gateway: uvicorn with httptools and uvloop (mesh.gateway.http's guards added),
TLS where configured, and several processes sharing the port where one core is not enough.

Each process is a whole gateway with its own connection to the controller; with ``processes``
above 1 the first starts the others (``--reuse-port``: every process binds the port with
SO_REUSEPORT and the kernel spreads connections over them), passes its stop signal on to them
at once, and they die with it. SIGTERM or SIGINT stops a process gracefully: it stops
accepting, finishes the answers under way (at most ``DRAIN_S``; connections that are only
idle are closed at once), and exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from importlib.util import find_spec
from typing import Any

from controller.config import GatewayConfig
from controller.gateway_child import dies_with_parent
from mesh.client import Client
from mesh.gateway.app import Gateway, api_keys_from
from mesh.gateway.http import HttpLimits, guarded_protocol

log = logging.getLogger(__name__)

DRAIN_S = 10.0


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def listen_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def child_args(argv: list[str]) -> list[str]:
    """This process's command line for a sibling: one process, on the shared port."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--processes":
            skip = True
            continue
        if arg.startswith("--processes="):
            continue
        out.append(arg)
    return [*out, "--processes", "1", "--reuse-port"]


def run(cfg: GatewayConfig, controller: str, *, key: str = "", controller_key: str = "",
        reuse_port: bool = False, argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; the exit code."""
    import uvicorn

    limits = HttpLimits(max_header_bytes=cfg.max_header_bytes,
                        header_timeout_s=cfg.header_timeout_s,
                        max_body_bytes=cfg.max_body_bytes, body_timeout_s=cfg.body_timeout_s)
    client = Client(controller, key=key or None, controller_key=controller_key or None,
                    default_timeout_s=cfg.request_timeout_s)
    host, port = split_listen(cfg.listen)
    scheme = "https" if cfg.tls_cert else "http"

    def ready() -> None:
        print(f"meshserve gateway ready: {scheme}://{cfg.listen} (controller {controller}, "
              f"pid {os.getpid()})", file=sys.stderr, flush=True)

    app = Gateway(client, limits=limits, request_timeout_s=cfg.request_timeout_s,
                  api_keys=api_keys_from(cfg.api_keys_file), on_ready=ready)
    loop = "uvloop" if find_spec("uvloop") is not None else "asyncio"
    config = uvicorn.Config(
        app, http=guarded_protocol(limits), loop=loop, lifespan="on",
        timeout_keep_alive=max(1, round(cfg.keepalive_timeout_s)),
        limit_concurrency=cfg.max_connections, timeout_graceful_shutdown=int(DRAIN_S),
        log_level="warning", access_log=False, server_header=False, proxy_headers=False,
        ssl_certfile=cfg.tls_cert or None, ssl_keyfile=cfg.tls_key or None)
    shared = reuse_port or cfg.processes > 1
    sock = listen_socket(host, port, reuse_port=shared)
    siblings: list[subprocess.Popen[bytes]] = []
    if cfg.processes > 1 and not reuse_port:
        args = child_args(argv if argv is not None else sys.argv[1:])
        for _ in range(cfg.processes - 1):
            siblings.append(subprocess.Popen([sys.executable, "-m", "mesh.cli", *args],
                                             stdin=subprocess.DEVNULL,
                                             preexec_fn=dies_with_parent))
    def pass_on(sig: int) -> None:
        for proc in siblings:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            pass_on(sig)  # the siblings stop with this one, not after it
            super().handle_exit(sig, frame)
            # uvicorn raises the signal again once it has stopped, which would end this
            # process before it reaps its siblings, and with -SIGTERM rather than 0.
            self._captured_signals.clear()

    server = Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        pass_on(signal.SIGTERM)
        for proc in siblings:
            try:
                proc.wait(DRAIN_S + 2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return 0 if server.started else 1

