"""meshctl's admin commands: each verb's arguments, the admin command it sends and how its
answer prints. A verb here, its typed arguments in mesh/messages.py ``ADMIN_ARGS`` and its
handler in the controller are all an admin command is (docs/architecture.md)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mesh.cli.common import admin
from mesh.errors import ConfigError


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    return "\n".join(lines)


def render_status(status: dict[str, Any]) -> str:
    """The table ``meshctl status`` prints."""
    deps = [[d["name"], d["stages"], f"{d['worlds_current']}/{d['worlds_desired']}",
             f"[{d['min_worlds']},{d['max_worlds']}]", d["slo_p99_ms"], d["p50_ms"],
             d["p95_ms"], d["p99_ms"], d["rps"], d["queued"], d["in_flight"],
             sum(d["errors"].values())] for d in status["deployments"]]
    worlds = [[w["id"], w["deployment"], w["epoch"], w["state"],
               w.get("backend", ""), " ".join(f"{r['rank']}:{r['worker']}" for r in w["ranks"]),
               w["in_flight"], w["served"]] for w in status["worlds"]]
    workers = [[w["id"], w["pid"], w["host"], w["device"], w["state"],
                ",".join(map(str, w["worlds"])) or "-",
                f"{w['stages_loaded']} ({w['stages_idle']} idle)", w["reason"]]
               for w in status["workers"]]
    decisions = [f"  {d['name']}: {d['last_decision']['from']} -> {d['last_decision']['to']} "
                 f"worlds: {d['last_decision']['reason']}"
                 for d in status["deployments"] if d.get("last_decision")]
    down = [f"  {d['name']}: {d['unavailable']}" for d in status["deployments"]
            if d.get("unavailable")]
    rollouts = [f"  {d['name']}: revision {r['from_revision']} -> {r['to_revision']} "
                f"{r['state']}" + (f": {r['reason']}" if r.get("reason") else "")
                for d in status["deployments"] if (r := d.get("rollout"))
                and (r["state"] != "done")]
    routes = [f"  {r['name']}: " + ", ".join(
        f"{name} {weight} ({100 * r['observed'].get(name, 0.0):.1f}% of "
        f"{sum(r['sent'].values())} sent)" for name, weight in r["to"].items())
        for r in status.get("routes", [])]
    parts = [
        "DEPLOYMENTS",
        _table(["NAME", "STAGES", "WORLDS", "BOUNDS", "SLO_P99", "P50_MS", "P95_MS", "P99_MS",
                "RPS", "QUEUED", "IN_FLIGHT", "ERRORS"], deps),
        *(["NOT SERVING (requests are answered 'unavailable')", *down] if down else []),
        *(["LAST SCALING DECISIONS", *decisions] if decisions else []),
        *(["ROLLOUTS", *rollouts] if rollouts else []),
        *(["ROUTES (weight, observed split)", *routes] if routes else []),
        "",
        "WORLDS",
        _table(["ID", "DEPLOYMENT", "EPOCH", "STATE", "BACKEND", "RANKS", "IN_FLIGHT",
                "SERVED"], worlds),
        "",
        "WORKERS",
        _table(["ID", "PID", "HOST", "DEVICE", "STATE", "WORLDS", "STAGES", "REASON"], workers),
    ]
    return "\n".join(parts)


def cmd_status(args: argparse.Namespace) -> int:
    status = admin(args, "status", {})
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    if args.worlds is None and args.min is None and args.max is None:
        raise ConfigError("scale needs --worlds N, or --min N and/or --max M")
    print(json.dumps(admin(args, "scale", {"deployment": args.model, "worlds": args.worlds,
                                           "min_worlds": args.min, "max_worlds": args.max})))
    return 0


def cmd_slo(args: argparse.Namespace) -> int:
    print(json.dumps(admin(args, "slo", {"deployment": args.model, "p99_ms": args.p99_ms})))
    return 0


def cmd_fault(args: argparse.Namespace) -> int:
    if args.worker == "controller":
        if args.stall_ms is None:
            raise ConfigError("fault controller needs --stall-ms MS")
        call = {"worker": "controller", "stall_ms": args.stall_ms}
    elif args.delay_ms is None:
        raise ConfigError("fault WORKER needs --delay-ms MS")
    else:
        call = {"worker": args.worker, "delay_ms": args.delay_ms}
    print(json.dumps(admin(args, "fault", call)))
    return 0


def cmd_form(args: argparse.Namespace) -> int:
    print(json.dumps(admin(args, "form", {"deployment": args.model, "workers": args.workers})))
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    print(json.dumps(admin(args, "drain", {"target": args.target})))
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    print(json.dumps(admin(args, "kill", {"worker": args.worker})))
    return 0


def cmd_unquarantine(args: argparse.Namespace) -> int:
    print(json.dumps(admin(args, "unquarantine", {"worker": args.worker})))
    return 0


def add_commands(sub: Any) -> None:
    s = sub.add_parser("status", help="deployments, worlds, workers, latency and load")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("scale", help="set a deployment's world count or its bounds")
    s.add_argument("model", help="the deployment")
    s.add_argument("--worlds", type=int, help="the desired number of worlds")
    s.add_argument("--min", type=int, help="the autoscaler's lower bound (min_worlds)")
    s.add_argument("--max", type=int, help="the autoscaler's upper bound (max_worlds)")
    s.set_defaults(func=cmd_scale)

    s = sub.add_parser("slo", help="set a deployment's latency target")
    s.add_argument("model", help="the deployment")
    s.add_argument("--p99-ms", type=float, required=True,
                   help="the p99 latency target in milliseconds")
    s.set_defaults(func=cmd_slo)

    s = sub.add_parser("form", help="form a world on chosen workers, in rank order (a worker "
                       "may already serve other worlds)")
    s.add_argument("model", help="the deployment")
    s.add_argument("workers", nargs="+", metavar="WORKER", help="worker ids, rank 0 first")
    s.set_defaults(func=cmd_form)

    s = sub.add_parser("drain", help="stop routing to a worker or world, finish, release it")
    s.add_argument("target", help="worker id or world id")
    s.set_defaults(func=cmd_drain)

    s = sub.add_parser("kill", help="SIGKILL a worker through its launcher (fault injection)")
    s.add_argument("worker", help="the worker id (meshctl status lists them)")
    s.set_defaults(func=cmd_kill)

    s = sub.add_parser("fault", help="fault injection: slow a worker's computations down, or "
                       "stall the controller's loop ('fault controller --stall-ms MS')")
    s.add_argument("worker", help="a worker id, or 'controller'")
    s.add_argument("--delay-ms", type=float, help="worker: added per batch; 0 clears")
    s.add_argument("--stall-ms", type=float,
                   help="controller: block its event loop this long, once")
    s.set_defaults(func=cmd_fault)

    s = sub.add_parser("unquarantine", help="give a worker quarantined for its stalls or "
                       "deaths worlds again")
    s.add_argument("worker", help="the worker id (status shows why it is quarantined)")
    s.set_defaults(func=cmd_unquarantine)
