"""Goodput under overload: a 10 ms model offered several times its capacity with 500 ms
deadlines, on a deployment idle since start (cold) and on one that has just served (warm),
and a closed loop of callers that resend at once on ``overloaded``.

    python -m bench.overload [--duration-s 10] [--rounds 3] [--idle-s 3] [--multiples 1 2 4]
                             [--callers 512] [--admission on off] [--json out.json]

One world of ``worker.models.fixed`` (10 ms per request, batches of one: about 100 req/s),
with deadline-aware admission on (the default) and off (``admit_by_deadline = false``: the
queue takes what ``max_queue`` allows). Each round starts one fresh controller per admission
setting (the order alternates between rounds, each controller stopped before the next starts)
and runs, in order:

1. cold: the world idle for ``--idle-s`` after it is ready, having served nothing; then a
   spike at the highest multiple of the reference rate for ``--duration-s``;
2. capacity: a deep backlog with long deadlines (``CAPACITY_CALLERS`` callers, 30 s
   deadlines: the world never waits for work and nothing expires), counted as the answers
   completed inside a window after a warm-up. Every share in the round is of this figure;
3. warm: right after it, open loop at each multiple of the reference rate;
4. the closed loop of resending callers (``--callers 0``: none).

The reference rate is a capacity measured once at the start on a controller of its own, so
the cold spike is offered a known multiple before its own controller has served anything.
Between phases the bench polls the controller until nothing is queued or in flight.

Goodput counts the answers ``ok`` within their deadline that also completed inside the
window, per second. Measured this way it cannot exceed capacity by more than the noise of two
windows; a share over 100% is printed with the two rates it compares. Also reported: answers by
code, successes after their deadline (must be none) and answers the client received twice
(must be none). The summary gives the median share over rounds. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mesh.errors import MeshError
from mesh.loadgen import Arrival, closed_loop, open_loop
from mesh.loop import run as run_loop
from mesh.testing.configs import write_config
from mesh.testing.ledger import LedgerClient
from mesh.testing.ports import free_ports
from mesh.testing.processes import end_processes, start_controller
from mesh.testing.waits import admin_status, serving, wait_status

DEADLINE_S = 0.5
INPUTS = {"x": np.ones((1, 4), dtype=np.float32)}
# Requests always waiting: 0.5 s of work, so the world never waits for the next one, and
# below its in-flight limit (64), so none waits in the controller's queue (which costs the
# controller a message per answer: 96 callers measured 0.4-3% less in the same run).
CAPACITY_CALLERS = 48
CAPACITY_DEADLINE_S = 30.0
CAPACITY_S = 5.0


def deployment(admission: bool) -> str:
    return f"""
