"""Running a controller as a process: signals, readiness line, graceful stop, exit code.

SIGINT or SIGTERM starts a graceful stop: no new requests, in-flight ones finish (up to
``drain_timeout_ms``), every worker is stopped by PID, and the process exits 0. A second signal
skips the drain.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import resource
import signal
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.app import Controller, LauncherFactory, local_launcher
from controller.config import Config
from controller.gateway_child import GatewayProcess
from controller.launcher import Launcher, NoLauncher
from mesh import gc_policy
from mesh.errors import MeshError
from mesh.logs import speaker

log = speaker(logging.getLogger(__name__), "controller")


def raise_fd_limit() -> int:
    """Raise this process's descriptor limit to its hard limit: every client, worker and
    runner connection holds one, and at the soft limit (often 1,024) new clients, admin and
    /metrics would get no answer at all. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, exc)
    return soft


def next_steps(config: Config, serving: list[str], *, gateway: bool = False) -> str:
    """What to try now and how to stop, printed under the ready line."""
    c = config.controller
    admin = "" if c.admin_endpoint == "tcp://127.0.0.1:5556" else f" --admin {c.admin_endpoint}"
    endpoint = "" if c.client_endpoint == "tcp://127.0.0.1:5555" else \
        f" --endpoint {c.client_endpoint}"
    lines = [f"  next: meshctl status{admin}"]
    if serving:
        lines.append(f"        meshctl bench {serving[0]} --duration-s 5{endpoint}{admin}"
                     "   (requests shaped as its inputs)")
    if gateway:
        scheme = "https" if config.gateway.tls_cert else "http"
        lines.append(f"        curl {scheme}://{config.gateway.listen}/v1/models   (HTTP: "
                     "OpenAI /v1, KServe v2 /v2)")
    lines.append(f"  stop: Ctrl-C here, or kill -TERM {os.getpid()}: what is in flight is "
                 "answered first, then the workers stop")
    return "\n".join(lines)


async def serve(config: Config, *, wait_ready_s: float = 300.0, with_gateway: bool = False,
                log_level: str = "WARNING", config_path: str = "") -> int:
    """Run the controller (and, for ``meshctl up``, its HTTP gateway) until stopped.
    ``config_path``: the file ``config`` came from, re-read on SIGHUP (and on change, with
    ``watch_config``) and applied as ``meshctl apply`` would."""
    limit = raise_fd_limit()
    log.info("descriptor limit %d", limit)
    launcher_kind = config.controller.launcher
    launcher: LauncherFactory = local_launcher
    if launcher_kind == "kubernetes":
        from controller.kube_launcher import KubernetesLauncher

        def launcher(cfg: Config, on_exit: Callable[[str, int], None]) -> Launcher:
            return KubernetesLauncher(cfg.kubernetes, on_exit=on_exit)
    elif launcher_kind != "local":
        def launcher(cfg: Config, on_exit: Callable[[str, int], None]) -> Launcher:
            return NoLauncher()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hurry = asyncio.Event()
    signals_seen = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        log.info("%s: %s", sig.name,
                 "stopping gracefully" if signals_seen == 1 else "stopping now")
        stop.set()
        if signals_seen > 1:
            hurry.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    gateway = GatewayProcess(config, log_level=log_level) if with_gateway and \
        config.gateway.listen else None
    gc_policy.tune()
    async with Controller.open(config, launcher=launcher) as controller:
        reread = ConfigFile(controller, config_path)
        # SIGHUP: re-read the allowed CURVE keys now (also re-read when a folder changes),
        # and the config file's deployments and routes.
        loop.add_signal_handler(signal.SIGHUP, reread.on_hangup)
        if config_path and config.controller.watch_config:
            reread.watch()
        gc_policy.freeze()  # startup's objects (config, sockets, routers) live for good
        supervise: asyncio.Future[None] | None = None
        try:
            if gateway is not None:
                gateway.start()
                supervise = asyncio.ensure_future(gateway.supervise())
            await _until_stopped(controller, config, stop, wait_ready_s,
                                 gateway=gateway is not None)
            if gateway is not None:
                gateway.terminate()  # it finishes its requests while the controller answers
            if signals_seen == 1:
                await _drain(controller, config, hurry)
        finally:
            reread.close()
            if supervise is not None:
                supervise.cancel()
            if gateway is not None:
                gateway.terminate()
                await gateway.wait(15.0)
    return 0


