"""What every meshctl command shares: running a coroutine, the caller's CURVE keys, one
admin call, a client of the controller."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from mesh.loop import run as run_loop

DEFAULT_ADMIN = "tcp://127.0.0.1:5556"
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return run_loop(coro)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def curve(args: argparse.Namespace) -> Any:
    """This caller's CURVE keys (--key, --controller-key), or None without them."""
    from mesh.security import client_keys

    return client_keys(args.global_key, args.global_controller_key)


def admin(args: argparse.Namespace, command: str, call_args: dict[str, Any]) -> Any:
    """One admin command's result (the controller's typed error is raised)."""
    from mesh.admin_client import admin_call
    from mesh.ports import require_listening

    require_listening(args.admin, "--admin or MESH_ADMIN")
    return run(admin_call(args.admin, command, call_args, timeout_s=args.admin_timeout_s,
                          curve=curve(args)))


def client(args: argparse.Namespace, *, fail_fast: bool = True) -> Any:
    """A Client of ``--endpoint``; ``fail_fast``: a controller that stops answering fails a
    call in about 2 s, not at its deadline (one-shot commands)."""
    from mesh.client import Client

    liveness: dict[str, Any] = {"heartbeat_s": 0.5, "controller_timeout_s": 2.0} \
        if fail_fast else {}
    return Client(args.endpoint, key=args.global_key or None,
                  controller_key=args.global_controller_key or None, **liveness)


def add_endpoint(p: argparse.ArgumentParser) -> None:
    import os

    p.add_argument("--endpoint", default=os.environ.get("MESH_ENDPOINT", DEFAULT_ENDPOINT),
                   help="the controller's client endpoint (env MESH_ENDPOINT)")