[[deployments]]
name = "slow"
model = "worker.models.fixed:build"
factory_kwargs = {{ batch_ms = 10.0 }}
max_batch_size = 1
max_batch_delay_ms = 0.0
admit_by_deadline = {"true" if admission else "false"}
"""


async def capacity(client: LedgerClient, duration_s: float) -> float:
    """Answers per second completed inside a window while a deep backlog with long deadlines
    keeps the world busy (none expires, none is refused: ``CAPACITY_CALLERS`` requests ahead
    take well under 0.8 of 30 s)."""
    result = await closed_loop(client, "slow", INPUTS, concurrency=CAPACITY_CALLERS,
                               duration_s=duration_s, warmup_s=1.0,
                               timeout_s=CAPACITY_DEADLINE_S)
    return float(result.rps)


async def settle(admin: str, timeout_s: float = 30.0) -> None:
    """Poll until the deployment has nothing queued or in flight (the last phase's backlog is
    gone), so the next phase starts from an empty world."""
    def idle(status: dict[str, Any]) -> bool:
        dep = next(d for d in status["deployments"] if d["name"] == "slow")
        return bool(dep["queued"] == 0 and dep["in_flight"] == 0)

    await wait_status(admin_status(admin), idle, timeout_s, "nothing queued or in flight",
                      interval_s=0.05)


def tally(arrivals: list[Arrival], duration_s: float, cap: float) -> dict[str, Any]:
    """Goodput over the window, and per second of it (by completion time: the first second
    of a spike is where a cold deployment used to lose)."""
    codes = Counter(a.error or "ok" for a in arrivals)
    done_s = [a.sent_s + a.latency_ms / 1000.0 for a in arrivals
              if not a.error and a.latency_ms is not None
              and a.latency_ms <= DEADLINE_S * 1000.0]
    seconds = [0] * int(duration_s)
    for t in done_s:
        if t < len(seconds):
            seconds[int(t)] += 1
    in_time = sum(1 for t in done_s if t <= duration_s)
    late_ok = sum(1 for a in arrivals if not a.error and a.latency_ms is not None
                  and a.latency_ms > DEADLINE_S * 1000.0 + 50.0)  # transit allowed
    goodput = in_time / duration_s
    return {"sent": len(arrivals), "codes": dict(codes), "goodput_rps": goodput,
            "goodput_share": goodput / cap if cap else 0.0, "late_successes": late_ok,
            "per_second": seconds,
            "first_second_share": seconds[0] / cap if cap and seconds else 0.0,
            "worst_second_share": min(seconds) / cap if cap and seconds else 0.0}


async def resend_loop(client: LedgerClient, callers: int, duration_s: float
                      ) -> dict[str, Any]:
    """Each caller sends, and on any error sends again at once (no backoff): the worst case.
    Only answers completed inside the window count."""
    codes: Counter[str] = Counter()
    ok_in_time = 0
    stop = time.perf_counter() + duration_s

    async def caller() -> None:
        nonlocal ok_in_time
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                await client.infer("slow", INPUTS, timeout_s=DEADLINE_S)
                codes["ok"] += 1
                done = time.perf_counter()
                ok_in_time += done - t0 <= DEADLINE_S and done <= stop
            except MeshError as exc:
                codes[exc.code] += 1

    await asyncio.gather(*(caller() for _ in range(callers)))
    return {"codes": dict(codes), "goodput_rps": ok_in_time / duration_s,
            "requests": sum(codes.values())}


def say(admission: bool, phase: str, row: dict[str, Any], cap: float) -> None:
    print(f"admission {'on ' if admission else 'off'} {phase}: goodput "
          f"{row['goodput_rps']:.1f} req/s ({row['goodput_share']:.0%} of {cap:.0f})"
          f" {row['codes']} per second {row.get('per_second', '-')}", file=sys.stderr,
          flush=True)


async def one_controller(admission: bool, reference_rps: float, args: argparse.Namespace
                         ) -> dict[str, Any]:
    ports = free_ports("client", "admin", "worker")
    config = write_config(Path(tempfile.mkdtemp(prefix="meshserve-overload-")) /
                          "overload.toml", ports, deployment(admission), worker_threads=1,
                          autoscale=False, warm_workers=0)
    admin = f"tcp://127.0.0.1:{ports['admin']}"
    ctrl = start_controller(config, log_level="WARNING")
    spike = max(args.multiples)
    out: dict[str, Any] = {"admission": admission, "reference_rps": reference_rps,
                           "cold_multiple": spike, "loads": {}}
    try:
        await wait_status(admin_status(admin), serving, 120.0, "the deployment serving",
                          interval_s=0.2)
        async with LedgerClient(f"tcp://127.0.0.1:{ports['client']}") as client:
            if reference_rps > 0:
                await asyncio.sleep(args.idle_s)  # the quiet stretch before the spike
                cold = await open_loop(client, "slow", INPUTS, lambda t: spike * reference_rps,
                                       duration_s=args.duration_s, timeout_s=DEADLINE_S,
                                       seed=int(spike * 10) + 1)
                await settle(admin)
            cap = await capacity(client, CAPACITY_S)
            out["capacity_rps"] = cap
            if reference_rps <= 0:
                return out  # the calibration run
            out["cold"] = tally(cold, args.duration_s, cap)
            say(admission, f"cold {spike:g}x", out["cold"], cap)
            await settle(admin)
            for multiple in args.multiples:
                arrivals = await open_loop(client, "slow", INPUTS,
                                           lambda t, m=multiple: m * reference_rps,
                                           duration_s=args.duration_s, timeout_s=DEADLINE_S,
                                           seed=int(multiple * 10))
                row = tally(arrivals, args.duration_s, cap)
                out["loads"][f"{multiple:g}x"] = row
                say(admission, f"warm {multiple:g}x", row, cap)
                await settle(admin)
            if args.callers:
                closed = await resend_loop(client, args.callers, args.duration_s)
                closed["goodput_share"] = closed["goodput_rps"] / cap if cap else 0.0
                out["closed_loop"] = closed
                say(admission, f"{args.callers} callers resending", closed, cap)
            await settle(admin)
            out["duplicated"] = client.ledger.answered_twice
            out["ledger"] = client.ledger.summary()
    finally:
        end_processes([ctrl], 30.0)
    return out


def share(row: dict[str, Any], cap: float) -> str:
    """The share of capacity, and why when it is over 100%."""
    text = f"{row['goodput_share']:.0%}"
    if row["goodput_share"] > 1.0:
        text += (f" (over: {row['goodput_rps']:.1f} completed in this window against "
                 f"{cap:.1f} in the capacity window; the two windows' noise)")
    return text


def render(runs: list[dict[str, Any]]) -> str:
    lines = [f"Goodput: 10 ms model, {DEADLINE_S * 1000:.0f} ms deadlines (ok within the "
             "deadline and inside the window, per second; share of the capacity measured by "
             "the same controller)",
             "| round | admission | capacity req/s | phase | load req/s | sent | goodput req/s "
             "| share | first second | worst second | overloaded | deadline_exceeded | "
             "late successes |",
             "|---:|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        mode = "deadline-aware" if run["admission"] else "queue only"
        cap, ref = run["capacity_rps"], run["reference_rps"]
        rows = [(f"cold {run['cold_multiple']:g}x", run["cold"])]
        rows += [(f"warm {load}", row) for load, row in run["loads"].items()]
        for phase, row in rows:
            multiple = float(phase.split()[-1][:-1])
            c = row["codes"]
            lines.append(f"| {run['round']} | {mode} | {cap:.0f} | {phase} | "
                         f"{multiple * ref:.0f} | {row['sent']} | {row['goodput_rps']:.1f} | "
                         f"{share(row, cap)} | {row['first_second_share']:.0%} | "
                         f"{row['worst_second_share']:.0%} | {c.get('overloaded', 0)} | "
                         f"{c.get('deadline_exceeded', 0)} | {row['late_successes']} |")
        if "closed_loop" in run:
            cl = run["closed_loop"]
            lines.append(f"| {run['round']} | {mode} | {cap:.0f} | closed loop, resend at once"
                         f" | - | {cl['requests']} | {cl['goodput_rps']:.1f} | "
                         f"{share(cl, cap)} | - | - | {cl['codes'].get('overloaded', 0)} | "
                         f"{cl['codes'].get('deadline_exceeded', 0)} | - |")
    lines += ["", "Median share of capacity over rounds (and of the first second's goodput):",
              "| admission | phase | median | per round | first second, median | per round |",
              "|---|---|---:|---|---:|---|"]
    for admission in (True, False):
        mine = [r for r in runs if r["admission"] == admission]
        if not mine:
            continue
        mode = "deadline-aware" if admission else "queue only"
        phases = ["cold"] + [f"warm {k}" for k in mine[0]["loads"]]
        if "closed_loop" in mine[0]:
            phases.append("closed loop")
        for phase in phases:
            shares = [pick(r, phase)["goodput_share"] for r in mine]
            line = (f"| {mode} | {phase} | {statistics.median(shares):.0%} | "
                    f"{', '.join(f'{s:.0%}' for s in shares)} |")
            if phase == "closed loop":
                lines.append(line + " - | - |")
                continue
            firsts = [pick(r, phase)["first_second_share"] for r in mine]
            lines.append(line + f" {statistics.median(firsts):.0%} | "
                         f"{', '.join(f'{s:.0%}' for s in firsts)} |")
    dup = sum(r["duplicated"] for r in runs)
    late = sum(pick(r, p)["late_successes"] for r in runs
               for p in ["cold"] + [f"warm {k}" for k in r["loads"]])
    lines.append(f"\nRequests answered twice (client ledger): {dup}. Successes after their "
                 f"deadline: {late}.")
    return "\n".join(lines)


def pick(run: dict[str, Any], phase: str) -> dict[str, Any]:
    if phase == "cold":
        return dict(run["cold"])
    if phase == "closed loop":
        return dict(run["closed_loop"])
    return dict(run["loads"][phase.removeprefix("warm ")])


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    modes = [m == "on" for m in args.admission]
    calibration = await one_controller(modes[0], 0.0, args)
    reference = calibration["capacity_rps"]
    print(f"reference capacity {reference:.1f} req/s", file=sys.stderr, flush=True)
    runs = []
    for i in range(args.rounds):
        for admission in (modes if i % 2 == 0 else modes[::-1]):
            result = await one_controller(admission, reference, args)
            result["round"] = i + 1
            runs.append(result)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=3.0,
                        help="how long the cold deployment is idle before its spike")
    parser.add_argument("--multiples", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--callers", type=int, default=512)
    parser.add_argument("--admission", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    runs = run_loop(run(args))
    print(render(runs))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
