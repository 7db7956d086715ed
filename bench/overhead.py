"""What meshserve costs per request, all measured in one run.

    python -m bench.overhead [--duration-s 5] [--json results.json]

1. Echo (a no-op worker), tiny payloads, closed loop at concurrency 1, 16 and 128:
   (a) a client talking to the worker directly over ZeroMQ (bench.direct), and
   (b) the same requests through a real controller process;
   plus the controller's CPU time per request (from /proc, user + system, all threads).
2. The ``mlp`` demo served through the controller against its bare forward pass in a tight
   loop in this process (same torch thread count as the worker): at batch 1 (concurrency 1),
   at concurrency 16, at the batcher's maximum batch (concurrency = max_batch_size), and at
   twice that (two batches in flight: the worker kept busy at the same batch size); the
   bare loop runs at the effective batch the worker actually formed (from its counters).
   With --client-batch ROWS, also requests of ROWS rows each, one and two in flight: one
   request per batch, so the ratio shows what the worker adds to the pass, not the controller.
3. The transport floor (bench.floor) at concurrency 1: the same four ZeroMQ hops with no
   meshserve code at all, so the served latency splits into what the hops cost on this
   machine and what meshserve adds. And the same mlp worker driven directly (bench.direct,
   no controller), which splits what meshserve adds between the controller and the rest
   (client and worker).

Where the host has a core for each of them (14 at --threads 1), the client (this process),
the controller and every worker run on cores of their own (bench/pinning.py; --pin off to
let them share); the first line printed says which, or what shares what.

Everything comes in rounds (--rounds, default 3). An echo round runs, at each concurrency,
the direct path and then the controller path back to back; an mlp round runs served, then
bare at the batch the worker formed, then the floor, while the servers sit idle between
phases. This machine's speed drifts by more than the differences measured (the direct echo
path moved from 11.7k to 16.2k req/s between two runs minutes apart), so the tables quote the
median over rounds of each round's own ratio. Nothing here asserts. Prints a table and, with --json,
writes every figure, round by round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import cpu_seconds
from bench.direct import DirectWorker
from bench.floor import FloorChain, pause_penalty
from bench.pinning import available_cores, describe, pin, plan
from mesh.admin_client import admin_call
from mesh.client import Client
from mesh.loadgen import BenchResult, closed_loop
from mesh.loop import run as run_loop
from mesh.security import ClientKeys, generate
from mesh.testing.configs import write_config
from mesh.testing.ports import free_ports
from mesh.testing.processes import end_processes, start_controller
from mesh.testing.waits import admin_status, serving, wait_status

ECHO_INPUTS = {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}
MLP_BATCH = 32


def mlp_kwargs(args: argparse.Namespace) -> dict[str, int]:
    return {"hidden": args.mlp_hidden, "layers": args.mlp_layers}


def deployments(mlp_delay_ms: float = 2.0, mlp: dict[str, int] | None = None) -> str:
    return f"""
[[deployments]]
name = "echo"
model = "worker.models.echo:build"
max_batch_size = 64
max_inflight_per_world = 256

[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
max_batch_size = {MLP_BATCH}
max_batch_delay_ms = {mlp_delay_ms}
max_inflight_per_world = 256
factory_kwargs = {{ {", ".join(f"{k} = {v}" for k, v in (mlp or {}).items())} }}
"""


def settings(threads: int, device: str, busy_poll_us: int = 0) -> dict[str, int | str | bool]:
    """The controller's settings: one world per deployment, as measured (no autoscaling, no
    idle warm worker), the workers' threads and device as asked."""
    return {"autoscale": False, "warm_workers": 0, "worker_threads": threads,
            "worker_device": device, "busy_poll_us": busy_poll_us}


def curve_keys(tmp: Path) -> tuple[str, dict[str, str], ClientKeys]:
    """For --curve: keys for the controller, the bench client and its admin calls; returns
    the config's [security] table, the client's key arguments and the admin's keys."""
    own = tmp / "keys"
    for name in ("controller", "bench", "ops"):
        generate(name, own)
    for folder, name in (("clients", "bench"), ("admins", "ops"), ("workers", "")):
        (tmp / folder).mkdir()
        if name:
            shutil.copy(own / f"{name}.key", tmp / folder / f"{name}.key")
    table = (f'\n[security]\ncurve = true\ncontroller_key = "{own / "controller.key_secret"}"\n'
             f'client_keys = "{tmp / "clients"}"\nworker_keys = "{tmp / "workers"}"\n'
             f'admin_keys = "{tmp / "admins"}"\n')
    client = {"key": str(own / "bench.key_secret"), "controller_key": str(own / "controller.key")}
    return table, client, ClientKeys.load(own / "ops.key_secret", own / "controller.key")


