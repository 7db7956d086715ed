"""How evenly a two-stage pipeline's work falls on its stages: the cut by parameter count
against the cut by measured cost (issue 30), on the built-in ``resnet``.

    python -m bench.splits [--width 64] [--image 64] [--rows 8] [--max-batch-size 16]
                           [--concurrency 4] [--duration-s 10] [--rounds 3] [--json FILE]

For each cut, a controller with its local workers serves one world of ``resnet`` in two stages
(``max_worlds = 1``, ``max_batch_size`` as given, two micro-batches a batch, no autoscaling, one
torch thread per worker), and ``mesh.loadgen``'s closed loop drives it with ``--concurrency``
callers, each request ``--rows`` images, for ``--duration-s`` after a warm-up. The figure is
the one the issue was measured with: each stage worker's ``busy_s`` (seconds spent computing,
less the time blocked on its peer; status ``workers[].busy_s``) over the run, and the ratio of
the busier stage's to the other's. The cut by parameter count is the same deployment with
``split_points`` set to what ``worker.stages.split_points_for`` gives (what a world did before
the measured cut); the measured cut names none. The two alternate round by round, the order
reversed every other round. Prints a markdown table of every run, one of each cut's medians
over the rounds (each stage's busy seconds, and the median of the rounds' own ratios), and
those medians as JSON; --json writes every figure to a file. Nothing asserts.

A request is never split between micro-batches, so with the defaults every micro-batch holds
8 images: the batch the worker measured the children on (one micro-batch of a full batch).
Smaller requests make smaller micro-batches, on which the weight-heavy last layer costs
relatively more, so the cut balanced at 8 rows is less even there (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mesh.admin_client import admin_call
from mesh.client import Client
from mesh.loadgen import closed_loop
from mesh.loop import run as run_loop
from mesh.testing.configs import deployment as deployment_table
from mesh.testing.configs import write_config
from mesh.testing.ports import free_ports
from mesh.testing.processes import end_processes, start_controller
from mesh.testing.waits import admin_status, serving, wait_status


def deployment(args: argparse.Namespace, split_points: list[int] | None) -> str:
    table = deployment_table(
        "resnet", "worker.models.resnet:build",
        factory_kwargs={"width": args.width, "image": args.image}, stages=2, worlds=1,
        min_worlds=1, max_worlds=1, micro_batches=2, max_batch_size=args.max_batch_size)
    return table + (f"split_points = {split_points}\n" if split_points else "")


def stage_counters(status: dict[str, Any]) -> list[tuple[float, int, int]]:
    """Each stage worker's busy_s, rows and batches (the last rank counts micro-batches)."""
    (world,) = [w for w in status["worlds"] if w["state"] == "serving"]
    by_id = {w["id"]: w for w in status["workers"]}
    return [(by_id[wid]["busy_s"], by_id[wid]["rows"], by_id[wid]["batches"])
            for wid in world["workers"]]


async def one_run(args: argparse.Namespace, cut: str, split_points: list[int] | None,
                  folder: Path) -> dict[str, Any]:
    ports = free_ports("client", "admin", "worker")
    admin = f"tcp://127.0.0.1:{ports['admin']}"
    config = write_config(folder / f"{cut}-{ports['admin']}.toml", ports,
                          deployment(args, split_points), worker_threads=1,
                          preload_warm=False)
    proc = start_controller(config, config.with_suffix(".log"), log_level="INFO")
    try:
        await wait_status(admin_status(admin), serving, 180.0, "the resnet world serving",
                          interval_s=0.25)
        x = np.random.default_rng(0).standard_normal(
            (args.rows, 3, args.image, args.image)).astype(np.float32)
        async with Client(f"tcp://127.0.0.1:{ports['client']}") as client:
            await closed_loop(client, "resnet", {"x": x}, concurrency=args.concurrency,
                              duration_s=1.0, warmup_s=0.5)  # both stages warm
            await asyncio.sleep(0.5)  # a heartbeat after the warm-up
            before = stage_counters(await admin_call(admin, "status"))
            result = await closed_loop(client, "resnet", {"x": x},
                                       concurrency=args.concurrency,
                                       duration_s=args.duration_s, warmup_s=0.0)
        await asyncio.sleep(0.5)  # the counters come with heartbeats (every 200 ms)
        status = await admin_call(admin, "status")
    finally:
        end_processes([proc], 30.0)
    after = stage_counters(status)
    busy = [b[0] - a[0] for a, b in zip(before, after, strict=True)]
    rows, micro = after[-1][1] - before[-1][1], after[-1][2] - before[-1][2]
    split = status["deployments"][0].get("split") or {}
    return {"cut": cut, "split_points": split_points, "split": split, "busy_s": busy,
            "rows": args.rows,
            "ratio": max(busy) / max(min(busy), 1e-9), "rps": result.rps,
            "rows_per_micro_batch": rows / max(micro, 1),
            "p50_ms": result.p50_ms, "p99_ms": result.p99_ms, "errors": result.errors}


