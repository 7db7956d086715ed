"""Soak: what time does to a cluster. Idle stretches longer than every timeout, load steps,
streams beside short requests, a worker shared by worlds, SIGKILLs and a SIGSTOP.

    python -m bench.soak [--short] [--json out.json]

A real controller (subprocess) serves a 2-stage ``mlp`` in three worlds (two of them share
their rank-0 worker) and a 2-stage ``tinygpt`` that streams; the world timeout is 4 s, so
every idle stretch outlasts it many times over (``--short``: 2 s, and every stretch shorter).
The program follows a schedule of phases:
closed-loop ``mlp`` callers and streaming callers, idle stretches of 60-80 s with no traffic,
and faults injected during the busy phases (SIGKILL of a serving worker, SIGKILL of the
shared worker, SIGSTOP of a serving worker). The full run lasts over ten minutes; ``--short``
(about 60 s, one idle stretch of 22 s: 11 world timeouts, and longer than the workers' 10 s
controller watchdog) runs in CI (tests/test_soak.py).

It prints, from the client's own ledger: requests sent, answered, failed and duplicated, and
streams whose text differs from the reference (a chunk lost or repeated); from the
controller's events: world breaks, each explained by an injected fault (a world of the
faulted worker) or not (the goal is none); and the RSS and open file descriptors of the
controller and of each worker at the start and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mesh.admin_client import admin_call
from mesh.client import Client
from mesh.errors import MeshError
from mesh.loop import run as run_loop
from mesh.testing.configs import write_config
from mesh.testing.ledger import LedgerClient
from mesh.testing.ports import free_ports
from mesh.testing.processes import end_processes, start_controller
from mesh.testing.waits import wait_status


@dataclass(frozen=True)
class Phase:
    kind: str  # "load" or "idle"
    seconds: float
    callers: int = 0  # closed-loop mlp callers
    streams: int = 0  # callers streaming tinygpt, one stream after another
    fault: str = ""  # "kill", "kill-shared" or "stop", injected at fault_at_s into the phase
    fault_at_s: float = 0.0


FULL = [
    Phase("load", 60, callers=4, streams=1),
    Phase("idle", 70),
    Phase("load", 60, callers=8, streams=1, fault="kill", fault_at_s=20),
    Phase("idle", 75),
    Phase("load", 60, callers=4, streams=2, fault="stop", fault_at_s=15),
    Phase("idle", 80),
    Phase("load", 60, callers=12, streams=1, fault="kill-shared", fault_at_s=20),
    Phase("idle", 70),
    Phase("load", 60, callers=4, streams=1),
    Phase("idle", 30),
]
# The short schedule runs at a 2 s world timeout: the same number of timeouts per idle
# stretch as a 4 s one would need twice the time for.
SHORT = [
    Phase("load", 10, callers=4, streams=1, fault="kill", fault_at_s=4),
    Phase("idle", 22),
    Phase("load", 10, callers=4, streams=1, fault="stop", fault_at_s=3),
    Phase("idle", 8),
    Phase("load", 6, callers=4, streams=1),
]

WORLD_TIMEOUT_MS = 4000
SHORT_WORLD_TIMEOUT_MS = 2000
PROMPTS = ["soak test", "The quick brown fox", "hello world", "meshserve"]
STREAM_TOKENS = 48


def deployments(world_timeout_ms: int = WORLD_TIMEOUT_MS) -> str:
    return f"""
