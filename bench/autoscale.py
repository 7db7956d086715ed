"""Autoscaling under a load step: how fast p99 recovers, and what it costs in workers.

    python -m bench.autoscale [--duration-s 60] [--base-rps 30] [--peak-x 4] [--json F]
                              [--plot timeline.png] [--warm-workers 1]

A controller (subprocess) serves a model with a fixed service time (20 ms per request, so a
world serves 50 req/s whatever the CPU does); open-loop Poisson load steps from 1x to 4x at a
third of the run and back at two thirds. Reported:

* seconds from the step until p99 (per 1 s window) is back under the SLO and stays there;
* after the load falls back, seconds until the worlds are down to what the base load held
  before the step (and stay there): at most ``downscale_delay_s`` + 10 s;
* worker-seconds the run used, against a fixed fleet sized for the peak for the whole run;
* failed requests (there should be none: scale-downs drain);
* with --plot, a PNG of latency against the SLO and live worlds over time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mesh.admin_client import admin_call
from mesh.client import Client
from mesh.loadgen import Second, plot_profile, run_profile
from mesh.loop import run as run_loop
from mesh.stats import percentile
from mesh.testing.configs import write_config
from mesh.testing.ports import free_ports
from mesh.testing.processes import end_processes, start_controller
from mesh.testing.waits import admin_status, serving, wait_status


def deployment(args: argparse.Namespace) -> str:
    return f"""
[[deployments]]
name = "fixed"
model = "worker.models.fixed:build"
factory_kwargs = {{ batch_ms = {args.service_ms} }}
max_batch_size = 1
worlds = 1
min_worlds = 1
max_worlds = {args.max_worlds}
slo_p99_ms = {args.slo_ms}
upscale_delay_s = {args.upscale_delay_s}
downscale_delay_s = {args.downscale_delay_s}
"""


def recovery_s(seconds: list[Second], step_t: float, slo: float, hold_s: int = 3) -> float | None:
    """Seconds after ``step_t`` until p99 is under the SLO for ``hold_s`` windows in a row."""
    after = [s for s in seconds if s.t > step_t]
    for i in range(len(after) - hold_s + 1):
        if all(0 < s.p99_ms <= slo for s in after[i:i + hold_s]):
            return round(after[i].t - step_t, 2)
    return None


def settle_after_fall(seconds: list[Second], fall_t: float) -> tuple[int, int, float | None]:
    """(worlds at the fall, worlds the base rate needed before the step up, seconds from the
    fall until the worlds were down to that and stayed there)."""
    before = [s.worlds for s in seconds if s.t <= fall_t and s.worlds >= 0]
    base = [s.worlds for s in seconds if s.t < fall_t / 2 and s.worlds >= 0]
    need = max(base[len(base) // 2:], default=1)  # the base rate's level, once it settled
    after = [s for s in seconds if s.t > fall_t and s.worlds >= 0]
    for i, s in enumerate(after):
        if all(x.worlds <= need for x in after[i:]):
            return (before[-1] if before else -1), need, round(s.t - fall_t, 2)
    return (before[-1] if before else -1), need, None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ports = free_ports("client", "admin", "worker")
    config = write_config(Path(tempfile.mkdtemp(prefix="meshserve-autoscale-")) /
                          "autoscale.toml", ports, deployment(args), worker_threads=1,
                          warm_workers=args.warm_workers, autoscale=True, autoscale_tick_ms=250)
    admin = f"tcp://127.0.0.1:{ports['admin']}"
    ctrl = start_controller(config, config.with_suffix(".log"), log_level="INFO")
    try:
        await wait_status(
            admin_status(admin),
            lambda s: serving(s, 1)
            and sum(w["state"] == "idle" for w in s["workers"]) >= args.warm_workers,
            120.0, "a world serving and the warm pool full", interval_s=0.2)
        x = {"x": np.ones((1, 4), dtype=np.float32)}
        async with Client(f"tcp://127.0.0.1:{ports['client']}") as client:
            arrivals, seconds = await run_profile(
                client, admin, "fixed", x, profile="step", duration_s=args.duration_s,
                base_rps=args.base_rps, peak_rps=args.base_rps * args.peak_x, timeout_s=30.0,
                out=sys.stderr)
        final = await admin_call(admin, "status", timeout_s=5.0)
    finally:
        end_processes([ctrl], 30.0)
    step_up, fall = args.duration_s / 3, 2 * args.duration_s / 3
    at_fall, need, settle_s = settle_after_fall(seconds, fall)
    lat = sorted(a.latency_ms for a in arrivals if a.latency_ms is not None)
    peak_worlds = max(s.worlds for s in seconds)
    used = sum(max(0, s.workers) for s in seconds)
    fixed_fleet = peak_worlds * len(seconds)  # 1 stage: a worker per world, the whole run
    decisions = [e for e in final["events"] if e["event"] == "scaled"]
    return {
        "duration_s": args.duration_s, "base_rps": args.base_rps,
        "peak_rps": args.base_rps * args.peak_x, "service_ms": args.service_ms,
        "slo_p99_ms": args.slo_ms, "warm_workers": args.warm_workers,
        "requests": len(arrivals), "failed": sum(1 for a in arrivals if a.error),
        "p99_ms_overall": round(percentile(lat, 99), 2),
        "seconds_to_p99_under_slo_after_step": recovery_s(seconds, step_up, args.slo_ms),
        "peak_worlds": peak_worlds,
        "worlds_at_fall": at_fall, "worlds_base_load_needs": need,
        "seconds_to_base_worlds_after_fall": settle_s,
        "downscale_delay_s": args.downscale_delay_s,
        "worker_seconds_used": used,
        "worker_seconds_fixed_fleet_for_peak": fixed_fleet,
        "worker_seconds_saved_pct": round(100.0 * (1 - used / fixed_fleet), 1)
        if fixed_fleet else None,
        "decisions": [{k: e[k] for k in ("t", "to", "by", "reason")} for e in decisions],
        "_seconds": seconds, "_arrivals": arrivals,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--base-rps", type=float, default=30.0)
    parser.add_argument("--peak-x", type=float, default=4.0)
    parser.add_argument("--service-ms", type=float, default=20.0)
    parser.add_argument("--slo-ms", type=float, default=150.0)
    parser.add_argument("--max-worlds", type=int, default=6)
    parser.add_argument("--warm-workers", type=int, default=1)
    parser.add_argument("--upscale-delay-s", type=float, default=2.0)
    parser.add_argument("--downscale-delay-s", type=float, default=10.0)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="draw a PNG timeline here")
    args = parser.parse_args()
    result = run_loop(run(args))
    seconds, arrivals = result.pop("_seconds"), result.pop("_arrivals")
    width = max(len(k) for k in result)
    for key, value in result.items():
        if key != "decisions":
            print(f"{key.ljust(width)}  {value}")
    for d in result["decisions"]:
        print(f"  decision -> {d['to']} worlds by {d['by']}: {d['reason']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.plot:
        plot_profile(seconds, arrivals, args.slo_ms, args.plot,
                     f"step {args.base_rps:g} -> {args.base_rps * args.peak_x:g} req/s, "
                     f"{args.service_ms:g} ms per request, warm pool {args.warm_workers}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MESH_LOG_LEVEL", "WARNING")
    sys.exit(main())