async def _until_stopped(controller: Controller, config: Config, stop: asyncio.Event,
                         wait_ready_s: float, *, gateway: bool) -> None:
    """Say when every deployment serves (or why one cannot), then wait for a stop signal."""
    ready = asyncio.ensure_future(controller.wait_serving(wait_ready_s))
    stopped = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if ready in done and ready.exception() is None:
        down: dict[str, str] = ready.result()
        names = ", ".join(d.name for d in config.deployments if d.name not in down)
        print(f"meshserve ready: serving {names or 'nothing'} on "
              f"{config.controller.client_endpoint} (admin "
              f"{config.controller.admin_endpoint})", file=sys.stderr, flush=True)
        for name, reason in down.items():
            print(f"meshserve: NOT serving {name}: {reason}", file=sys.stderr, flush=True)
        print(next_steps(config, [d.name for d in config.deployments if d.name not in down],
                         gateway=gateway), file=sys.stderr, flush=True)
    elif ready in done:
        log.warning("not every deployment is serving after %.0fs; carrying on", wait_ready_s)
    await stopped
    ready.cancel()


async def _drain(controller: Controller, config: Config, hurry: asyncio.Event) -> None:
    """Answer what is in flight, within drain_timeout_ms; a second signal cuts it short."""
    drain_s = config.controller.drain_timeout_ms / 1000.0
    draining = asyncio.ensure_future(controller.drain(drain_s))
    hurried = asyncio.ensure_future(hurry.wait())
    await asyncio.wait({draining, hurried}, return_when=asyncio.FIRST_COMPLETED)
    hurried.cancel()
    if not draining.done():
        draining.cancel()
        await controller.drain(0.0)  # answer what is left with Cancelled
    elif not draining.result():
        log.warning("drain timed out after %.1fs", drain_s)


class ConfigFile:
    """The controller's config file, applied again on SIGHUP (and when it changes, watched):
    its deployments and routes become the running set, exactly as ``meshctl apply`` of it
    (controller/fleet_apply.py); a file that does not parse changes nothing and is logged."""

    def __init__(self, controller: Controller, path: str) -> None:
        self._controller = controller
        self._path = path
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen = self._digest()

    def on_hangup(self) -> None:
        self._controller.reload_keys()
        if self._path:
            self._spawn(self._apply("SIGHUP"))

    def watch(self) -> None:
        self._spawn(self._watch())

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _digest(self) -> bytes:
        try:
            return hashlib.sha256(Path(self._path).read_bytes()).digest() if self._path else b""
        except OSError:
            return b""

    async def _watch(self) -> None:
        while True:  # a ConfigMap update swaps a symlink: compare contents, not times
            await asyncio.sleep(1.0)
            digest = self._digest()
            if digest and digest != self._seen:
                self._seen = digest
                await self._apply("a change")

    def _read(self) -> dict[str, Any]:
        return tomllib.loads(Path(self._path).read_text())

    async def _apply(self, why: str) -> None:
        try:
            document = self._read()
            answer = await self._controller.apply(document)
        except (OSError, tomllib.TOMLDecodeError, MeshError) as exc:
            log.error("%s: re-reading %s: %s (nothing changed)", why, self._path, exc)
            return
        plan = answer["plan"]
        log.info("%s: applied %s: add %s, roll %s, update %s, remove %s", why, self._path,
                 plan["add"], [r["deployment"] for r in plan["roll"]],
                 [u["deployment"] for u in plan["update"]], plan["remove"])