[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
factory_kwargs = {{ hidden = 256 }}
stages = 2
worlds = 2
max_worlds = 4
world_timeout_ms = {world_timeout_ms}
default_timeout_ms = 20000

[[deployments]]
name = "tinygpt"
model = "worker.models.tinygpt:build"
stages = 2
max_batch_size = 1
max_worlds = 2
world_timeout_ms = {world_timeout_ms}
default_timeout_ms = 60000
"""


def process_figures(pid: int) -> dict[str, float]:
    """RSS (MB) and open file descriptors of a live process (Linux /proc); empty if gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return {}
    rss_kb = next(int(line.split()[1]) for line in status.splitlines()
                  if line.startswith("VmRSS:"))
    return {"rss_mb": round(rss_kb / 1024.0, 1), "fds": fds}


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.phases = SHORT if args.short else FULL
        self.rng = random.Random(args.seed)
        self.ok = 0
        self.failed: Counter[str] = Counter()
        self.streams = 0
        self.streams_bad = 0
        self.faults: list[dict[str, Any]] = []
        self.events: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.world_members: dict[int, list[str]] = {}
        self.admin = ""

    async def status(self) -> dict[str, Any]:
        status = await admin_call(self.admin, "status", timeout_s=5.0)
        for e in status["events"]:  # the controller keeps the last 100; we keep them all
            self.events[(e["t"], e["event"], e.get("world"), e.get("worker"))] = e
            if e["event"] == "world_serving":
                self.world_members[e["world"]] = list(e["workers"])
        for w in status["worlds"]:
            self.world_members[w["id"]] = list(w["workers"])
        return status

    async def wait_for(self, predicate: Any, what: str, timeout_s: float = 120.0
                       ) -> dict[str, Any]:
        return await wait_status(self.status, predicate, timeout_s, f"soak: {what}",
                                 interval_s=0.2)

    # -- load -----------------------------------------------------------------------------

    async def caller(self, client: Client, stop: asyncio.Event, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            x = rng.standard_normal((1, 64)).astype(np.float32)
            try:
                out = await client.infer("mlp", {"x": x}, timeout_s=20.0)
                assert out["y"].shape == (1, 10)
                self.ok += 1
            except MeshError as exc:
                self.failed[exc.code] += 1

    async def streamer(self, client: Client, stop: asyncio.Event, seed: int) -> None:
        from worker.models.tinygpt import generate

        rng = random.Random(seed)
        while not stop.is_set():
            prompt = rng.choice(PROMPTS)
            self.streams += 1
            text = []
            try:
                async for chunk in client.stream("tinygpt", {"prompt": prompt},
                                                 max_tokens=STREAM_TOKENS, timeout_s=60.0):
                    text.append(chunk["text"])
                self.ok += 1
                if "".join(text) != generate(prompt, STREAM_TOKENS):
                    self.streams_bad += 1
            except MeshError as exc:
                self.failed[exc.code] += 1

    # -- faults ---------------------------------------------------------------------------

    async def inject(self, kind: str, started: float) -> None:
        status = await self.status()
        serving = [w for w in status["workers"] if w["state"] == "serving"]
        if kind == "kill-shared":
            victims = [w for w in serving if len(w["worlds"]) > 1] or serving
        else:
            victims = serving
        victim = self.rng.choice(victims)
        fault = {"t": time.time(), "kind": kind, "worker": victim["id"], "pid": victim["pid"],
                 "worlds": list(victim["worlds"])}
        self.faults.append(fault)
        print(f"[soak] t={time.monotonic() - started:6.1f}s {kind} {victim['id']} (worlds "
              f"{victim['worlds']})", file=sys.stderr, flush=True)
        if kind == "stop":
            os.kill(victim["pid"], signal.SIGSTOP)
            await asyncio.sleep(5.0)  # Health declares it dead after 1.5 s and ends it
            try:
                os.kill(victim["pid"], signal.SIGCONT)
            except ProcessLookupError:
                pass
        else:
            os.kill(victim["pid"], signal.SIGKILL)

    # -- the run --------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        ports = free_ports("client", "admin", "worker")
        workdir = Path(tempfile.mkdtemp(prefix="meshserve-soak-"))
        config = write_config(
            workdir / "soak.toml", ports,
            deployments(SHORT_WORLD_TIMEOUT_MS if self.args.short else WORLD_TIMEOUT_MS),
            warm_workers=1, autoscale=False, worker_threads=1)
        self.admin = f"tcp://127.0.0.1:{ports['admin']}"
        ctrl = start_controller(config, workdir / "controller.log", log_level="INFO")
        try:
            result = await self._run(ctrl.pid, f"tcp://127.0.0.1:{ports['client']}", workdir)
        finally:
            end_processes([ctrl], 30.0)
        result["worker_endpoint"] = f"tcp://127.0.0.1:{ports['worker']}"
        return result

    async def _run(self, controller_pid: int, endpoint: str, workdir: Path) -> dict[str, Any]:
        status = await self.wait_for(
            lambda s: all(d["worlds_current"] >= d["worlds_desired"] for d in s["deployments"])
            and any(w["state"] == "idle" for w in s["workers"]), "the worlds and a warm worker")
        # A third mlp world on world A's rank-0 worker and the warm worker: a shared worker.
        mlp = [w for w in status["worlds"] if w["deployment"] == "mlp"]
        shared = mlp[0]["workers"][0]
        spare = next(w["id"] for w in status["workers"] if w["state"] == "idle")
        await admin_call(self.admin, "form", {"deployment": "mlp", "workers": [shared, spare]},
                         timeout_s=10.0)
        status = await self.wait_for(
            lambda s: sum(w["deployment"] == "mlp" and w["state"] == "serving"
                          for w in s["worlds"]) == 3
            and any(w["state"] == "idle" for w in s["workers"]),
            "the shared world and the warm pool refilled")
        before = self.figures(controller_pid, status)
        started = time.monotonic()
        schedule = []
        async with LedgerClient(endpoint) as client:
            for phase in self.phases:
                t0 = time.monotonic()
                schedule.append({"kind": phase.kind, "seconds": phase.seconds,
                                 "fault": phase.fault})
                load = (f" ({phase.callers} callers, {phase.streams} streams)"
                        if phase.kind == "load" else "")
                print(f"[soak] t={t0 - started:6.1f}s {phase.kind} {phase.seconds:.0f}s{load}",
                      file=sys.stderr, flush=True)
                stop = asyncio.Event()
                seeds = [self.rng.randrange(1 << 30) for _ in range(phase.callers + phase.streams)]
                tasks = [asyncio.create_task(self.caller(client, stop, seed))
                         for seed in seeds[:phase.callers]]
                tasks += [asyncio.create_task(self.streamer(client, stop, seed))
                          for seed in seeds[phase.callers:]]
                if phase.fault:
                    await asyncio.sleep(phase.fault_at_s)
                    await self.inject(phase.fault, started)
                while time.monotonic() - t0 < phase.seconds:
                    await asyncio.sleep(min(1.0, phase.seconds - (time.monotonic() - t0)))
                    try:
                        await self.status()
                    except MeshError:
                        pass
                stop.set()
                await asyncio.gather(*tasks)
            ledger = client.ledger
        status = await self.wait_for(
            lambda s: sum(w["deployment"] == "mlp" and w["state"] == "serving"
                          for w in s["worlds"]) >= 3, "the worlds re-formed", 60.0)
        after = self.figures(controller_pid, status)
        breaks = self.classify_breaks()
        return {
            "schedule": "short" if self.args.short else "full",
            "duration_s": round(time.monotonic() - started, 1),
            "requests_sent": ledger.sent,
            "answered": ledger.answered,
            "succeeded": self.ok,
            "failed": sum(self.failed.values()),
            "failed_codes": dict(self.failed),
            "lost": ledger.lost,
            "duplicated": ledger.duplicates,
            "late_answers": sum(ledger.late.values()),
            "streams": self.streams,
            "streams_wrong_text": self.streams_bad,
            "faults": self.faults,
            "world_breaks": len(breaks["explained"]) + len(breaks["unexplained"]),
            "world_breaks_explained": len(breaks["explained"]),
            "world_breaks_unexplained": breaks["unexplained"],
            "processes_start": before,
            "processes_end": after,
            "phases": schedule,
            "controller_log": str(workdir / "controller.log"),
        }

    def figures(self, controller_pid: int, status: dict[str, Any]) -> dict[str, Any]:
        out = {"controller": process_figures(controller_pid)}
        for w in status["workers"]:
            if w["state"] != "dead" and w["pid"]:
                out[w["id"]] = process_figures(w["pid"])
        return out

    def classify_breaks(self) -> dict[str, list[dict[str, Any]]]:
        """A break is explained when its world held a faulted worker, at most 30 s after the
        fault (the stopped worker's worlds break when Health ends it)."""
        explained: list[dict[str, Any]] = []
        unexplained: list[dict[str, Any]] = []
        for e in sorted(self.events.values(), key=lambda e: e["t"]):
            if e["event"] != "world_broken":
                continue
            members = self.world_members.get(e["world"], [])
            cause = next((f for f in self.faults if f["worker"] in members
                          and f["t"] - 1.0 <= e["t"] <= f["t"] + 30.0), None)
            (explained if cause is not None else unexplained).append(e)
        return {"explained": explained, "unexplained": unexplained}


def render(r: dict[str, Any]) -> str:
    lines = [
        f"soak ({r['schedule']}, {r['duration_s']:.0f} s, {len(r['faults'])} faults: "
        f"{', '.join(f['kind'] + ' ' + f['worker'] for f in r['faults'])})",
        "",
        "| sent | answered | failed | lost | duplicated | streams | streams with wrong text |"
        " world breaks | explained by a fault | unexplained |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['requests_sent']} | {r['answered']} | {r['failed']} | {r['lost']} | "
        f"{r['duplicated']} | {r['streams']} | {r['streams_wrong_text']} | "
        f"{r['world_breaks']} | {r['world_breaks_explained']} | "
        f"{len(r['world_breaks_unexplained'])} |",
        "",
        "| process | RSS MB start | RSS MB end | fds start | fds end |",
        "|---|---:|---:|---:|---:|",
    ]
    names = list(dict.fromkeys([*r["processes_start"], *r["processes_end"]]))
    for name in names:
        a = r["processes_start"].get(name) or {}
        b = r["processes_end"].get(name) or {}
        lines.append(f"| {name} | {a.get('rss_mb', '-')} | {b.get('rss_mb', '-')} | "
                     f"{a.get('fds', '-')} | {b.get('fds', '-')} |")
    for e in r["world_breaks_unexplained"]:
        lines.append(f"unexplained: world {e['world']} at {e['t']}: {e['reason']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="the ~60 s version CI runs")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    result = run_loop(Soak(args).run())
    print(render(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MESH_LOG_LEVEL", "WARNING")
    sys.exit(main())
