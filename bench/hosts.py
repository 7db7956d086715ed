"""Multi-host figures: how long a partitioned host takes to detect and rejoin, how long a
restarted controller takes to serve again, and the clients' p99 latency around each.

    python -m bench.hosts [--rounds 3] [--callers 8] [--json FILE]     (as root)

Hosts are network namespaces on a bridge (mesh/testing/hosts.py): the controller on one, a worker on
each of two others (one 1-stage ``mlp`` world per host), closed-loop callers on the
controller's host. Each round, under load: host a's link is cut for 4 s and brought back;
then the controller is SIGKILLed and restarted at once (as a supervisor would). Figures:

- ``detect_s``: from the cut until the controller declares host a's worker dead (its worlds
  broken and their requests re-sent to host b);
- ``rejoin_s``: from the heal until that worker serves again (same id, same process);
- ``restart_s``: from the kill until a world serves again; ``answered_s``: until a caller
  that was connected throughout is answered again;
- ``p99_ms`` and ``max_ms``: of the calls that ended in each window (the cut until the
  rejoin; the kill plus 3 s), against ``base_p99_ms`` in the 3 s before; a call's time
  includes its retries
  (the callers allow 5: a request in flight at a controller's kill fails with
  ``ControllerLost`` and is sent again); ``failed``: calls that failed even so.

Medians of the rounds are printed last. Status is polled every 50 ms, which bounds the
resolution of the times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mesh.client import Client
from mesh.errors import MeshError
from mesh.testing.configs import deployment
from mesh.testing.hosts import Hosts, Site, unavailable

MLP = deployment("mlp", "worker.models.mlp:build", factory_kwargs={"hidden": 64}, worlds=2)


class Recorder:
    """Closed-loop callers that allow retries (``infer(retries=5)``, as a client that wants to
    ride through should); every call's (sent, answered, ok), retries included in its time."""

    def __init__(self, client: Client, callers: int) -> None:
        self.client = client
        self.callers = callers
        self.calls: list[tuple[float, float, bool]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _caller(self) -> None:
        x = np.ones((1, 64), np.float32)
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                await self.client.infer("mlp", {"x": x}, timeout_s=20.0, retries=5)
                ok = True
            except MeshError:
                ok = False
            self.calls.append((sent, time.monotonic(), ok))

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._caller()) for _ in range(self.callers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def window(self, start: float, end: float) -> tuple[float, float, int]:
        """Of the calls that ended in [start, end): the p99 and the max ms of those that
        succeeded, and how many failed."""
        inside = [(a, b, ok) for a, b, ok in self.calls if start <= b < end]
        lat = [(b - a) * 1000.0 for a, b, ok in inside if ok]
        p99 = float(np.percentile(lat, 99)) if lat else float("nan")
        return p99, max(lat, default=float("nan")), sum(not ok for _, _, ok in inside)

    def first_answer_after(self, t: float) -> float:
        return min((b for a, b, ok in self.calls if ok and a >= t), default=float("nan"))


def worker(status: dict[str, Any], worker_id: str) -> dict[str, Any]:
    return next(w for w in status["workers"] if w["id"] == worker_id)


def serving(status: dict[str, Any]) -> bool:
    return sum(w["state"] == "serving" for w in status["worlds"]) == 2


async def one_round(site: Site, hosts: Hosts, rec: Recorder) -> dict[str, float]:
    wait = site.cluster.wait_for
    out: dict[str, float] = {}
    cut = time.monotonic()
    out["base_p99_ms"], _, _ = rec.window(cut - 3.0, cut)
    hosts.cut("a")
    await wait(lambda s: worker(s, "a0")["state"] == "dead", timeout_s=20, interval_s=0.05,
               what="a0 dead")
    out["detect_s"] = time.monotonic() - cut
    await asyncio.sleep(max(0.0, 4.0 - out["detect_s"]))
    healed = time.monotonic()
    hosts.heal("a")
    await wait(lambda s: worker(s, "a0")["state"] == "serving" and serving(s), timeout_s=30,
               interval_s=0.05, what="a0 serving again")
    back = time.monotonic()
    out["rejoin_s"] = back - healed
    p99, worst, failed = rec.window(cut, back)
    out.update(partition_p99_ms=p99, partition_max_ms=worst, partition_failed=float(failed))
    await asyncio.sleep(3.0)

    killed = time.monotonic()
    site.restart_controller()
    await wait(serving, timeout_s=30, interval_s=0.05, what="serving after the restart")
    out["restart_s"] = time.monotonic() - killed
    await asyncio.sleep(3.0)
    out["answered_s"] = rec.first_answer_after(killed) - killed
    p99, worst, failed = rec.window(killed, killed + 3.0)
    out.update(restart_p99_ms=p99, restart_max_ms=worst, restart_failed=float(failed))
    return out


async def run(rounds: int, callers: int, logs: str = "") -> list[dict[str, float]]:
    results = []
    with Hosts(["ctl", "a", "b"]) as hosts, tempfile.TemporaryDirectory(prefix="mh") as d:
        site = Site(hosts, Path(logs or d), MLP)
        site.worker("a", "a0")
        site.worker("b", "b0")
        await site.cluster.wait_for(serving, timeout_s=120, what="2 mlp worlds")
        async with Client(site.cluster.client) as client:
            rec = Recorder(client, callers)
            rec.start()
            try:
                await asyncio.sleep(3.0)
                for n in range(rounds):
                    results.append(await one_round(site, hosts, rec))
                    print(f"round {n + 1}: " + ", ".join(
                        f"{k} {v:.2f}" for k, v in results[-1].items()), file=sys.stderr)
                    await asyncio.sleep(2.0)
            finally:
                await rec.stop()
    return results


COLUMNS = ["detect_s", "rejoin_s", "partition_p99_ms", "partition_max_ms", "partition_failed",
           "restart_s", "answered_s", "restart_p99_ms", "restart_max_ms", "restart_failed",
           "base_p99_ms"]


def table(results: list[dict[str, float]]) -> str:
    rows = [["round", *COLUMNS]]
    for n, r in enumerate(results, 1):
        rows.append([str(n), *(f"{r[c]:.2f}" for c in COLUMNS)])
    rows.append(["median", *(f"{statistics.median(r[c] for r in results):.2f}"
                             for c in COLUMNS)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
                     for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default %(default)s)")
    parser.add_argument("--callers", type=int, default=8,
                        help="closed-loop callers (default %(default)s)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--logs", default="",
                        help="keep the processes' logs in this (short) folder")
    args = parser.parse_args(argv)
    why = unavailable()
    if why:
        print(f"bench.hosts: {why}", file=sys.stderr)
        return 2
    results = asyncio.run(run(args.rounds, args.callers, args.logs))
    print(table(results))
    medians = {c: statistics.median(r[c] for r in results) for c in COLUMNS}
    doc = {"rounds": results, "median": medians, "callers": args.callers}
    print(json.dumps({"median": medians}))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