def worker_counters(status: dict[str, Any], deployment: str) -> tuple[int, int]:
    """(batches, rows) summed over the workers serving ``deployment``."""
    worlds = {w["id"] for w in status["worlds"] if w["deployment"] == deployment}
    batches = rows = 0
    for w in status["workers"]:
        if worlds & set(w["worlds"]):
            batches += w["batches"]
            rows += w["rows"]
    return batches, rows


async def settled_counters(admin: str, deployment: str, timeout_s: float = 5.0
                           ) -> tuple[int, int]:
    """``worker_counters`` from heartbeats sent after this call began: the counters come with
    heartbeats, so a status read at once can miss the last batches of the phase just ended
    (that read 1.4 to 3.5 rows a batch at one caller on the GPU host)."""
    since = time.monotonic()
    deadline = since + timeout_s
    while True:
        status = await admin_call(admin, "status")
        worlds = {w["id"] for w in status["worlds"] if w["deployment"] == deployment}
        ages = [w["heartbeat_age_ms"] for w in status["workers"] if worlds & set(w["worlds"])]
        fresh = (time.monotonic() - since) * 1000.0
        if (ages and max(ages) < fresh) or time.monotonic() > deadline:
            return worker_counters(status, deployment)
        await asyncio.sleep(0.05)


_BARE_MODEL: Any = None


def bare_forward(batch: int, threads: int, duration_s: float,
                 device: str = "cpu", mlp: dict[str, int] | None = None,
                 gap_s: float = 0.0) -> dict[str, float]:
    """Median time of the mlp's forward pass in a tight loop, and the rows/s it implies; on a
    GPU, input copied in and output copied out each time, as a worker does.

    ``gap_s``: sleep that long before each pass, as a worker waits between the requests of
    one caller. On a host whose caches other processes and tenants share, a pass after a pause
    is slower than back to back (its weights were evicted meanwhile); this measures by how
    much, with no serving code in the loop."""
    global _BARE_MODEL
    import torch

    from worker.models.mlp import build

    torch.set_num_threads(threads)
    if _BARE_MODEL is None:
        _BARE_MODEL = build(**(mlp or {})).to(device)
    model = _BARE_MODEL
    x = torch.zeros(batch, 64)
    times = []
    with torch.inference_mode():
        for _ in range(5):
            model(x.to(device)).cpu()
        end = time.perf_counter() + duration_s
        while time.perf_counter() < end:
            if gap_s > 0.0:
                time.sleep(gap_s)
            t0 = time.perf_counter()
            model(x.to(device)).cpu()
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"batch": batch, "median_ms": med * 1000.0, "rows_per_s": batch / med,
            "iterations": len(times)}


async def echo_round(client: Client, direct: DirectWorker, ctrl_pid: int,
                     args: argparse.Namespace, n: int) -> list[dict[str, Any]]:
    """One round: at each concurrency, the direct path and then the controller, back to back."""
    rows = []
    for c in args.concurrency:
        direct_r = await closed_loop(direct, "echo", ECHO_INPUTS, concurrency=c,  # type: ignore[arg-type]
                                     duration_s=args.duration_s, warmup_s=0.5)
        cpu0 = cpu_seconds(ctrl_pid)
        via_r = await closed_loop(client, "echo", ECHO_INPUTS, concurrency=c,
                                  duration_s=args.duration_s, warmup_s=0.0)
        cpu_us = (cpu_seconds(ctrl_pid) - cpu0) * 1e6 / max(1, via_r.requests)
        row = {"concurrency": c, "direct": direct_r.to_dict(), "via": via_r.to_dict(),
               "ratio_rps": via_r.rps / direct_r.rps if direct_r.rps else 0.0,
               "controller_cpu_us_per_req": cpu_us}
        rows.append(row)
        print(f"echo round {n} c={c:<4d} direct {direct_r.rps:8.1f} req/s p50 "
              f"{direct_r.p50_ms:6.3f} ms | via controller {via_r.rps:8.1f} req/s p50 "
              f"{via_r.p50_ms:6.3f} ms | ratio {row['ratio_rps']:.2f} | controller "
              f"{cpu_us:5.1f} us/req", file=sys.stderr, flush=True)
    return rows


