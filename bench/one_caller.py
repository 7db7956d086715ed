"""One caller, through the controller against the same worker driven directly, per model.

    python -m bench.one_caller [--device cuda] [--requests 2000] [--rounds 2] [--py-spy DIR]

For echo and the mlp demo: a controller with one world of each, and a direct worker of each
(bench/direct.py, no controller), all on ``--device``. Each round sends ``--requests`` requests
one at a time, after 300 of warm-up, to each of the four in turn, and prints percentiles of
the round trip. The served-minus-direct gap is what the controller adds to one request of that
model; the echo gap is its cost for a request that computes nothing. With ``--py-spy DIR``
(py-spy on the PATH), the last round also samples the served and the direct mlp worker
(``--idle``, raw format) into DIR, to compare where each worker's time goes.

Found on an H200 host (docs/benchmarks.md): the controller added 0.07 ms to echo at one
caller and 0.53 ms to the mlp, while each mlp worker spent the same time on a request. This
is the program that splits that gap further.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.direct import DirectWorker
from bench.overhead import deployments, settings
from mesh.client import Client
from mesh.loop import run as run_loop
from mesh.testing.configs import write_config
from mesh.testing.ports import free_ports
from mesh.testing.processes import end_processes, start_controller
from mesh.testing.waits import admin_status, serving, wait_status

PERCENTILES = (10, 25, 50, 75, 90, 95, 99)
INPUTS = {"echo": np.zeros((1, 4), np.float32), "mlp": np.zeros((1, 64), np.float32)}


def percentiles(latencies_ms: list[float]) -> dict[str, float]:
    ordered = sorted(latencies_ms)
    return {f"p{p}": ordered[min(len(ordered) - 1, len(ordered) * p // 100)]
            for p in PERCENTILES} | {"mean": statistics.fmean(ordered)}


async def one_at_a_time(caller: Any, model: str, requests: int, spy: list[str] | None = None
                        ) -> dict[str, float]:
    x = {"x": INPUTS[model]}
    for _ in range(300):
        await caller.infer(model, x)
    proc = subprocess.Popen(spy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) \
        if spy else None
    latencies = []
    try:
        for _ in range(requests):
            t0 = time.perf_counter()
            await caller.infer(model, x)
            latencies.append((time.perf_counter() - t0) * 1000.0)
    finally:
        if proc is not None:
            proc.wait(timeout=60)
    return percentiles(latencies)


def spy_command(pid: int, out: Path, seconds: float) -> list[str]:
    return ["py-spy", "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", "1000",
            "--idle", "--nonblocking", "-f", "raw", "-o", str(out)]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ports = free_ports("client", "admin", "worker", "direct_echo", "direct_mlp")
    tmp = Path(tempfile.mkdtemp(prefix="meshserve-one-caller-"))
    config = write_config(tmp / "bench.toml", ports, deployments(),
                          **settings(args.threads, args.device))
    ctrl = start_controller(config, log_level="WARNING")
    direct = {
        "echo": DirectWorker(ports["direct_echo"], {"name": "echo", "model":
                             "worker.models.echo:build", "max_batch_size": 64},
                             threads=args.threads, device=args.device),
        "mlp": DirectWorker(ports["direct_mlp"], {"name": "mlp", "model":
                            "worker.models.mlp:build", "max_batch_size": 32,
                            "max_batch_delay_ms": 2.0}, threads=args.threads, device=args.device),
    }
    rounds: list[dict[str, Any]] = []
    try:
        status = await wait_status(admin_status(f"tcp://127.0.0.1:{ports['admin']}"), serving,
                                   180.0, "every deployment serving", interval_s=0.2)
        deployment_of = {w["id"]: w["deployment"] for w in status["worlds"]}
        served_pid = {deployment_of[i]: w["pid"] for w in status["workers"] for i in w["worlds"]}
        for worker in direct.values():
            await worker.start()
        async with Client(f"tcp://127.0.0.1:{ports['client']}") as client:
            for n in range(1, args.rounds + 1):
                spying = args.py_spy is not None and n == args.rounds
                row: dict[str, Any] = {}
                for model in ("echo", "mlp"):
                    for path, caller, pid in (("served", client, served_pid[model]),
                                              ("direct", direct[model], direct[model].pid)):
                        spy = None
                        if spying and model == "mlp":
                            # about as long as the requests take at one caller (0.5-1 ms each)
                            spy = spy_command(pid, Path(args.py_spy) / f"{path}_mlp.txt",
                                              args.requests / 2000.0)
                        got = await one_at_a_time(caller, model, args.requests, spy)
                        row[f"{path} {model}"] = got
                        print(f"round {n} {path:6s} {model:4s} " + " ".join(
                            f"{k}={v:.3f}" for k, v in got.items()), file=sys.stderr, flush=True)
                rounds.append(row)
    finally:
        for worker in direct.values():
            await worker.aclose()
        end_processes([ctrl], 30.0)
    summary = {}
    for model in ("echo", "mlp"):
        for p in ("p10", "p50", "p90"):
            summary[f"{model} {p} gap ms"] = statistics.median(
                r[f"served {model}"][p] - r[f"direct {model}"][p] for r in rounds)
    return {"device": args.device, "requests": args.requests, "rounds": rounds,
            "summary": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--requests", type=int, default=2000, help="per model, path and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--py-spy", metavar="DIR",
                        help="sample the served and the direct mlp worker in the last round")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    if args.py_spy is not None:
        if shutil.which("py-spy") is None:
            parser.error("--py-spy needs py-spy on the PATH")
        Path(args.py_spy).mkdir(parents=True, exist_ok=True)
    results = run_loop(run(args))
    print("\nserved minus direct, one caller (median of rounds):")
    print("| model | p10 ms | p50 ms | p90 ms |\n|---|---:|---:|---:|")
    for model in ("echo", "mlp"):
        s = results["summary"]
        print(f"| {model} | {s[f'{model} p10 gap ms']:.3f} | {s[f'{model} p50 gap ms']:.3f} | "
              f"{s[f'{model} p90 gap ms']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MESH_LOG_LEVEL", "WARNING")
    sys.exit(main())
