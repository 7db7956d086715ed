"""Chaos: steady load while a random worker is SIGKILLed every few seconds.

    python -m bench.chaos [--duration-s 30] [--kill-every-s 5] [--scenario warm|cold|both]
                          [--runs N] [--json out.json] [--plot timeline.png]

A real controller (subprocess) serves a 2-stage ``mlp`` in several worlds; a closed loop of
clients keeps it busy while ``meshctl kill`` (the admin API) kills a random serving worker.
The client side keeps its own ledger, so the figures do not trust the controller's counters:
requests sent, answered, failed and duplicated; p50/p99 before the first kill, while
recovering, and after. From the controller's events: crash detection (kill -> worker declared
dead), and re-formation (world broken -> replacement world serving), with the warm pool on
("warm": an idle, started worker takes the place) or off ("cold": a new process is spawned).
With ``--runs N`` each scenario runs N times (seeds seed..seed+N-1), a row per run, and the
totals: errors a client saw, requests lost (sent, never answered) and duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mesh.admin_client import admin_call
from mesh.errors import MeshError
from mesh.loop import run as run_loop
from mesh.stats import percentile
from mesh.testing.configs import write_config
from mesh.testing.ledger import Ledger, LedgerClient
from mesh.testing.ports import free_ports
from mesh.testing.processes import end_processes, start_controller
from mesh.testing.waits import admin_status, wait_status


def deployment(worlds: int, hidden: int) -> str:
    return f"""