def summarize_echo(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per concurrency, the median over rounds of each figure (ratios taken per round)."""
    out = []
    for i, first in enumerate(rounds[0]):
        rows = [r[i] for r in rounds]

        def med(get: Any, rows: list[dict[str, Any]] = rows) -> float:
            return float(statistics.median(get(row) for row in rows))

        out.append({"concurrency": first["concurrency"],
                    "direct_rps": med(lambda r: r["direct"]["rps"]),
                    "via_rps": med(lambda r: r["via"]["rps"]),
                    "ratio_rps": med(lambda r: r["ratio_rps"]),
                    "direct_p50_ms": med(lambda r: r["direct"]["p50_ms"]),
                    "via_p50_ms": med(lambda r: r["via"]["p50_ms"]),
                    "controller_cpu_us_per_req": med(lambda r: r["controller_cpu_us_per_req"]),
                    "errors": sum(sum(r["via"]["errors"].values()) for r in rows)})
    return out


async def mlp_round(client: Client, admin: str, floor: FloorChain, direct: DirectWorker,
                    args: argparse.Namespace, n: int) -> dict[str, Any]:
    """One round: served, bare at the batch the worker formed, and the floor, back to back.

    The machine's speed drifts by more than the differences measured here, so each round
    compares figures taken within seconds of each other, and the report takes medians."""
    d = args.duration_s
    bare_s = min(3.0, d)
    mlp_x = {"x": np.zeros((1, 64), dtype=np.float32)}
    out: dict[str, Any] = {}
    # At concurrency = max batch, a closed loop leaves the worker idle while its answers go
    # round the loop; at twice that, one batch is in transit while the other computes: what
    # the worker serves when it is kept busy, at the same batch size.
    for c in (1, 16, MLP_BATCH, 2 * MLP_BATCH):
        # Counted from the warm-up on: the warm-up's batches have the measured shape too.
        before = await settled_counters(admin, "mlp")
        r: BenchResult = await closed_loop(client, "mlp", mlp_x, concurrency=c,
                                           duration_s=d, warmup_s=0.5)
        after = await settled_counters(admin, "mlp")
        eff = (after[1] - before[1]) / max(1, after[0] - before[0])
        # The servers sit idle (no load offered) while the bare loop runs.
        bare = bare_forward(max(1, round(eff)), args.threads, bare_s, args.device,
                            mlp_kwargs(args))
        entry: dict[str, Any] = {"served": r.to_dict(), "effective_batch": eff, "bare": bare,
                 "ratio_rows_per_s": r.rps / bare["rows_per_s"]}
        if c == 1:
            entry["p50_minus_bare_ms"] = r.p50_ms - bare["median_ms"]
            entry["floor"] = floor.measure(d)
            entry["floor_minus_bare_ms"] = entry["floor"]["p50_ms"] - bare["median_ms"]
            direct_r = await closed_loop(direct, "mlp", mlp_x, concurrency=1,  # type: ignore[arg-type]
                                         duration_s=d, warmup_s=0.5)
            entry["direct"] = direct_r.to_dict()
            entry["direct_minus_bare_ms"] = direct_r.p50_ms - bare["median_ms"]
            entry["pause_penalty"] = pause_penalty(pause_s=bare["median_ms"] / 1000.0)
            # The bare pass at the served pace: each one after the idle gap a served request
            # leaves the worker (its round trip less the pass), with no serving code around it.
            gap_ms = max(0.0, r.p50_ms - bare["median_ms"])
            entry["paced_bare"] = bare_forward(1, args.threads, bare_s, args.device,
                                               mlp_kwargs(args), gap_s=gap_ms / 1000.0)
            entry["paced_bare"]["gap_ms"] = gap_ms
        out[f"c{c}"] = entry
        extra = (f" | floor p50 {entry['floor']['p50_ms']:6.3f} ms, direct p50 "
                 f"{entry['direct']['p50_ms']:6.3f} ms" if c == 1 else "")
        print(f"mlp  round {n} c={c:<3d} served {r.rps:8.1f} req/s p50 {r.p50_ms:7.3f} ms"
              f" batch {eff:5.2f} | bare {bare['median_ms']:6.3f} ms"
              f" ratio {entry['ratio_rows_per_s']:.2f}{extra}", file=sys.stderr, flush=True)
    if args.client_batch:
        # Requests that each carry a whole batch (the client batched its rows): the controller
        # handles one request per batch, so this isolates what the worker adds to the pass.
        rows = args.client_batch
        batch_x = {"x": np.zeros((rows, 64), dtype=np.float32)}
        bare = bare_forward(rows, args.threads, bare_s, args.device, mlp_kwargs(args))
        for c in (1, 2):
            r = await closed_loop(client, "mlp", batch_x, concurrency=c, duration_s=d,
                                  warmup_s=0.5)
            entry = {"served": r.to_dict(), "effective_batch": float(rows), "bare": bare,
                     "rows_per_request": rows,
                     "ratio_rows_per_s": r.rps * rows / bare["rows_per_s"]}
            out[f"b{rows}c{c}"] = entry
            print(f"mlp  round {n} {c} x {rows} rows: served {r.rps * rows:9.1f} rows/s p50 "
                  f"{r.p50_ms:7.3f} ms | bare {bare['median_ms']:6.3f} ms "
                  f"{bare['rows_per_s']:9.1f} rows/s ratio {entry['ratio_rows_per_s']:.2f}",
                  file=sys.stderr, flush=True)
    return out


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per concurrency, the median over rounds of every figure the report quotes."""
    summary: dict[str, Any] = {}
    for key in rounds[0]:
        entries = [r[key] for r in rounds]

        def med(get: Any, entries: list[dict[str, Any]] = entries) -> float:
            return float(statistics.median(get(e) for e in entries))

        s = {"rows_per_request": entries[0].get("rows_per_request", 1),
             "effective_batch": med(lambda e: e["effective_batch"]),
             "served_rps": med(lambda e: e["served"]["rps"]),
             "served_p50_ms": med(lambda e: e["served"]["p50_ms"]),
             "bare_rows_per_s": med(lambda e: e["bare"]["rows_per_s"]),
             "bare_ms": med(lambda e: e["bare"]["median_ms"]),
             "ratio_rows_per_s": med(lambda e: e["ratio_rows_per_s"]),
             "errors": sum(sum(e["served"]["errors"].values()) for e in entries)}
        if "p50_minus_bare_ms" in entries[0]:
            s["p50_minus_bare_ms"] = med(lambda e: e["p50_minus_bare_ms"])
            s["floor_p50_ms"] = med(lambda e: e["floor"]["p50_ms"])
            s["floor_minus_bare_ms"] = med(lambda e: e["floor_minus_bare_ms"])
            s["direct_p50_ms"] = med(lambda e: e["direct"]["p50_ms"])
            s["direct_minus_bare_ms"] = med(lambda e: e["direct_minus_bare_ms"])
            s["controller_ms"] = med(lambda e: e["served"]["p50_ms"] - e["direct"]["p50_ms"])
            s["pause_penalty"] = med(lambda e: e["pause_penalty"]["ratio"])
            s["paced_bare_ms"] = med(lambda e: e["paced_bare"]["median_ms"])
            s["p50_minus_paced_bare_ms"] = med(
                lambda e: e["served"]["p50_ms"] - e["paced_bare"]["median_ms"])
        summary[key] = s
    return summary


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ports = free_ports("client", "admin", "worker", "direct", "direct_mlp")
    tmp = Path(tempfile.mkdtemp(prefix="meshserve-bench-"))
    client_args: dict[str, str] = {}
    admin_curve: ClientKeys | None = None
    security = ""
    if args.curve:
        security, client_args, admin_curve = curve_keys(tmp)
    config = write_config(tmp / "bench.toml", ports,
                          deployments(args.mlp_delay_ms, mlp_kwargs(args)) + security,
                          **settings(args.threads, args.device, args.busy_poll_us))
    admin = f"tcp://127.0.0.1:{ports['admin']}"
    ctrl = start_controller(config, log_level="WARNING")
    direct = DirectWorker(ports["direct"], {"name": "echo", "model": "worker.models.echo:build",
                                            "max_batch_size": 64, "max_batch_delay_ms": 2.0},
                          threads=args.threads)
    direct_mlp = DirectWorker(ports["direct_mlp"], {
        "name": "mlp", "model": "worker.models.mlp:build", "max_batch_size": MLP_BATCH,
        "max_batch_delay_ms": args.mlp_delay_ms, "factory_kwargs": mlp_kwargs(args)},
        threads=args.threads, device=args.device)
    floor = FloorChain(args.threads, mlp_kwargs(args), device=args.device)
    # Every process the run starts, and what it needs: the client a core per torch thread (it
    # runs the bare forward loop too), the controller its Python thread and ZeroMQ's I/O
    # thread, a worker its torch threads and one for its loop and I/O.
    per_worker = args.threads + 1
    needs = [("client", max(1, args.threads)), ("controller", 2), ("echo worker", per_worker),
             ("mlp worker", per_worker), ("direct echo worker", per_worker),
             ("direct mlp worker", per_worker), ("floor relay", 1),
             ("floor worker", per_worker)]
    cores = available_cores()
    placement = plan(cores, needs) if args.pin == "auto" else None
    roles = [role for role, _ in needs]
    pinning = {"pinned": placement is not None, "cores": len(cores),
               "placement": placement or {}, "note": describe(placement, roles, cores)}
    print(pinning["note"], flush=True)
    results: dict[str, Any] = {"duration_s": args.duration_s, "threads": args.threads,
                               "busy_poll_us": args.busy_poll_us, "rounds": args.rounds,
                               "pinning": pinning, "echo_rounds": [], "mlp_rounds": []}

    def place(role: str, pid: int) -> None:
        if placement is not None:
            pin(pid, placement[role])

    try:
        status = await wait_status(admin_status(admin, curve=admin_curve), serving, 180.0,
                                   "every deployment serving", interval_s=0.2)
        place("client", os.getpid())
        place("controller", ctrl.pid)
        pids = {w["id"]: w["pid"] for w in status["workers"]}
        for world in status["worlds"]:
            for worker_id in world["workers"]:
                place(f"{world['deployment']} worker", pids[worker_id])
        await direct.start()
        place("direct echo worker", direct.pid)
        async with Client(f"tcp://127.0.0.1:{ports['client']}", key=client_args.get("key"),
                          controller_key=client_args.get("controller_key")) as client:
            for n in range(1, args.rounds + 1):
                results["echo_rounds"].append(
                    await echo_round(client, direct, ctrl.pid, args, n))
            await direct.aclose()  # idle from here on: the mlp rounds need the machine
            if args.echo_only:
                return results | {"echo": summarize_echo(results["echo_rounds"]), "mlp": {}}
            floor.start()
            place("floor relay", floor.procs[0].pid)
            place("floor worker", floor.procs[1].pid)
            await direct_mlp.start()
            place("direct mlp worker", direct_mlp.pid)
            for n in range(1, args.rounds + 1):
                results["mlp_rounds"].append(
                    await mlp_round(client, admin, floor, direct_mlp, args, n))
    finally:
        floor.stop()
        await direct.aclose()
        await direct_mlp.aclose()
        end_processes([ctrl], 30.0)
    results["echo"] = summarize_echo(results["echo_rounds"])
    results["mlp"] = summarize(results["mlp_rounds"])
    return results


def render(results: dict[str, Any]) -> str:
    lines = ["", f"Processes: {results['pinning']['note']}",
             "", f"Echo, tiny payload (closed loop; medians of {results['rounds']} rounds)",
             "| concurrency | direct req/s | via controller req/s | ratio | direct p50 ms | "
             "via p50 ms | controller CPU us/req |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["echo"]:
        lines.append(f"| {row['concurrency']} | {row['direct_rps']:.0f} | {row['via_rps']:.0f}"
                     f" | {row['ratio_rps']:.2f} | {row['direct_p50_ms']:.3f} | "
                     f"{row['via_p50_ms']:.3f} | {row['controller_cpu_us_per_req']:.1f} |")
    lines += ["", f"mlp served vs bare forward (torch threads = {results['threads']}; "
              f"medians of {results['rounds']} rounds)",
              "| concurrency | effective batch | served req/s | bare rows/s at that batch | ratio |"
              " served p50 ms | bare forward ms | served p50 - bare ms |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c, e in results["mlp"].items():
        delta = f"{e['p50_minus_bare_ms']:.3f}" if "p50_minus_bare_ms" in e else ""
        rows = e.get("rows_per_request", 1)
        callers = c.split("c")[-1] + (f" ({rows} rows each)" if rows > 1 else "")
        lines.append(f"| {callers} | {e['effective_batch']:.2f} | {e['served_rps']:.1f} | "
                     f"{e['bare_rows_per_s']:.1f} | {e['ratio_rows_per_s']:.2f} | "
                     f"{e['served_p50_ms']:.3f} | {e['bare_ms']:.3f} | {delta} |")
    c1 = results["mlp"].get("c1")
    if c1 is not None:
        lines += ["", "Where the time goes at concurrency 1: the transport floor (bench/floor.py:"
                  " a verbatim ZeroMQ relay and a raw-bytes mlp worker, no meshserve code) and "
                  "the meshserve worker driven directly (bench/direct.py: no controller)",
                  "| floor p50 ms | floor p50 - bare ms | meshserve p50 - floor p50 ms | "
                  "direct p50 ms | direct p50 - bare ms | controller (served - direct) ms |",
                  "|---:|---:|---:|---:|---:|---:|",
                  f"| {c1['floor_p50_ms']:.3f} | {c1['floor_minus_bare_ms']:.3f} | "
                  f"{c1['served_p50_ms'] - c1['floor_p50_ms']:.3f} | {c1['direct_p50_ms']:.3f} | "
                  f"{c1['direct_minus_bare_ms']:.3f} | {c1['controller_ms']:.3f} |",
                  "", f"The same Python (10 reply encodings) runs {c1['pause_penalty']:.1f}x "
                  f"slower right after a {c1['bare_ms']:.1f} ms pause than back to back "
                  "(median of rounds).",
                  "", "The bare pass at the served pace (each after the idle gap a served "
                  "request leaves the worker): what pausing alone costs the forward pass here",
                  "| bare forward ms | paced bare ms | served p50 ms | "
                  "served p50 - paced bare ms |",
                  "|---:|---:|---:|---:|",
                  f"| {c1['bare_ms']:.3f} | {c1['paced_bare_ms']:.3f} | "
                  f"{c1['served_p50_ms']:.3f} | {c1['p50_minus_paced_bare_ms']:.3f} |"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of echo (direct, controller) and mlp (served, bare, floor),"
                             " each back to back; medians reported")
    parser.add_argument("--mlp-delay-ms", type=float, default=2.0,
                        help="max_batch_delay_ms of the mlp deployment (0: never wait)")
    parser.add_argument("--mlp-hidden", type=int, default=3072,
                        help="the mlp's width (default 3072, the demo's; 1024 with --mlp-layers 4"
                             " is the 4x1024 MLP of docs/benchmarks.md's latency target)")
    parser.add_argument("--mlp-layers", type=int, default=3, help="the mlp's layers (default 3)")
    parser.add_argument("--device", default="cpu",
                        help="where the mlp worker and the bare loop run: cpu, cuda, cuda:N")
    parser.add_argument("--client-batch", type=int, default=0, metavar="ROWS",
                        help="also serve requests of ROWS rows each (the client batched them),"
                             " one and two in flight, against the bare pass at ROWS rows")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--curve", action="store_true",
                        help="run the controller with [security] curve = true (keys made for "
                             "the run); the direct path has no CURVE")
    parser.add_argument("--echo-only", action="store_true", help="skip the mlp rounds")
    parser.add_argument("--busy-poll-us", type=int, default=0, metavar="US",
                        help="the controller's busy_poll_us (default 0: off)")
    parser.add_argument("--pin", choices=("auto", "off"), default="auto",
                        help="auto (default): give the client, the controller and each worker "
                             "cores of their own when the host has enough (bench/pinning.py); "
                             "off: let them share")
    args = parser.parse_args()
    results = run_loop(run(args))
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MESH_LOG_LEVEL", "WARNING")
    sys.exit(main())
