"""``meshctl bench``: closed-loop load against a running controller with a live display, or
an open loop following a profile (step, ramp, spike, diurnal); the load itself is
mesh/loadgen.py."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from mesh.cli.common import add_endpoint, curve, run
from mesh.cli.common import client as client_of
from mesh.errors import MeshError
from mesh.loadgen import (
    Arrival,
    BenchResult,
    Progress,
    Second,
    closed_loop,
    plot_profile,
    render_result,
    run_profile,
)
from mesh.stats import percentile


def _run_profile_cli(args: argparse.Namespace) -> int:
    from mesh.admin_client import admin_call

    if args.base_rps <= 0 or args.peak_x < 1:
        print("meshctl bench: --base-rps must be > 0 and --peak-x >= 1", file=sys.stderr)
        return 2

    async def go() -> tuple[list[Arrival], list[Second], float]:
        inputs = await _inputs_for(args)
        status = await admin_call(args.admin, "status", {}, timeout_s=args.admin_timeout_s,
                                  curve=curve(args))
        slo = next((d["slo_p99_ms"] for d in status["deployments"] if d["name"] == args.model),
                   0.0)
        async with client_of(args, fail_fast=False) as client:
            await client.infer(args.model, inputs, timeout_s=args.request_timeout_s)
            arrivals, seconds = await run_profile(
                client, args.admin, args.model, inputs, profile=args.profile,
                duration_s=args.duration_s, base_rps=args.base_rps,
                peak_rps=args.base_rps * args.peak_x, timeout_s=args.request_timeout_s,
                out=sys.stderr, admin_curve=curve(args))
        return arrivals, seconds, slo

    arrivals, seconds, slo = run(go())
    lat = sorted(a.latency_ms for a in arrivals if a.latency_ms is not None)
    errors: dict[str, int] = {}
    for a in arrivals:
        if a.error:
            errors[a.error] = errors.get(a.error, 0) + 1
    summary = {
        "model": args.model, "profile": args.profile, "duration_s": args.duration_s,
        "base_rps": args.base_rps, "peak_rps": args.base_rps * args.peak_x,
        "requests": len(arrivals), "answered": len(lat), "errors": errors,
        "p50_ms": round(percentile(lat, 50), 3), "p99_ms": round(percentile(lat, 99), 3),
        "slo_p99_ms": slo,
        "seconds_over_slo": sum(1 for s in seconds if s.p99_ms > slo) if slo else None,
        "worker_seconds": sum(max(0, s.workers) for s in seconds),
        "max_worlds": max((s.worlds for s in seconds), default=0),
        "per_second": [asdict(s) for s in seconds],
    }
    if args.plot:
        plot_profile(seconds, arrivals, slo, args.plot,
                     f"{args.model}: {args.profile} {args.base_rps:g} -> "
                     f"{args.base_rps * args.peak_x:g} req/s")
    if args.json:
        print(json.dumps(summary))
    else:
        rows = [(k, v) for k, v in summary.items() if k != "per_second"]
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    return 0


async def _inputs_for(args: argparse.Namespace) -> dict[str, Any]:
    from mesh.admin_client import admin_call
    from mesh.cli.inputs import example_inputs, parse_assignments

    if args.input:
        return parse_assignments(args.input)
    status = await admin_call(args.admin, "status", {}, timeout_s=args.admin_timeout_s,
                                  curve=curve(args))
    for dep in status["deployments"]:
        if dep["name"] == args.model:
            inputs = example_inputs(dep.get("inputs") or {})
            if not inputs:
                raise MeshError(f"deployment {args.model!r} has not described its inputs yet; "
                                "pass --input KEY=JSON")
            return inputs
    from mesh.errors import UnknownModel

    raise UnknownModel(f"no deployment named {args.model!r}")


def run_bench_cli(args: argparse.Namespace) -> int:
    from mesh.ports import require_listening

    if args.concurrency < 1 or args.duration_s <= 0:
        print("meshctl bench: --concurrency must be >= 1 and --duration-s > 0", file=sys.stderr)
        return 2
    if args.plot and not args.profile:
        print("meshctl bench: --plot draws an open-loop run: add --profile step|ramp|spike|"
              "diurnal", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("meshctl bench: --plot needs matplotlib, which meshserve does not install by "
                  "default: pip install 'meshserve[plot]' (or pip install matplotlib)",
                  file=sys.stderr)
            return 2
    require_listening(args.admin if not args.input else args.endpoint,
                      "--admin or MESH_ADMIN" if not args.input else "--endpoint")
    if args.profile:
        return _run_profile_cli(args)

    async def go() -> BenchResult:
        inputs = await _inputs_for(args)
        async with client_of(args, fail_fast=False) as client:
            # One request first: fail fast (unknown model, bad inputs) before the load starts.
            await client.infer(args.model, inputs, timeout_s=args.request_timeout_s)
            return await closed_loop(
                client, args.model, inputs, concurrency=args.concurrency,
                duration_s=args.duration_s, warmup_s=args.warmup_s,
                timeout_s=args.request_timeout_s, progress=Progress(sys.stderr, args.duration_s))

    result = run(go())
    print(json.dumps(result.to_dict()) if args.json else render_result(result))
    return 0


def add_commands(sub: Any) -> None:
    s = sub.add_parser("bench", help="closed-loop load with latency percentiles")
    s.add_argument("model", help="the deployment")
    s.add_argument("--concurrency", type=int, default=16, help="closed-loop callers")
    s.add_argument("--duration-s", type=float, default=10.0, help="how long to measure")
    s.add_argument("--warmup-s", type=float, default=1.0,
                   help="load before the measurement starts (not counted)")
    s.add_argument("--input", action="append", default=[], metavar="KEY[:DTYPE]=JSON",
                   help="request inputs (default: zeros shaped as the deployment's inputs)")
    add_endpoint(s)
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("--request-timeout-s", type=float, default=30.0,
                   help="each request's deadline")
    s.add_argument("--profile", choices=["step", "ramp", "spike", "diurnal"],
                   help="open-loop Poisson load following a profile instead of a closed loop")
    s.add_argument("--base-rps", type=float, default=20.0, help="profile: the 1x rate")
    s.add_argument("--peak-x", type=float, default=4.0, help="profile: peak as a multiple")
    s.add_argument("--plot", help="profile: draw latency vs SLO and live worlds to this PNG")
    s.set_defaults(func=run_bench_cli)
