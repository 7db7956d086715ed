"""Worker start: how fast new workers serve, and what each one costs in memory.

    python -m bench.startup [--runs 5] [--worlds 4] [--fork-workers on|off] [--json F]

A real controller (subprocess) serves the one-stage ``mlp`` with no warm pool
(``warm_workers = 0``) and no autoscaler, so every new world needs a new worker process. Each
run, from one world serving with one worker:

1. scale-up: ``scale mlp --worlds N`` (the admin API), timed from the command until status
   shows N worlds serving;
2. memory: each worker's RSS, PSS and USS (private pages) from ``/proc/PID/smaps_rollup``,
   and the fork server's (``fork_workers``): its pages are shared with every worker it forked,
   so the total PSS of workers and server is the honest cost of the whole fleet;
3. kill recovery: one serving worker SIGKILLed by its PID, timed until status shows N worlds
   serving again, none with the killed worker;
4. back to one world, and waiting until the other workers have exited.

Status is polled every ``--poll-ms``; each time is the first poll that saw the state, so it is
late by at most one poll and one status round trip (a few ms). ``--fork-workers`` writes
``fork_workers`` into the config (left out: the controller's default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mesh.admin_client import admin_call
from mesh.errors import MeshError
from mesh.loop import run as run_loop
from mesh.testing.configs import Value, deployment, write_config
from mesh.testing.ports import free_ports
from mesh.testing.processes import alive, end_processes, pids_with, start_controller


def config(path: Path, ports: dict[str, int], worlds: int, fork: str) -> Path:
    """No warm pool and no autoscaler (the kit's defaults), one torch thread a worker."""
    settings: dict[str, Value] = {"worker_threads": 1}
    if fork:
        settings["fork_workers"] = fork == "on"
    return write_config(path, ports, deployment("mlp", "worker.models.mlp:build", stages=1,
                                                worlds=1, min_worlds=1, max_worlds=worlds),
                        **settings)


def memory(pid: int) -> dict[str, int]:
    """RSS, PSS and USS (private clean + dirty) of one process, in KiB; {} if it is gone."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        return {}
    return {"rss_kib": fields.get("Rss", 0), "pss_kib": fields.get("Pss", 0),
            "uss_kib": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)}


def fork_server_pid(controller_pid: int) -> int:
    """The controller's fork server (worker/forkserver.py), or 0."""
    found = pids_with(f"worker.forkserver --parent-pid {controller_pid} ")
    return found[0] if found else 0


async def poll(admin: str, done: Any, timeout_s: float, poll_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status = await admin_call(admin, "status", timeout_s=2.0)
            if done(status):
                return status
        except MeshError:
            pass
        await asyncio.sleep(poll_s)
    raise TimeoutError("the controller did not reach the state in time")


def serving_worlds(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [w for w in status["worlds"] if w["state"] == "serving"]


async def one_run(admin: str, ctrl_pid: int, worlds: int, poll_s: float) -> dict[str, Any]:
    started = time.monotonic()
    await admin_call(admin, "scale", {"deployment": "mlp", "worlds": worlds})
    status = await poll(admin, lambda s: len(serving_worlds(s)) >= worlds, 60.0, poll_s)
    scale_s = time.monotonic() - started

    pids = [w["pid"] for w in status["workers"] if w["pid"]]
    server = fork_server_pid(ctrl_pid)
    mem = {"workers": [memory(p) for p in pids], "server": memory(server) if server else {}}

    victim = next(w for w in status["workers"] if w["state"] == "serving")
    killed = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    await poll(admin, lambda s: len(serving_worlds(s)) >= worlds and not any(
        victim["id"] in w["workers"] for w in serving_worlds(s)), 60.0, poll_s)
    recover_s = time.monotonic() - killed

    await admin_call(admin, "scale", {"deployment": "mlp", "worlds": 1})
    final = await poll(admin, lambda s: len(s["worlds"]) == 1 and sum(
        w["state"] != "dead" for w in s["workers"]) == 1, 60.0, poll_s)
    # Workers told to go exit a moment after they leave the status.
    kept = {w["pid"] for w in final["workers"]}
    for _ in range(200):  # 10 s at most
        if not any(alive(p) for p in pids if p not in kept):
            break
        await asyncio.sleep(0.05)
    return {"scale_s": round(scale_s, 3), "recover_s": round(recover_s, 3), "memory": mem}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ports = free_ports("client", "admin", "worker")
    folder = Path(tempfile.mkdtemp(prefix="meshserve-startup-"))
    path = config(folder / "startup.toml", ports, args.worlds, args.fork_workers)
    admin = f"tcp://127.0.0.1:{ports['admin']}"
    with open(folder / "controller.log", "wb") as log:
        ctrl = start_controller(path, log, log_level="INFO")
        try:
            await poll(admin, lambda s: len(serving_worlds(s)) >= 1, 120.0, args.poll_ms / 1000.0)
            runs = []
            for i in range(args.runs):
                result = await one_run(admin, ctrl.pid, args.worlds, args.poll_ms / 1000.0)
                print(f"run {i + 1}: scale 1->{args.worlds} {result['scale_s']:.3f} s, "
                      f"kill recovery {result['recover_s']:.3f} s", file=sys.stderr, flush=True)
                runs.append(result)
        finally:
            end_processes([ctrl], 30.0)
    return {"fork_workers": args.fork_workers or "default", "worlds": args.worlds,
            "runs": runs, "log": str(folder / "controller.log")}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    runs = result["runs"]

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3) if values else 0.0

    workers = [m for r in runs for m in r["memory"]["workers"] if m]
    servers = [r["memory"]["server"] for r in runs if r["memory"]["server"]]
    return {
        "scale_s_median": med([r["scale_s"] for r in runs]),
        "scale_s_range": [min(r["scale_s"] for r in runs), max(r["scale_s"] for r in runs)],
        "recover_s_median": med([r["recover_s"] for r in runs]),
        "recover_s_range": [min(r["recover_s"] for r in runs),
                            max(r["recover_s"] for r in runs)],
        "worker_rss_mib_median": med([m["rss_kib"] / 1024 for m in workers]),
        "worker_pss_mib_median": med([m["pss_kib"] / 1024 for m in workers]),
        "worker_uss_mib_median": med([m["uss_kib"] / 1024 for m in workers]),
        "server_pss_mib_median": med([m["pss_kib"] / 1024 for m in servers]),
        # Workers and fork server together, at N workers: the fleet's real footprint.
        "fleet_pss_mib_median": med([
            (sum(m["pss_kib"] for m in r["memory"]["workers"] if m)
             + r["memory"]["server"].get("pss_kib", 0)) / 1024 for r in runs]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--worlds", type=int, default=4, help="scale from 1 to this many")
    parser.add_argument("--fork-workers", choices=["on", "off"], default="",
                        help="fork_workers in the config (default: left to the controller)")
    parser.add_argument("--poll-ms", type=float, default=10.0)
    parser.add_argument("--json", default="", help="write every figure to this file")
    args = parser.parse_args()
    result = run_loop(run(args))
    result["summary"] = summary(result)
    s = result["summary"]
    print(f"fork_workers {result['fork_workers']}, {len(result['runs'])} runs, "
          f"scale 1->{args.worlds}")
    print("| figure | median | range |")
    print("| --- | ---: | --- |")
    print(f"| scale-up to {args.worlds} serving (s) | {s['scale_s_median']:.3f} | "
          f"{s['scale_s_range'][0]:.3f}-{s['scale_s_range'][1]:.3f} |")
    print(f"| SIGKILLed worker's world serving again (s) | {s['recover_s_median']:.3f} | "
          f"{s['recover_s_range'][0]:.3f}-{s['recover_s_range'][1]:.3f} |")
    for key in ("worker_rss", "worker_pss", "worker_uss", "server_pss", "fleet_pss"):
        print(f"| {key.replace('_', ' ')} (MiB) | {s[key + '_mib_median']:.1f} | |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