def render(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"resnet width {args.width}, {args.image}x{args.image} images, 2 stages, "
             f"max_batch_size {args.max_batch_size}, {args.concurrency} callers of "
             f"{args.rows} image(s), {args.duration_s:.0f} s per run",
             "", "| cut | stage 0 children | stage 1 children | measured ms (0, 1) | "
             "busy s stage 0 | busy s stage 1 | busier / other | images/s | p50 ms | "
             "images per micro-batch |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        stages = (r["split"] or {}).get("stages") or [{}, {}]
        children = ["-".join(map(str, s.get("children", ["?"]))) for s in stages]
        ms = ", ".join("-" if s.get("ms") is None else f"{s['ms']:.1f}" for s in stages)
        lines.append(f"| {r['cut']} | {children[0]} | {children[1]} | {ms} | "
                     f"{r['busy_s'][0]:.2f} | {r['busy_s'][1]:.2f} | {r['ratio']:.2f} | "
                     f"{r['rps'] * args.rows:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['rows_per_micro_batch']:.1f} |")
    return "\n".join(lines)


def medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per cut, over its rounds: the median of each stage's busy seconds, of the rounds' own
    busier / other ratios (with their least and most), of images/s and of p50."""
    out: dict[str, dict[str, Any]] = {}
    for cut in dict.fromkeys(r["cut"] for r in runs):
        mine = [r for r in runs if r["cut"] == cut]
        ratios = [r["ratio"] for r in mine]
        out[cut] = {
            "rounds": len(mine),
            "children": [s.get("children") for s in (mine[-1]["split"] or {}).get("stages", [])],
            "busy_s": [statistics.median(r["busy_s"][i] for r in mine)
                       for i in range(len(mine[0]["busy_s"]))],
            "ratio": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "images_per_s": statistics.median(r["rps"] * r["rows"] for r in mine),
            "p50_ms": statistics.median(r["p50_ms"] for r in mine),
            "errors": sum(sum(r["errors"].values()) for r in mine)}
    return out


def render_medians(summary: dict[str, dict[str, Any]]) -> str:
    lines = ["| cut | rounds | busy s stage 0 | busy s stage 1 | busier / other (min-max) | "
             "images/s | p50 ms |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for cut, m in summary.items():
        lines.append(f"| {cut} | {m['rounds']} | {m['busy_s'][0]:.2f} | {m['busy_s'][1]:.2f} | "
                     f"{m['ratio']:.2f} ({m['ratio_min']:.2f}-{m['ratio_max']:.2f}) | "
                     f"{m['images_per_s']:.1f} | {m['p50_ms']:.1f} |")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    from worker.models.resnet import build
    from worker.stages import split_points_for

    by_weight = split_points_for(build(width=args.width, image=args.image), 2)
    cuts: list[tuple[str, list[int] | None]] = [("parameters", by_weight), ("measured", None)]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-splits-") as folder:
        for round_ in range(args.rounds):
            for cut, points in cuts if round_ % 2 == 0 else cuts[::-1]:
                runs.append(await one_run(args, cut, points, Path(folder)))
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--image", type=int, default=64)
    p.add_argument("--rows", type=int, default=8, help="images per request")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default="")
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    results = run_loop(main(arguments))
    if arguments.json:  # every run first, whatever follows
        Path(arguments.json).write_text(json.dumps({"args": vars(arguments), "runs": results},
                                                   indent=2))
    summary = medians(results)
    print(render(results, arguments))
    print("\nMedians over the rounds:\n")
    print(render_medians(summary))
    print("\n" + json.dumps(summary, indent=2))
    if arguments.json:
        Path(arguments.json).write_text(json.dumps({"args": vars(arguments), "runs": results,
                                                    "medians": summary}, indent=2))