[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
factory_kwargs = {{ hidden = {hidden} }}
stages = 2
worlds = {worlds}
max_worlds = {worlds + 2}
default_timeout_ms = 10000
"""


async def scenario(name: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    warm = 1 if name == "warm" else 0
    ports = free_ports("client", "admin", "worker")
    # The world count is this benchmark's to hold steady: no autoscaling.
    config = write_config(Path(tempfile.mkdtemp(prefix="meshserve-chaos-")) / "chaos.toml",
                          ports, deployment(args.worlds, args.hidden), worker_threads=1,
                          warm_workers=warm, autoscale=False)
    admin = f"tcp://127.0.0.1:{ports['admin']}"
    ctrl = start_controller(config, config.with_suffix(".log"), log_level="INFO")
    rng = random.Random(seed)
    samples: list[tuple[float, float]] = []  # (wall time done, latency ms)
    errors: list[tuple[float, str]] = []
    kills: list[dict[str, Any]] = []
    worlds_timeline: list[tuple[float, int]] = []
    stop = asyncio.Event()
    try:
        await wait_status(  # spares start after the worlds
            admin_status(admin),
            lambda s: sum(w["state"] == "serving" for w in s["worlds"]) >= args.worlds
            and sum(w["state"] == "idle" for w in s["workers"]) >= warm,
            120.0, f"{args.worlds} worlds serving and {warm} warm workers")
        x = np.zeros((1, 64), dtype=np.float32)
        async with LedgerClient(f"tcp://127.0.0.1:{ports['client']}") as client:

            async def caller() -> None:
                while not stop.is_set():
                    t0 = time.time()
                    try:
                        await client.infer("mlp", {"x": x}, timeout_s=10.0)
                        samples.append((time.time(), (time.time() - t0) * 1000.0))
                    except MeshError as exc:
                        errors.append((time.time(), exc.code))

            async def watch_worlds() -> None:
                while not stop.is_set():
                    try:
                        s = await admin_call(admin, "status", timeout_s=2.0)
                        worlds_timeline.append(
                            (time.time(), sum(w["state"] == "serving" for w in s["worlds"])))
                    except MeshError:
                        pass
                    await asyncio.sleep(0.1)

            tasks = [asyncio.create_task(caller()) for _ in range(args.concurrency)]
            watcher = asyncio.create_task(watch_worlds())
            started = time.time()
            await asyncio.sleep(args.warmup_s)
            next_kill = time.time()
            end = started + args.warmup_s + args.duration_s
            while time.time() < end:
                if time.time() >= next_kill and len(kills) < args.max_kills:
                    status = await admin_call(admin, "status", timeout_s=2.0)
                    victims = [w for w in status["workers"] if w["state"] == "serving"]
                    if victims:
                        victim = rng.choice(victims)
                        known = [w["id"] for w in status["workers"]]
                        await admin_call(admin, "kill", {"worker": victim["id"]})
                        kills.append({"t": time.time(), "worker": victim["id"],
                                      "pid": victim["pid"], "worlds": victim["worlds"],
                                      "known": known})
                        print(f"[{name}] t={time.time() - started:5.1f}s killed {victim['id']} "
                              f"(worlds {victim['worlds']})", file=sys.stderr, flush=True)
                    next_kill = time.time() + args.kill_every_s
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*tasks, watcher)
            final = await admin_call(admin, "status", timeout_s=5.0)
    finally:
        stop.set()
        end_processes([ctrl], 30.0)
    result = summarize(name, started, args, samples, errors, client.ledger, kills,
                       final["events"], worlds_timeline)
    result["seed"] = seed
    return result


def summarize(name: str, started: float, args: argparse.Namespace,
              samples: list[tuple[float, float]], errors: list[tuple[float, str]],
              ledger: Ledger, kills: list[dict[str, Any]], events: list[dict[str, Any]],
              worlds_timeline: list[tuple[float, int]]) -> dict[str, Any]:
    detection: list[float] = []
    reform_reused: list[float] = []  # the replacement used workers already running
    reform_spawned: list[float] = []  # the replacement needed a newly started process
    formed_ms: list[float] = []  # controller: Join sent -> every rank joined, replacements
    recovered_at: list[float] = []
    serving = sorted((e for e in events if e["event"] == "world_serving"), key=lambda e: e["t"])
    used: set[int] = set()
    for kill in kills:
        dead = [e["t"] for e in events if e["event"] == "worker_dead"
                and e.get("worker") == kill["worker"] and e["t"] >= kill["t"] - 0.5]
        if dead:
            detection.append((min(dead) - kill["t"]) * 1000.0)
        broken = sorted((e for e in events if e["event"] == "world_broken"
                         and kill["t"] - 0.5 <= e["t"] <= kill["t"] + 3.0), key=lambda e: e["t"])
        for b in broken:
            # Each broken world is matched with the next replacement world not matched yet.
            nxt = next((s for s in serving if s["t"] >= b["t"] and s["world"] not in used), None)
            if nxt is None:
                continue
            used.add(nxt["world"])
            took_ms = (nxt["t"] - b["t"]) * 1000.0
            fresh = any(w not in kill["known"] for w in nxt["workers"])
            (reform_spawned if fresh else reform_reused).append(took_ms)
            formed_ms.append(float(nxt.get("formed_ms", 0.0)))
            recovered_at.append(nxt["t"])
    first_kill = kills[0]["t"] if kills else float("inf")
    last_recovery = max(recovered_at) if recovered_at else first_kill

    def window(lo: float, hi: float) -> dict[str, float]:
        vals = sorted(lat for t, lat in samples if lo <= t < hi)
        return {"n": len(vals), "p50_ms": round(percentile(vals, 50), 3),
                "p99_ms": round(percentile(vals, 99), 3)}

    end = started + args.warmup_s + args.duration_s + 60
    return {
        "scenario": name,
        "requests_sent": ledger.sent,
        "answered": ledger.answered,
        "lost": ledger.lost,
        "succeeded": len(samples),
        "failed": len(errors),
        "failed_codes": dict(Counter(code for _, code in errors)),
        "duplicated": ledger.duplicates,
        "late_answers": sum(ledger.late.values()),
        "kills": len(kills),
        "detection_ms": [round(v, 1) for v in detection],
        "detection_median_ms": round(statistics.median(detection), 1) if detection else None,
        "reform_reused_ms": [round(v, 1) for v in reform_reused],
        "reform_reused_median_ms": med(reform_reused),
        "reform_spawned_ms": [round(v, 1) for v in reform_spawned],
        "reform_spawned_median_ms": med(reform_spawned),
        "replacement_formed_ms": [round(v, 1) for v in formed_ms],
        "before": window(started + args.warmup_s, first_kill),
        "during": window(first_kill, last_recovery + 0.001),
        "after": window(last_recovery + 0.001, end),
        "timeline": {"samples": samples, "worlds": worlds_timeline,
                     "kills": [k["t"] for k in kills], "start": started},
    }


def med(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def render(results: list[dict[str, Any]]) -> str:
    lines = ["", "| pool | sent | answered | failed | duplicated | kills | crash detection "
                 "median ms | re-form median ms, running workers (n) | re-form median ms, "
                 "new process (n) | p50/p99 ms before | during recovery | after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in results:
        def pp(w: dict[str, float]) -> str:
            return f"{w['p50_ms']:.1f} / {w['p99_ms']:.1f}"
        lines.append(f"| {r['scenario']} | {r['requests_sent']} | {r['answered']} | "
                     f"{r['failed']} | {r['duplicated']} | {r['kills']} | "
                     f"{r['detection_median_ms']} | {r['reform_reused_median_ms']} "
                     f"({len(r['reform_reused_ms'])}) | {r['reform_spawned_median_ms']} "
                     f"({len(r['reform_spawned_ms'])}) | "
                     f"{pp(r['before'])} | {pp(r['during'])} | {pp(r['after'])} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(11, 4 * len(results)), squeeze=False)
    for ax, r in zip(axes[:, 0], results, strict=True):
        tl = r["timeline"]
        t0 = tl["start"]
        ax.scatter([t - t0 for t, _ in tl["samples"]], [lat for _, lat in tl["samples"]], s=2,
                   alpha=0.4, label="request latency (ms)")
        ax.set_yscale("log")
        ax.set_ylabel("latency ms")
        for k in tl["kills"]:
            ax.axvline(k - t0, color="red", linestyle="--", linewidth=1)
        ax2 = ax.twinx()
        ax2.step([t - t0 for t, _ in tl["worlds"]], [n for _, n in tl["worlds"]], where="post",
                 color="green", label="serving worlds")
        ax2.set_ylabel("serving worlds")
        ax2.set_ylim(0, max([n for _, n in tl["worlds"]] + [1]) + 1)
        ax.set_title(f"chaos ({r['scenario']} pool): red = SIGKILL; {r['failed']} failed, "
                     f"{r['duplicated']} duplicated of {r['requests_sent']}")
        ax.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    names = ["warm", "cold"] if args.scenario == "both" else [args.scenario]
    results = []
    for name in names:
        for i in range(args.runs):
            result = await scenario(name, args, args.seed + i)
            if args.runs > 1:
                print(f"[{name}] run {i + 1}/{args.runs} (seed {result['seed']}): sent "
                      f"{result['requests_sent']}, failed {result['failed']} "
                      f"{result['failed_codes'] or ''}, lost {result['lost']}, duplicated "
                      f"{result['duplicated']}, kills {result['kills']}", file=sys.stderr,
                      flush=True)
            results.append(result)
    return results


def render_totals(results: list[dict[str, Any]]) -> str:
    lines = ["", "| pool | runs | kills | sent | failed | lost | duplicated | failed codes |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name in dict.fromkeys(r["scenario"] for r in results):
        rs = [r for r in results if r["scenario"] == name]
        codes: Counter[str] = Counter()
        for r in rs:
            codes.update(r["failed_codes"])
        lines.append(f"| {name} | {len(rs)} | {sum(r['kills'] for r in rs)} | "
                     f"{sum(r['requests_sent'] for r in rs)} | {sum(r['failed'] for r in rs)} | "
                     f"{sum(r['lost'] for r in rs)} | {sum(r['duplicated'] for r in rs)} | "
                     f"{dict(codes) or '-'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--kill-every-s", type=float, default=5.0)
    parser.add_argument("--max-kills", type=int, default=5)
    parser.add_argument("--worlds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512, help="mlp width (load time)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--scenario", choices=["warm", "cold", "both"], default="both")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=1, help="repeat each scenario N times")
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--plot", help="draw a PNG timeline here (needs matplotlib)")
    args = parser.parse_args()
    results = run_loop(run(args))
    print(render(results))
    if args.runs > 1:
        print(render_totals(results))
    if args.json:
        slim = [{k: v for k, v in r.items() if k != "timeline"} for r in results]
        Path(args.json).write_text(json.dumps(slim, indent=2))
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MESH_LOG_LEVEL", "WARNING")
    sys.exit(main())
