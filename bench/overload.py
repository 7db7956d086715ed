"""Goodput under overload: a 10 ms model offered 1x, 2x and 4x its capacity with 500 ms
deadlines, and a closed loop of 512 callers that resend at once on ``overloaded``.

    python -m bench.overload [--duration-s 10] [--rounds 1] [--json out.json]

One world of ``worker.models.fixed`` (10 ms per request, batches of one: about 100 req/s),
measured with deadline-aware admission on (the default) and off (``admit_by_deadline =
false``: the queue takes what ``max_queue`` allows, as before), each controller fully stopped
before the other starts. For each load: goodput (answers ``ok`` within their deadline, per
second, and as a share of the capacity measured in the same run), the answers by code, the
ledger's lost and duplicated answers (every request must get exactly one), and successes that
arrived after their deadline (must be none). Nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    LedgerClient,
    controller_section,
    free_ports,
    start_controller,
    stop_process,
)
from bench.overhead import wait_ready
from mesh.errors import MeshError
from mesh.loadgen import closed_loop, open_loop
from mesh.loop import run as run_loop

DEADLINE_S = 0.5
INPUTS = {"x": np.ones((1, 4), dtype=np.float32)}


def write_config(path: Path, ports: dict[str, int], admission: bool) -> None:
    path.write_text(controller_section(ports, autoscale=False, warm_workers=0) + f"""
[[deployments]]
name = "slow"
model = "worker.models.fixed:build"
factory_kwargs = {{ batch_ms = 10.0 }}
max_batch_size = 1
max_batch_delay_ms = 0.0
admit_by_deadline = {"true" if admission else "false"}
""")


async def capacity(client: LedgerClient, duration_s: float) -> float:
    """Requests per second the world serves with enough work queued (no deadlines hit)."""
    result = await closed_loop(client, "slow", INPUTS, concurrency=4, duration_s=duration_s,
                               warmup_s=0.5, timeout_s=10.0)
    return float(result.rps)


def tally(arrivals: list[Any], duration_s: float, cap: float) -> dict[str, Any]:
    codes = Counter(a.error or "ok" for a in arrivals)
    in_time = sum(1 for a in arrivals if not a.error and a.latency_ms is not None
                  and a.latency_ms <= DEADLINE_S * 1000.0)
    late_ok = sum(1 for a in arrivals if not a.error and a.latency_ms is not None
                  and a.latency_ms > DEADLINE_S * 1000.0 + 50.0)  # transit allowed
    return {"sent": len(arrivals), "codes": dict(codes), "goodput_rps": in_time / duration_s,
            "goodput_share": in_time / duration_s / cap if cap else 0.0,
            "late_successes": late_ok}


async def resend_loop(client: LedgerClient, callers: int, duration_s: float
                      ) -> dict[str, Any]:
    """Each caller sends, and on any error sends again at once (no backoff): the worst case."""
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
                ok_in_time += (time.perf_counter() - t0) <= DEADLINE_S
            except MeshError as exc:
                codes[exc.code] += 1

    await asyncio.gather(*(caller() for _ in range(callers)))
    return {"codes": dict(codes), "goodput_rps": ok_in_time / duration_s,
            "requests": sum(codes.values())}


async def one_mode(admission: bool, args: argparse.Namespace) -> dict[str, Any]:
    ports = free_ports("client", "admin", "worker")
    config = Path(tempfile.mkdtemp(prefix="meshserve-overload-")) / "overload.toml"
    write_config(config, ports, admission)
    ctrl = start_controller(config, log_level="WARNING")
    out: dict[str, Any] = {"admission": admission, "loads": {}}
    try:
        await wait_ready(f"tcp://127.0.0.1:{ports['admin']}", 120.0)
        async with LedgerClient(f"tcp://127.0.0.1:{ports['client']}") as client:
            cap = await capacity(client, 3.0)
            out["capacity_rps"] = cap
            for multiple in args.multiples:
                arrivals = await open_loop(client, "slow", INPUTS, lambda t, m=multiple: m * cap,
                                           duration_s=args.duration_s, timeout_s=DEADLINE_S,
                                           seed=int(multiple * 10))
                row = tally(arrivals, args.duration_s, cap)
                out["loads"][f"{multiple:g}x"] = row
                print(f"admission {'on ' if admission else 'off'} {multiple:g}x: goodput "
                      f"{row['goodput_rps']:.1f} req/s ({row['goodput_share']:.0%} of {cap:.0f})"
                      f" {row['codes']}", file=sys.stderr, flush=True)
                await asyncio.sleep(1.0)  # let the backlog drain
            closed = await resend_loop(client, args.callers, args.duration_s)
            closed["goodput_share"] = closed["goodput_rps"] / cap if cap else 0.0
            out["closed_loop"] = closed
            print(f"admission {'on ' if admission else 'off'} {args.callers} callers resending:"
                  f" goodput {closed['goodput_rps']:.1f} req/s ({closed['goodput_share']:.0%})",
                  file=sys.stderr, flush=True)
            await asyncio.sleep(DEADLINE_S + 2.0)
            answers = client.answers
            out["duplicated"] = sum(1 for n in answers.values() if n > 1)
    finally:
        stop_process(ctrl, 30.0)
    return out


def render(runs: list[dict[str, Any]]) -> str:
    lines = [f"Goodput: 10 ms model, {DEADLINE_S * 1000:.0f} ms deadlines (ok in time per "
             "second; share of the capacity measured in the same run)",
             "| admission | capacity req/s | load | sent | goodput req/s | share | overloaded |"
             " deadline_exceeded | late successes |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        mode = "deadline-aware" if run["admission"] else "queue only (before)"
        for load, row in run["loads"].items():
            c = row["codes"]
            lines.append(f"| {mode} | {run['capacity_rps']:.0f} | {load} | {row['sent']} | "
                         f"{row['goodput_rps']:.1f} | {row['goodput_share']:.0%} | "
                         f"{c.get('overloaded', 0)} | {c.get('deadline_exceeded', 0)} | "
                         f"{row['late_successes']} |")
        cl = run["closed_loop"]
        lines.append(f"| {mode} | {run['capacity_rps']:.0f} | closed loop, resend at once | "
                     f"{cl['requests']} | {cl['goodput_rps']:.1f} | {cl['goodput_share']:.0%} | "
                     f"{cl['codes'].get('overloaded', 0)} | "
                     f"{cl['codes'].get('deadline_exceeded', 0)} | - |")
    dup = sum(r["duplicated"] for r in runs)
    lines.append(f"\nRequests answered twice (client ledger): {dup}.")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    for _ in range(args.rounds):
        for admission in (True, False):
            runs.append(await one_mode(admission, args))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--multiples", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--callers", type=int, default=512)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    runs = run_loop(run(args))
    print(render(runs))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
