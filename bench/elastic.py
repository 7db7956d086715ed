"""Elasticity over a compressed day: what autoscaling spends against what the load needed.

    python -m bench.elastic [--duration-s 600] [--model fixed|mlp] [--json F] [--plot F.png]

A controller (subprocess, local launcher, ``warm_workers = 0``, autoscaling on) serves one
deployment. First it measures, in this run, what one world holds: pinned to one world, a
closed loop finds the world's service rate, then open-loop steps at rising fractions of it
find the highest rate whose p99 (per step) holds the SLO: ``per_world_rps``. Then an
open-loop Poisson trace, a day compressed into ``--duration-s``: a quiet night, a slow sine
up to ``--peak-x`` times ``per_world_rps`` and down again, two sharp spikes to ``--spike-x``,
and night again. Reported:

* worker-seconds used (every live worker process, idle and starting ones included), against
  the oracle's: the fewest worlds that hold the SLO at each second's offered rate,
  ``ceil(rate / per_world_rps)`` (within the deployment's bounds), times its stages;
* the share of 1-second windows whose p99 met the SLO (windows with answers), and failures;
* direction changes of the serving worlds (up then down, or down then up) against the
  oracle's, its load changes.

``--model fixed`` (the default) serves a model with a fixed service time per request (it
sleeps: 20 ms), so that a world's capacity is the same whatever else the CPUs do, and more
worlds give more capacity even on a 2-core host. ``--model mlp`` serves the demo ``mlp``
(``meshctl up``'s): its capacity is CPU, so more worlds than cores add none; use it on a host
with a core per world.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mesh.admin_client import admin_call
from mesh.client import Client
from mesh.loadgen import Second, closed_loop, open_loop, plot_profile, run_profile
from mesh.loop import run as run_loop
from mesh.stats import percentile
from mesh.testing.configs import deployment, write_config
from mesh.testing.ports import free_ports
from mesh.testing.processes import end_processes, start_controller
from mesh.testing.waits import admin_status, serving, wait_status

NAME = "elastic"
MODELS: dict[str, tuple[str, dict[str, float], int, int]] = {
    # name: (model, factory_kwargs, input row width, max_batch_size)
    "fixed": ("worker.models.fixed:build", {"batch_ms": 20.0}, 4, 1),
    "mlp": ("worker.models.mlp:build", {}, 64, 32),
}


# -- the trace and its judges (pure) -------------------------------------------------------

@dataclass(frozen=True)
class Day:
    """A compressed day, in requests per second at second ``t`` of ``duration_s``."""

    duration_s: float
    night_rps: float
    peak_rps: float
    spike_rps: float
    spike_s: float = 15.0
    night_share: float = 0.12  # of the run, at each end
    spikes_at: tuple[float, ...] = (0.33, 0.72)  # of the run: the spikes' middles

    def rate(self, t: float) -> float:
        x = t / self.duration_s
        day = 0.0
        if self.night_share < x < 1 - self.night_share:
            day = math.sin(math.pi * (x - self.night_share) / (1 - 2 * self.night_share)) ** 2
        rps = self.night_rps + (self.peak_rps - self.night_rps) * day
        if any(abs(t - at * self.duration_s) < self.spike_s / 2 for at in self.spikes_at):
            rps = max(rps, self.spike_rps)
        return rps


def oracle_worlds(rps: float, per_world_rps: float, min_worlds: int, max_worlds: int) -> int:
    """The fewest worlds that hold the SLO at ``rps``, each holding ``per_world_rps``."""
    return max(min_worlds, min(max_worlds, math.ceil(rps / per_world_rps - 1e-9)))


def direction_changes(series: list[int]) -> int:
    """How often a series turns: up then down, or down then up (flat stretches ignored)."""
    turns, last = 0, 0
    for a, b in itertools.pairwise(series):
        step = (b > a) - (b < a)
        if step and last and step != last:
            turns += 1
        last = step or last
    return turns


def windows_within(seconds: list[Second], slo_ms: float) -> tuple[int, int]:
    """(1-second windows with answers whose p99 met the SLO, windows with answers)."""
    answered = [s for s in seconds if s.done > 0]
    return sum(1 for s in answered if s.p99_ms <= slo_ms), len(answered)


def worker_seconds(seconds: list[Second]) -> int:
    """Live workers summed over the 1-second rows; a row whose status poll failed (-1)
    counts as the row before it."""
    total, last = 0, 0
    for s in seconds:
        last = s.workers if s.workers >= 0 else last
        total += last
    return total


# -- the run -------------------------------------------------------------------------------

def deployment_toml(args: argparse.Namespace) -> str:
    model, kwargs, _, batch = MODELS[args.model]
    return deployment(NAME, model, factory_kwargs=dict(kwargs), max_batch_size=batch, worlds=1,
                      min_worlds=1, max_worlds=args.max_worlds, slo_p99_ms=args.slo_ms,
                      upscale_delay_s=args.upscale_delay_s,
                      downscale_delay_s=args.downscale_delay_s)


async def per_world_rps(client: Client, admin: str, x: dict[str, Any], slo_ms: float,
                        max_worlds: int) -> tuple[float, float]:
    """(service rate of one world, the highest open-loop rate whose p99 held the SLO on it),
    measured with the deployment pinned to one world, then unpinned."""
    await admin_call(admin, "scale", {"deployment": NAME, "worlds": 1, "max_worlds": 1},
                     timeout_s=5.0)
    saturated = await closed_loop(client, NAME, x, concurrency=16, duration_s=4.0)
    holds = 0.0
    for share in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95):
        rps = saturated.rps * share
        arrivals = await open_loop(client, NAME, x, lambda t, r=rps: r, duration_s=4.0,
                                   timeout_s=10.0, seed=int(share * 100))
        settled = sorted(a.latency_ms for a in arrivals if a.sent_s >= 1.0
                         and a.latency_ms is not None)
        failed = sum(1 for a in arrivals if a.error)
        p99 = percentile(settled, 99)
        print(f"calibrate: {rps:7.1f} req/s on one world: p99 {p99:7.1f} ms, "
              f"failed {failed}", file=sys.stderr)
        if failed or p99 > slo_ms:
            break
        holds = rps
    await admin_call(admin, "scale", {"deployment": NAME, "max_worlds": max_worlds},
                     timeout_s=5.0)
    await asyncio.sleep(2.0)  # the closed loop's queue drains before the day starts
    return saturated.rps, holds


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ports = free_ports("client", "admin", "worker")
    config = write_config(Path(tempfile.mkdtemp(prefix="meshserve-elastic-")) / "elastic.toml",
                          ports, deployment_toml(args), worker_threads=1, warm_workers=0,
                          autoscale=True, autoscale_tick_ms=250)
    admin = f"tcp://127.0.0.1:{ports['admin']}"
    ctrl = start_controller(config, config.with_suffix(".log"), log_level="INFO")
    try:
        await wait_status(admin_status(admin), lambda s: serving(s, 1), 120.0,
                          "one world serving", interval_s=0.2)
        x = {"x": np.ones((1, MODELS[args.model][2]), dtype=np.float32)}
        async with Client(f"tcp://127.0.0.1:{ports['client']}") as client:
            service_rps, holds_rps = await per_world_rps(client, admin, x, args.slo_ms,
                                                         args.max_worlds)
            if holds_rps <= 0:
                raise SystemExit("one world did not hold the SLO even at half its service "
                                 "rate: raise --slo-ms")
            day = Day(args.duration_s, args.night_x * holds_rps, args.peak_x * holds_rps,
                      args.spike_x * holds_rps)
            arrivals, seconds = await run_profile(client, admin, NAME, x, profile=day.rate,
                                                  duration_s=args.duration_s, timeout_s=30.0,
                                                  out=sys.stderr)
        final = await admin_call(admin, "status", timeout_s=5.0)
    finally:
        end_processes([ctrl], 30.0)
    return judge(args, day, seconds, arrivals, final, service_rps, holds_rps)


def judge(args: argparse.Namespace, day: Day, seconds: list[Second], arrivals: list[Any],
          final: dict[str, Any], service_rps: float, holds_rps: float) -> dict[str, Any]:
    oracle = [oracle_worlds(day.rate(s.t - 0.5), holds_rps, 1, args.max_worlds)
              for s in seconds]
    worlds = [s.worlds for s in seconds if s.worlds >= 0]
    met, answered = windows_within(seconds, args.slo_ms)
    used = worker_seconds(seconds)
    oracle_ws = sum(oracle)  # one stage: a worker per world
    turns, oracle_turns = direction_changes(worlds), direction_changes(oracle)
    decisions = [e for e in final["events"] if e["event"] == "scaled"]
    return {
        "model": args.model, "duration_s": args.duration_s, "slo_p99_ms": args.slo_ms,
        "downscale_delay_s": args.downscale_delay_s,
        "one_world_service_rps": round(service_rps, 1),
        "per_world_rps": round(holds_rps, 1),
        "night_peak_spike_rps": [round(day.night_rps, 1), round(day.peak_rps, 1),
                                 round(day.spike_rps, 1)],
        "requests": len(arrivals), "failed": sum(1 for a in arrivals if a.error),
        "worker_seconds": used, "oracle_worker_seconds": oracle_ws,
        "worker_seconds_x_oracle": round(used / oracle_ws, 3) if oracle_ws else None,
        "p99_windows_within_slo_pct": round(100.0 * met / answered, 2) if answered else None,
        "windows": answered,
        "direction_changes": turns, "oracle_direction_changes": oracle_turns,
        "direction_changes_per_load_change": round(turns / max(1, oracle_turns), 2),
        "peak_worlds": max(worlds, default=0), "oracle_peak_worlds": max(oracle, default=0),
        "scaling_decisions": len(decisions),
        "_seconds": seconds, "_arrivals": arrivals, "_oracle": oracle,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--model", choices=sorted(MODELS), default="fixed")
    parser.add_argument("--slo-ms", type=float, default=150.0)
    parser.add_argument("--night-x", type=float, default=0.3,
                        help="the night's rate, in what one world holds")
    parser.add_argument("--peak-x", type=float, default=2.6, help="noon's rate, likewise")
    parser.add_argument("--spike-x", type=float, default=3.6, help="the spikes' rate, likewise")
    parser.add_argument("--max-worlds", type=int, default=6)
    parser.add_argument("--upscale-delay-s", type=float, default=2.0)
    parser.add_argument("--downscale-delay-s", type=float, default=10.0)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="draw a PNG timeline (load, worlds, p99) here")
    args = parser.parse_args()
    result = run_loop(run(args))
    seconds, arrivals, oracle = (result.pop(k) for k in ("_seconds", "_arrivals", "_oracle"))
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key.ljust(width)}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {**result, "timeline": [{"t": s.t, "target_rps": s.target_rps, "p99_ms": s.p99_ms,
                                     "worlds": s.worlds, "workers": s.workers,
                                     "oracle_worlds": o}
                                    for s, o in zip(seconds, oracle, strict=True)]}, indent=2))
    if args.plot:
        plot_profile(seconds, arrivals, args.slo_ms, args.plot,
                     f"a compressed day on {args.model}: {result['per_world_rps']} req/s per "
                     f"world, worker-seconds {result['worker_seconds_x_oracle']}x the oracle's",
                     oracle=oracle)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MESH_LOG_LEVEL", "WARNING")
    sys.exit(main())
