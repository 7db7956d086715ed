"""``meshctl apply FILE``: make a file's deployments and routes the running set, and wait for
it to be done (controller/fleet_apply.py does the work; this prints the plan, shows progress
and says how it ended)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from mesh.cli.common import admin
from mesh.errors import ConfigError, DeadlineExceeded


def read_document(path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path!r} is not valid TOML: {exc}") from None


def render_plan(plan: dict[str, Any]) -> str:
    lines = []
    for name in plan["add"]:
        lines.append(f"  add      {name}")
    for item in plan["roll"]:
        lines.append(f"  roll     {item['deployment']} ({', '.join(item['changed'])}): new "
                     "worlds form and serve, then the old ones drain")
    for item in plan["update"]:
        lines.append(f"  update   {item['deployment']} ({', '.join(item['changed'])}): in "
                     "place")
    for name in plan["remove"]:
        lines.append(f"  remove   {name}: drains, then its name answers unknown_model")
    for name in plan["unchanged"]:
        lines.append(f"  keep     {name}")
    for verb in ("add", "change", "remove"):
        for name in plan["routes"].get(verb, []):
            lines.append(f"  {verb:<8} route {name}")
    lines += [f"  not applied: {why}" for why in plan["not_applied"]]
    return "\n".join(lines) or "  nothing to change"


def progress(plan: dict[str, Any], status: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """Each change's state now (``name -> line``) and the failures among them."""
    deps = {d["name"]: d for d in status["deployments"]}
    lines: dict[str, str] = {}
    failed: list[str] = []
    for item in plan["roll"]:
        name = item["deployment"]
        dep = deps.get(name)
        rollout = dep.get("rollout") if dep else None
        if dep is None or rollout is None:
            continue
        revision = rollout["to_revision"]
        worlds = [w for w in status["worlds"] if w["deployment"] == name]
        new = sum(1 for w in worlds if w["revision"] == revision and w["state"] == "serving")
        old = sum(1 for w in worlds if w["revision"] != revision)
        lines[name] = (f"{name}: revision {revision} {rollout['state']}: {new} new world(s) "
                       f"serving, {old} old")
        if rollout["state"] == "failed":
            failed.append(f"{name}: revision {revision} failed to load, revision "
                          f"{rollout['from_revision']} keeps serving: {rollout['reason']}")
        elif rollout["state"] == "rolling":
            lines[name] += " ..."
    for name in plan["add"]:
        dep = deps.get(name)
        if dep is None:
            continue
        lines[name] = f"{name}: {dep['worlds_current']}/{dep['worlds_desired']} world(s) serving"
        if dep["quarantined"] or dep["unavailable"]:
            failed.append(f"{name}: {dep['quarantined'] or dep['unavailable']}")
        elif dep["worlds_current"] < min(1, dep["worlds_desired"]):
            lines[name] += " ..."
    for name in plan["remove"]:
        lines[name] = f"{name}: draining ..." if name in deps else f"{name}: removed"
    return lines, failed


def cmd_apply(args: argparse.Namespace) -> int:
    document = read_document(args.file)
    answer = admin(args, "apply", {"document": document, "dry_run": args.dry_run})
    plan = answer["plan"]
    if args.json and (args.dry_run or args.no_wait):
        print(json.dumps(answer))
        return 0
    print(("plan (dry run: nothing changed):" if args.dry_run else "plan:") + "\n"
          + render_plan(plan), file=sys.stderr if args.json else sys.stdout)
    if args.dry_run or args.no_wait:
        return 0
    deadline = time.monotonic() + args.timeout_s
    shown: dict[str, str] = {}
    while True:
        lines, failed = progress(plan, admin(args, "status", {}))
        for name, line in lines.items():
            if shown.get(name) != line:
                shown[name] = line
                print("  " + line, file=sys.stderr, flush=True)
        if failed:
            print("meshctl apply: failed:\n  " + "\n  ".join(failed), file=sys.stderr)
            return 1
        if not any(line.endswith("...") for line in lines.values()):
            break
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"not done within {args.timeout_s:g}s: "
                                   + "; ".join(lines.values()))
        time.sleep(0.25)
    if args.json:
        print(json.dumps(answer))
    else:
        print("applied: " + ", ".join(f"{k} revision {v}" for k, v in
                                      sorted(answer.get("revisions", {}).items())))
    return 0


def add_commands(sub: Any) -> None:
    s = sub.add_parser("apply", help="make a file's deployments and routes the running set: "
                       "new ones come up, removed ones drain, changed ones roll")
    s.add_argument("file", help="a TOML file with [[deployments]] (and [[routes]])")
    s.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    s.add_argument("--no-wait", action="store_true",
                   help="return once the plan is under way, not when it is done")
    s.add_argument("--timeout-s", type=float, default=600.0,
                   help="how long to wait for the rollouts to finish")
    s.add_argument("--json", action="store_true", help="print the plan and result as JSON")
    s.set_defaults(func=cmd_apply)
