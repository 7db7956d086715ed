"""Worker process entry point: ``python -m worker`` and ``meshctl worker``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import uuid

from mesh import gc_policy
from mesh.loop import run as run_loop
from mesh.security import ClientKeys, client_keys
from worker import lifeline
from worker.agent import WorkerAgent

log = logging.getLogger(__name__)


def pick_device(requested: str) -> str:
    """``auto`` picks CUDA when present (the launcher pins one GPU per worker), else CPU."""
    if requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def run_worker(controller: str, worker_id: str, device: str, threads: int,
                     labels: dict[str, str], advertise_host: str = "127.0.0.1",
                     curve: ClientKeys | None = None, exit_on_controller_loss: bool = False
                     ) -> int:
    agent = WorkerAgent(controller=controller, worker_id=worker_id, device=pick_device(device),
                        threads=threads, labels=labels, advertise_host=advertise_host,
                        curve=curve, exit_on_controller_loss=exit_on_controller_loss)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, agent.stop, f"signal {signal.Signals(sig).name}")
    gc_policy.tune()
    await agent.start()
    gc_policy.freeze()  # torch's modules and the worker's own: they live for good
    stop = asyncio.ensure_future(agent.stopped.wait())
    crash = asyncio.ensure_future(agent.failed.wait())
    try:
        await asyncio.wait({stop, crash}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        crash.cancel()
        await agent.aclose()
    return 1 if agent.failure is not None else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--controller", default="tcp://127.0.0.1:5557",
                        help="the controller's worker endpoint (default %(default)s)")
    parser.add_argument("--worker-id", default="", help="unique id (default: HOST-PID-RANDOM)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                        help="labels reported to the controller")
    parser.add_argument("--advertise-host", default="127.0.0.1",
                        help="this host's address as other workers reach it: its rendezvous "
                             "store and its gloo connections listen there (default "
                             "%(default)s: one host only)")
    parser.add_argument("--key", default="",
                        help="this worker's CURVE key pair (NAME.key_secret), when the "
                             "controller has [security] curve = true")
    parser.add_argument("--controller-key", default="",
                        help="the controller's public key (NAME.key)")
    parser.add_argument("--exit-on-controller-loss", action="store_true",
                        help="exit when the controller is silent for controller_timeout_ms "
                             "(default: stop serving and keep registering until one answers)")
    parser.add_argument("--parent-pid", type=int, default=0,
                        help="exit when this process (the launching controller) dies")


def follow_parent(parent_pid: int) -> None:
    """Die with the launching controller: SIGTERM on parent death (Linux), checked once now."""
    lifeline.follow(parent_pid, signal.SIGTERM, "launching controller")


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def run_from_args(args: argparse.Namespace, *, forked: bool = False) -> int:
    """Run a worker until it is told to stop; ends the process (os._exit) with its code.

    ``forked``: this process is a fork server's child (worker/fork_child.py), which dies with
    its parent, the server, and the server with the controller; ``--parent-pid`` (the
    controller) is then not its parent.

    Why os._exit: a world's runner may still sit in a gloo wait for a peer that neither
    answers nor closes (it ends at the world's timeout). Python does not join such daemon
    threads at exit, and finalization then destroys C++ objects that own running threads:
    'terminate called without an active exception' and a -6 exit. The worker has already
    answered, left its worlds and closed its sockets; nothing of worth is left to finalize.
    """
    # A stop that comes while the worker still starts (importing torch takes seconds) is a
    # clean exit too; the event loop installs its own handlers once it runs.
    signal.signal(signal.SIGTERM, _exit_quietly)
    signal.signal(signal.SIGINT, _exit_quietly)
    if not forked:
        follow_parent(args.parent_pid)
    labels = dict(item.split("=", 1) for item in args.label if "=" in item)
    worker_id = args.worker_id or default_worker_id()
    logging.basicConfig(
        level=os.environ.get("MESH_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s %(levelname)s [worker {worker_id}] %(name)s: %(message)s",
    )
    curve = client_keys(args.key, args.controller_key)
    coro = run_worker(args.controller, worker_id, args.device, args.threads, labels,
                      args.advertise_host, curve,
                      exit_on_controller_loss=args.exit_on_controller_loss)
    try:
        code = run_loop(coro)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    # Stopping: a second signal must not turn a clean exit into a killed one.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log.info("[worker %s] exiting with %d", worker_id, code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None, *, forked: bool = False) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv), forked=forked)
