"""What a meshserve pipeline world costs against a bare torch.distributed pipeline, in one run.

    python -m bench.pipeline [--duration-s 1.5] [--rounds 8] [--json results.json]

1. Throughput of the same 2-stage ``mlp`` (``worker.models.mlp.build`` split with
   ``worker.stages.stage_slice``), in rows/s:
   (a) raw: two subprocesses of this module (``--raw-stage 0|1``), each with its own
       ``TCPStore`` + ``ProcessGroupGloo``; stage 0 loops over batches of 32 zero rows, splits
       each into ``--micro-batches`` micro-batches, computes its part and sends the activation
       (shapes are known in advance, so it sends bare tensors); stage 1 receives, computes and
       counts rows. A second raw pipeline runs with 1 micro-batch: what meshserve actually
       does with requests that are a full batch each (it never splits a request).
   (b) a meshserve world of the same deployment (stages = 2, micro_batches = 2,
       max_batch_size = 32) driven by ``mesh.client.Client`` in a closed loop, every request a
       full batch of 32 rows, ``--concurrency`` requests in flight;
   plus a 1-stage world of the same model and the bare forward pass of the unsplit model in
   this process (torch threads 1 everywhere).
   The machine is shared and its load comes in bursts, so nothing runs concurrently and the
   pipelines take turns in short windows: ``--rounds`` rounds, one window of ``--duration-s``
   per pipeline (after ``--warmup-s``), the order reversed every other round, (a) and (b)
   always side by side; more rounds (up to ``--max-rounds``) while fewer than
   ``--min-quiet`` rounds had both of those windows quiet. The raw pipelines stay up between
   their windows, paused through a shared control file (no process start between windows);
   rates are taken between completion timestamps. Every window records the CPU the machine's
   other processes used (/proc/stat minus ours); medians are over quiet windows (under
   ``--quiet-cores``), ratios over rounds where both windows were quiet.
2. The pipeline bubble of the served 2-stage world: per stage, the workers' cumulative
   ``busy_s`` counters (``status`` -> ``workers[].busy_s``). Counters come with heartbeats
   (every 200 ms), so utilisation = busy seconds between two heartbeats / the time between
   them (dated from the status call and ``heartbeat_age_ms``); bubble = 1 - utilisation. The
   raw stages measure the same themselves. Also the CPU time of every process over the
   window (from /proc), and CPU per row.
   The served deployments are held at one world each (max_worlds = 1, autoscale = false):
   an autoscaler adding worlds would measure something else.
3. World formation with the workers already running: a controller with one serving 2-stage
   world and two idle warm workers; ``--formations`` times: admin ``form`` on the two idle
   workers, wait for the ``world_serving`` event (``form_ms``: the process group;
   ``formed_ms``: the controller's Join -> every rank joined; ``load_ms``), then scale back to
   one world and wait for two idle workers again (see ``release_world`` for why not ``drain``).

Prints markdown tables and, with --json, writes every figure. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import cpu_seconds
from mesh.loop import run as run_loop
from mesh.testing.configs import write_config
from mesh.testing.ports import free_port, free_ports
from mesh.testing.processes import alive, end_processes, start_controller
from mesh.testing.waits import until, wait_status

BATCH = 32
FEATURES = 64
STAGES = 2

# The raw pipeline's control file: float64 slots, each written by one process only.
CMD, READY0, READY1 = 0, 1, 2
S0_BATCHES, S0_COMPUTE, S0_SEND, S0_T = 3, 4, 5, 6
S1_ROWS, S1_MICRO, S1_COMPUTE, S1_RECV, S1_T = 7, 8, 9, 10, 11
SLOTS = 16
REPO_ROOT = Path(__file__).resolve().parent.parent
PAUSE, RUN, STOP = 0.0, 1.0, 2.0


def system_busy_s() -> float:
    """CPU seconds all cores of the machine spent busy since boot (Linux /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    snap = {name: cpu_seconds(pid) for name, pid in pids.items()}
    snap["@system"] = system_busy_s()
    snap["@t"] = time.monotonic()
    return snap


def cpu_cores(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Cores each named process used between two snapshots, plus '@other': everyone else."""
    wall = b["@t"] - a["@t"]
    cores = {k: (b[k] - a[k]) / wall for k in a if not k.startswith("@")}
    cores["@other"] = max(0.0, (b["@system"] - a["@system"]) / wall - sum(cores.values()))
    return cores


def stop_pid(pid: int, timeout_s: float = 5.0) -> None:
    """End a process that is not our child (a worker our controller left behind), by PID."""
    if pid <= 0 or not alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.05)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def single_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def open_control(path: str | Path) -> Any:
    import numpy as np

    return np.memmap(path, dtype=np.float64, mode="r+", shape=(SLOTS,))


# -- (a) the raw gloo pipeline: one process per stage ----------------------------------------


def raw_stage(args: argparse.Namespace) -> int:
    """One stage of a raw pipeline (a subprocess, driven through the control file)."""
    import torch
    import torch.distributed as dist

    from worker.models.mlp import build
    from worker.stages import stage_slice

    torch.set_num_threads(1)
    rank = args.raw_stage
    ctl = open_control(args.control)
    model = build()
    part, _ = stage_slice(model, rank, STAGES)
    timeout = datetime.timedelta(seconds=600)
    store = dist.TCPStore("127.0.0.1", args.port, STAGES, rank == 0, timeout=timeout)
    pg = dist.ProcessGroupGloo(dist.PrefixStore("bench-raw/", store), rank, STAGES, timeout)
    sizes = [len(c) for c in torch.arange(BATCH).tensor_split(args.micro_batches)]
    with torch.inference_mode():
        hidden = int(stage_slice(model, 0, STAGES)[0](torch.zeros(1, FEATURES)).shape[1])
        if rank == 0:
            _raw_stage0(pg, part, sizes, hidden, ctl, args.parent_pid)
        else:
            _raw_stage1(pg, part, sizes, hidden, ctl)
    return 0


def _raw_stage0(pg: Any, part: Any, sizes: list[int], hidden: int, ctl: Any,
                parent_pid: int) -> None:
    import torch

    micro = list(torch.zeros(BATCH, FEATURES).split(sizes))
    part(micro[0])
    compute_s = send_s = 0.0
    batches = 0
    ctl[READY0] = 1.0
    next_parent_check = 0.0
    while True:
        cmd = ctl[CMD]
        if cmd == STOP:
            break
        if cmd != RUN:
            now = time.monotonic()
            if now >= next_parent_check:  # an orphan must not wait forever
                next_parent_check = now + 0.5
                if not alive(parent_pid):
                    break
            time.sleep(0.005)
            continue
        for xm in micro:
            t0 = time.perf_counter()
            act = part(xm)
            t1 = time.perf_counter()
            pg.send([act], 1, 0).wait()
            compute_s += t1 - t0
            send_s += time.perf_counter() - t1
        batches += 1
        ctl[S0_COMPUTE] = compute_s
        ctl[S0_SEND] = send_s
        ctl[S0_BATCHES] = batches
        ctl[S0_T] = time.monotonic()
    # A NaN micro-batch ends stage 1's receive loop (real activations are finite).
    pg.send([torch.full((sizes[0], hidden), math.nan)], 1, 0).wait()


def _raw_stage1(pg: Any, part: Any, sizes: list[int], hidden: int, ctl: Any) -> None:
    import torch

    bufs = [torch.empty(n, hidden) for n in sizes]
    part(bufs[0].zero_())
    rows = micro_n = 0
    compute_s = recv_s = 0.0
    i = 0
    ctl[READY1] = 1.0
    while True:
        buf = bufs[i]
        t0 = time.perf_counter()
        pg.recv([buf], 0, 0).wait()
        t1 = time.perf_counter()
        if math.isnan(float(buf[0, 0])):
            return
        part(buf)
        rows += buf.shape[0]
        micro_n += 1
        compute_s += time.perf_counter() - t1
        recv_s += t1 - t0
        i = (i + 1) % len(bufs)
        ctl[S1_ROWS] = rows
        ctl[S1_MICRO] = micro_n
        ctl[S1_COMPUTE] = compute_s
        ctl[S1_RECV] = recv_s
        ctl[S1_T] = time.monotonic()


class RawPipeline:
    """Both raw stages as subprocesses, paused between measurement windows."""

    def __init__(self, tmp: Path, micro_batches: int) -> None:
        import numpy as np

        self.micro_batches = micro_batches
        self.path = tmp / f"raw-m{micro_batches}.ctl"
        np.zeros(SLOTS, dtype=np.float64).tofile(self.path)
        self.ctl = open_control(self.path)
        self.port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for stage in range(STAGES):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.pipeline", "--raw-stage", str(stage),
                 "--port", str(self.port), "--control", str(self.path),
                 "--micro-batches", str(self.micro_batches), "--parent-pid", str(os.getpid())],
                # A session of its own, as the local launcher gives every worker: with the
                # kernel's autogroup scheduling, a session is what gets a fair share of CPU.
                stdin=subprocess.DEVNULL, env=single_thread_env(), cwd=REPO_ROOT,
                start_new_session=True))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def wait_ready(self, timeout_s: float) -> None:
        def ready() -> bool:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"raw stage pid {p.pid} exited with {p.returncode}")
            return bool(self.ctl[READY0] and self.ctl[READY1])

        await until(ready, timeout_s, "the raw pipeline's stages ready", interval_s=0.05)

    async def window(self, warmup_s: float, duration_s: float,
                     pids: dict[str, int]) -> dict[str, Any]:
        ctl = self.ctl
        ctl[CMD] = RUN
        try:
            await asyncio.sleep(warmup_s)
            a, cpu_a = ctl.copy(), cpu_snapshot(pids)
            await asyncio.sleep(duration_s)
            b, cpu_b = ctl.copy(), cpu_snapshot(pids)
        finally:
            ctl[CMD] = PAUSE
        t1 = b[S1_T] - a[S1_T]
        t0 = b[S0_T] - a[S0_T]
        rows = b[S1_ROWS] - a[S1_ROWS]
        micro = max(1.0, b[S1_MICRO] - a[S1_MICRO])
        micro0 = max(1.0, (b[S0_BATCHES] - a[S0_BATCHES]) * self.micro_batches)
        s0_busy = (b[S0_COMPUTE] - a[S0_COMPUTE]) + (b[S0_SEND] - a[S0_SEND])
        return {
            "rows_per_s": rows / t1 if t1 > 0 else 0.0,
            "rows": rows,
            "stage0": {"compute_ms_per_micro": (b[S0_COMPUTE] - a[S0_COMPUTE]) * 1e3 / micro0,
                       "send_ms_per_micro": (b[S0_SEND] - a[S0_SEND]) * 1e3 / micro0,
                       "utilisation": s0_busy / t0 if t0 > 0 else 0.0},
            "stage1": {"compute_ms_per_micro": (b[S1_COMPUTE] - a[S1_COMPUTE]) * 1e3 / micro,
                       "recv_wait_ms_per_micro": (b[S1_RECV] - a[S1_RECV]) * 1e3 / micro,
                       "utilisation": (b[S1_COMPUTE] - a[S1_COMPUTE]) / t1 if t1 > 0 else 0.0},
            "cores": cpu_cores(cpu_a, cpu_b),
        }

    def stop(self) -> None:
        self.ctl[CMD] = STOP
        deadline = time.monotonic() + 10.0
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        end_processes(self.procs, 5.0)


# -- (b) meshserve ---------------------------------------------------------------------------


SERVE_DEPLOYMENTS = f"""
[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
stages = 2
micro_batches = 2
max_batch_size = {BATCH}
worlds = 1
max_worlds = 1

[[deployments]]
name = "mlp1"
model = "worker.models.mlp:build"
stages = 1
max_batch_size = {BATCH}
worlds = 1
max_worlds = 1
"""

FORM_DEPLOYMENT = f"""
[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
stages = 2
micro_batches = 2
max_batch_size = {BATCH}
worlds = 1
min_worlds = 1
max_worlds = 8
"""


class Controller:
    """A controller subprocess on free loopback ports, its output in a log file."""

    def __init__(self, tmp: Path, name: str, body: str, **settings: int) -> None:
        self.ports = free_ports("client", "admin", "worker")
        self.admin = f"tcp://127.0.0.1:{self.ports['admin']}"
        self.client = f"tcp://127.0.0.1:{self.ports['client']}"
        # One world per deployment, held still: the autoscaler would add worlds under load
        # (and so workers, whose CPU this 2-core machine does not have to spare).
        self.config = write_config(tmp / f"{name}.toml", self.ports, body, autoscale=False,
                                   worker_threads=1, **settings)
        self.log_path = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.worker_pids: set[int] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def start(self) -> None:
        self.proc = start_controller(self.config, self.log_path, log_level="INFO",
                                     env=single_thread_env())

    async def status(self, timeout_s: float = 5.0) -> dict[str, Any]:
        from mesh.admin_client import admin_call

        status: dict[str, Any] = await admin_call(self.admin, "status", timeout_s=timeout_s)
        self.worker_pids.update(w["pid"] for w in status["workers"] if w.get("pid"))
        return status

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float,
                       what: str, poll_s: float = 0.1) -> dict[str, Any]:
        return await wait_status(self.status, predicate, timeout_s, what, interval_s=poll_s,
                                 exit_code=lambda: self.proc.poll() if self.proc else None,
                                 detail=lambda: f"log: {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None:
            end_processes([self.proc], 30.0)
        for pid in self.worker_pids:  # the controller stops its workers; this is a safety net
            stop_pid(pid)

    def log_count(self, text: str) -> int:
        try:
            return self.log_path.read_text(errors="replace").count(text)
        except OSError:
            return 0


def world_of(status: dict[str, Any], deployment: str) -> dict[str, Any] | None:
    for w in status["worlds"]:
        if w["deployment"] == deployment and w["state"] == "serving":
            return w
    return None


async def counters(ctl: Controller, worker_ids: list[str],
                   deployment: str) -> list[dict[str, Any]]:
    """The workers' heartbeat counters, each with ``hb_t``: when that heartbeat left (our
    monotonic clock, from the status call's time and the heartbeat's age)."""
    t0 = time.monotonic()
    status = await ctl.status()
    worlds = [w for w in status["worlds"] if w["deployment"] == deployment]
    if len(worlds) != 1 or list(worlds[0]["workers"]) != worker_ids:
        raise RuntimeError(f"{deployment} no longer runs as one world on {worker_ids}: "
                           f"{worlds}; controller log: {ctl.log_path}")
    t_mid = (t0 + time.monotonic()) / 2
    by_id = {w["id"]: w for w in status["workers"]}
    out = []
    for wid in worker_ids:
        w = dict(by_id[wid])
        w["hb_t"] = t_mid - float(w.get("heartbeat_age_ms") or 0.0) / 1000.0
        out.append(w)
    return out


async def served_window(ctl: Controller, client: Any, deployment: str, workers: list[str], *,
                        warmup_s: float, duration_s: float, concurrency: int,
                        pids: dict[str, int]) -> dict[str, Any]:
    """Closed loop of full-batch requests: rows/s, latency, stage counters, CPU per process."""
    import numpy as np

    from mesh.errors import MeshError
    from mesh.stats import percentile

    x = {"x": np.zeros((BATCH, FEATURES), dtype=np.float32)}
    done: list[float] = []  # completion times inside the window
    latencies: list[float] = []
    errors: dict[str, int] = {}
    measuring = False
    stop = False

    async def caller() -> None:
        while not stop:
            t0 = time.monotonic()
            try:
                await client.infer(deployment, x, timeout_s=30.0)
            except MeshError as exc:
                errors[exc.code] = errors.get(exc.code, 0) + 1
                await asyncio.sleep(0.01)
                continue
            if measuring:
                t1 = time.monotonic()
                done.append(t1)
                latencies.append((t1 - t0) * 1000.0)

    tasks = [asyncio.create_task(caller()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(warmup_s)
        before = await counters(ctl, workers, deployment)
        cpu_a = cpu_snapshot(pids)
        measuring = True
        await asyncio.sleep(duration_s)
        measuring = False
        cpu_b = cpu_snapshot(pids)
        after = await counters(ctl, workers, deployment)
    finally:
        stop = True
        await asyncio.wait(tasks, timeout=35.0)
        for t in tasks:
            t.cancel()
    span = done[-1] - done[0] if len(done) > 1 else 0.0
    rows_per_s = BATCH * (len(done) - 1) / span if span > 0 else 0.0
    stages = []
    for rank, (b, a) in enumerate(zip(before, after, strict=True)):
        d_rows = a["rows"] - b["rows"]
        d_batches = a["batches"] - b["batches"]
        d_busy = a["busy_s"] - b["busy_s"]
        d_t = a["hb_t"] - b["hb_t"]
        busy_per_row = d_busy / d_rows if d_rows else 0.0
        util = d_busy / d_t if d_t > 0 else 0.0
        stages.append({"stage": rank, "worker": a["id"], "rows": d_rows, "batches": d_batches,
                       "rows_per_batch": d_rows / d_batches if d_batches else 0.0,
                       "busy_us_per_row": busy_per_row * 1e6, "utilisation": util,
                       "bubble": 1.0 - util, "heartbeat_span_s": d_t,
                       "utilisation_per_row": busy_per_row * rows_per_s})
    lat = sorted(latencies)
    return {"deployment": deployment, "requests": len(done), "rows_per_s": rows_per_s,
            "errors": errors, "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "stages": stages, "cores": cpu_cores(cpu_a, cpu_b)}


def bare_window(model: Any, duration_s: float, pids: dict[str, int]) -> dict[str, Any]:
    """The unsplit model's forward pass in a tight loop here (torch threads 1)."""
    import torch

    torch.set_num_threads(1)
    x = torch.zeros(BATCH, FEATURES)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        cpu_a = cpu_snapshot(pids)
        start = time.perf_counter()
        end = start + duration_s
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
        wall = time.perf_counter() - start
        cpu_b = cpu_snapshot(pids)
    return {"rows_per_s": BATCH * len(times) / wall,
            "median_ms": statistics.median(times) * 1e3,
            "median_rows_per_s": BATCH / statistics.median(times),
            "iterations": len(times), "cores": cpu_cores(cpu_a, cpu_b)}


def bare_stages(duration_s: float, micro_batches: int) -> dict[str, float]:
    """Median forward time of each stage alone, at the micro-batch and at the full batch."""
    import torch

    from worker.models.mlp import build
    from worker.stages import stage_slice

    torch.set_num_threads(1)
    model = build()
    parts = [stage_slice(model, s, STAGES)[0] for s in range(STAGES)]
    out: dict[str, float] = {}
    with torch.inference_mode():
        for rows in sorted({-(-BATCH // micro_batches), BATCH}):
            x = torch.zeros(rows, FEATURES)
            for s, part in enumerate(parts):
                times = []
                for _ in range(3):
                    part(x)
                end = time.perf_counter() + duration_s
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    part(x)
                    times.append(time.perf_counter() - t0)
                out[f"stage{s}_b{rows}_ms"] = statistics.median(times) * 1e3
                x = part(x)  # the next stage's input
    return out


# -- 3. world formation ------------------------------------------------------------------------


def idle_workers(status: dict[str, Any]) -> list[str]:
    ids = [w["id"] for w in status["workers"] if w["state"] == "idle"]
    return sorted(ids, key=lambda i: (len(i), i))


async def release_world(ctl: Controller) -> None:
    """Go back to one world of mlp.

    Not ``drain <world>``: ``form`` raised the deployment's desired world count to 2 and a
    drain does not lower it, so the reconcile loop at once re-forms a replacement world on the
    two workers the drain released. ``scale --worlds 1`` lowers the target and drains one world
    (the controller picks which), which leaves one world and two idle workers: the state each
    iteration starts from. ``max_local_workers = 4`` keeps the warm pool from starting new
    workers and retiring released ones while the extra world lives.
    """
    from mesh.admin_client import admin_call

    await admin_call(ctl.admin, "scale", {"deployment": "mlp", "worlds": 1})


async def run_formations(ctl: Controller, n: int) -> dict[str, Any]:
    from mesh.admin_client import admin_call

    def steady(s: dict[str, Any]) -> bool:
        worlds = [w for w in s["worlds"] if w["deployment"] == "mlp"]
        return (len(worlds) == 1 and worlds[0]["state"] == "serving"
                and len(idle_workers(s)) >= STAGES)

    await ctl.wait_for(steady, 240.0, "one serving world and two idle workers")
    samples = []
    for i in range(n):
        status = await ctl.wait_for(steady, 60.0, "one world and two idle workers")
        pair = idle_workers(status)[:STAGES]
        t0 = time.perf_counter()
        reply = await admin_call(ctl.admin, "form", {"deployment": "mlp", "workers": pair})
        world_id = int(reply["world"])

        def serving(s: dict[str, Any], world_id: int = world_id) -> bool:
            return any(e.get("event") == "world_serving" and e.get("world") == world_id
                       for e in s.get("events", []))

        status = await ctl.wait_for(serving, 60.0, f"world {world_id} serving", poll_s=0.005)
        seen_ms = (time.perf_counter() - t0) * 1e3
        event = next(e for e in status["events"]
                     if e.get("event") == "world_serving" and e.get("world") == world_id)
        samples.append({"i": i, "world": world_id, "workers": pair,
                        "formed_ms": event["formed_ms"], "form_ms": event["form_ms"],
                        "load_ms": event["load_ms"], "client_seen_ms": seen_ms})
        print(f"formation {i}: world {world_id} on {pair}: form {event['form_ms']} ms, "
              f"formed {event['formed_ms']} ms, load {event['load_ms']} ms", file=sys.stderr,
              flush=True)
        await release_world(ctl)
    status = await ctl.wait_for(steady, 60.0, "one world and two idle workers")
    failed_spawns = [w for w in status["workers"]
                     if w["state"] == "dead" and "launch failed" in w.get("reason", "")]
    return {"samples": samples,
            "failed_spawn_entries": len(failed_spawns),
            "cannot_start_log_lines": ctl.log_count("cannot start a worker")}


def summarize_formations(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(samples)}
    seen: set[tuple[str, ...]] = set()
    cached = []  # leave out each worker pair's first world: its ranks load the stage then
    for s in samples:
        pair = tuple(s["workers"])
        cached.append(pair in seen)
        seen.add(pair)
    out["n_cached"] = sum(cached)
    for key in ("form_ms", "formed_ms", "load_ms", "client_seen_ms"):
        values = [float(s[key]) for s in samples]
        warm = [v for v, c in zip(values, cached, strict=True) if c] or values
        out[key] = {"median": statistics.median(values), "max": max(values),
                    "median_cached": statistics.median(warm), "max_cached": max(warm)}
    return out


# -- the run -----------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


# Window order in a round (reversed every other round): (a) and (b) always side by side.
KINDS = ("raw", "mesh2", "raw1", "mesh1", "bare")
RATIOS = {"ratio_mesh2_raw": ("mesh2", "raw"), "ratio_mesh2_raw1": ("mesh2", "raw1"),
          "ratio_mesh1_bare": ("mesh1", "bare"), "ratio_mesh2_mesh1": ("mesh2", "mesh1")}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from mesh.client import Client
    from worker.models.mlp import build

    tmp = Path(tempfile.mkdtemp(prefix="meshserve-pipeline-"))
    results: dict[str, Any] = {"duration_s": args.duration_s, "warmup_s": args.warmup_s,
                               "rounds": [], "batch": BATCH, "micro_batches": args.micro_batches,
                               "concurrency": args.concurrency, "quiet_cores": args.quiet_cores,
                               "tmp": str(tmp)}
    model = build()
    serve = Controller(tmp, "serve", SERVE_DEPLOYMENTS, warm_workers=0)
    raws = {"raw": RawPipeline(tmp, args.micro_batches), "raw1": RawPipeline(tmp, 1)}
    try:
        serve.start()
        for raw in raws.values():
            raw.start()
        status = await serve.wait_for(
            lambda s: all(d["worlds_current"] >= 1 for d in s["deployments"]),
            240.0, "mlp (2 stages) and mlp1 (1 stage) serving")
        for raw in raws.values():
            await raw.wait_ready(240.0)
        mlp, mlp1 = world_of(status, "mlp"), world_of(status, "mlp1")
        assert mlp is not None and mlp1 is not None
        worker_pid = {w["id"]: w["pid"] for w in status["workers"]}
        pids = {"controller": serve.pid, "bench (client)": os.getpid(),
                "mesh2 stage 0": worker_pid[mlp["workers"][0]],
                "mesh2 stage 1": worker_pid[mlp["workers"][1]],
                "mesh1 stage 0": worker_pid[mlp1["workers"][0]]}
        for name, raw in raws.items():
            for stage, pid in enumerate(raw.pids):
                pids[f"{name} stage {stage}"] = pid
        d, w = args.duration_s, args.warmup_s
        async with Client(serve.client) as client:
            r = 0
            while r < args.rounds or (r < args.max_rounds and len(quiet_pairs(
                    results["rounds"], "mesh2", "raw", args.quiet_cores)) < args.min_quiet):
                steps = list(KINDS) if r % 2 == 0 else list(reversed(KINDS))
                row: dict[str, Any] = {}
                for step in steps:
                    if step in raws:
                        row[step] = await raws[step].window(w, d, pids)
                    elif step == "bare":
                        row[step] = bare_window(model, d, pids)
                    else:
                        world = mlp if step == "mesh2" else mlp1
                        row[step] = await served_window(
                            serve, client, world["deployment"], list(world["workers"]),
                            warmup_s=w, duration_s=d, concurrency=args.concurrency, pids=pids)
                    row[step]["quiet"] = row[step]["cores"]["@other"] < args.quiet_cores
                for key, (num, den) in RATIOS.items():
                    row[key] = row[num]["rows_per_s"] / max(1e-9, row[den]["rows_per_s"])
                print(f"round {r + 1}: " + ", ".join(
                    f"{k} {row[k]['rows_per_s']:.0f} (other {row[k]['cores']['@other']:.1f})"
                    for k in KINDS) + " rows/s", file=sys.stderr, flush=True)
                results["rounds"].append(row)
                r += 1
    finally:
        for raw in raws.values():
            raw.stop()
        serve.stop()
    results["bare_stages"] = bare_stages(1.0, args.micro_batches)
    if args.formations > 0:
        form = Controller(tmp, "form", FORM_DEPLOYMENT,
                          warm_workers=2, max_local_workers=4)
        try:
            form.start()
            formation = await run_formations(form, args.formations)
        finally:
            form.stop()
        formation["summary"] = summarize_formations(formation["samples"])
        results["formation"] = formation
    results["summary"] = summarize(results)
    return results


def quiet_pairs(rounds: list[dict[str, Any]], a: str, b: str,
                limit: float) -> list[dict[str, Any]]:
    """Rounds whose windows of ``a`` and ``b`` both had the machine to themselves."""
    return [r for r in rounds if all(r[k]["cores"]["@other"] < limit for k in (a, b))]


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """Medians per pipeline over its quiet windows (all windows when fewer than 2 were)."""
    every = res["rounds"]
    out: dict[str, Any] = {}
    for k in KINDS:
        windows = [r[k] for r in every if r[k]["quiet"]]
        basis = "quiet"
        if len(windows) < 2:
            windows, basis = [r[k] for r in every], "all"
        out[k] = {"basis": basis, "n": len(windows),
                  "rows_per_s": med([x["rows_per_s"] for x in windows]),
                  "min": min(x["rows_per_s"] for x in windows),
                  "max": max(x["rows_per_s"] for x in windows),
                  "other_cores": med([x["cores"]["@other"] for x in windows]),
                  "all_rows_per_s": med([r[k]["rows_per_s"] for r in every])}
    for key, (num, den) in RATIOS.items():
        rounds = quiet_pairs(every, num, den, res["quiet_cores"])
        basis = "quiet"
        if len(rounds) < 2:
            rounds, basis = every, "all"
        out[key] = {"basis": basis, "n": len(rounds), "per_round": [r[key] for r in rounds],
                    "median": med([r[key] for r in rounds]),
                    "all": med([r[key] for r in every])}
    return out


def render(res: dict[str, Any]) -> str:
    every = res["rounds"]
    sm = res["summary"]
    mb = res["micro_batches"]
    lim = res["quiet_cores"]

    def windows(k: str) -> list[dict[str, Any]]:
        return [r[k] for r in every if r[k]["quiet"] or sm[k]["basis"] == "all"]

    lines = [
        "",
        f"1. Throughput, rows/s (batch {BATCH}, torch threads 1). {len(every)} rounds of "
        f"{res['duration_s']:g} s windows, one per pipeline, the order reversed every other "
        f"round. Medians over each pipeline's quiet windows (the machine's other processes "
        f"under {lim:g} cores), or over all its windows where fewer than 2 were quiet; "
        "'all' = every window, contended ones included",
        "| pipeline | median rows/s | quiet windows | min | max | vs (a) | vs bare unsplit | "
        "median, all windows |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {
        "raw": f"(a) raw gloo send/recv, 2 stages, {mb} micro-batches of {BATCH // mb} rows",
        "mesh2": f"(b) meshserve world, 2 stages, micro_batches = {mb}; requests of {BATCH} "
                 f"rows, {res['concurrency']} in flight",
        "raw1": f"raw gloo send/recv, 2 stages, 1 micro-batch of {BATCH} rows",
        "mesh1": "meshserve world, 1 stage, same requests",
        "bare": f"bare forward of the unsplit model, batch {BATCH}, one process",
    }
    for k, label in names.items():
        v = sm[k]
        n_quiet = sum(1 for r in every if r[k]["quiet"])
        lines.append(f"| {label} | {v['rows_per_s']:.0f} | {n_quiet}/{len(every)} | "
                     f"{v['min']:.0f} | {v['max']:.0f} | "
                     f"{v['rows_per_s'] / sm['raw']['rows_per_s']:.3f} | "
                     f"{v['rows_per_s'] / sm['bare']['rows_per_s']:.3f} | "
                     f"{v['all_rows_per_s']:.0f} |")
    lines.append("")
    for key, what in (("ratio_mesh2_raw", "(b)/(a)"),
                      ("ratio_mesh2_raw1", "(b)/(raw, 1 micro-batch)"),
                      ("ratio_mesh2_mesh1", "meshserve 2-stage/1-stage"),
                      ("ratio_mesh1_bare", "meshserve 1-stage/bare unsplit")):
        v = sm[key]
        where = (f"over the {v['n']} rounds where both windows were quiet" if v["basis"] ==
                 "quiet" else f"over all {v['n']} rounds (fewer than 2 quiet pairs)")
        per = ", ".join(f"{x:.2f}" for x in v["per_round"])
        lines.append(f"- {what}, same round: median {v['median']:.3f} {where} ({per}); "
                     f"all rounds {v['all']:.3f}")

    m2 = windows("mesh2")
    lines += ["", "2. Pipeline bubble, 2 stages (medians over the same windows). utilisation = "
              "busy time / wall time (served: busy_s between two heartbeats); stage 0's busy "
              "time covers its compute and its sends in both",
              "| stage | served: rows per batch at the stage | served: busy us/row | "
              "served: utilisation | served: bubble | raw (a): bubble | raw, 1 micro-batch: "
              "bubble |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for s in range(STAGES):
        st = [x["stages"][s] for x in m2]
        raw_util = med([x[f"stage{s}"]["utilisation"] for x in windows("raw")])
        raw1_util = med([x[f"stage{s}"]["utilisation"] for x in windows("raw1")])
        lines.append(f"| {s} | {med([x['rows_per_batch'] for x in st]):.1f} | "
                     f"{med([x['busy_us_per_row'] for x in st]):.0f} | "
                     f"{med([x['utilisation'] for x in st]):.3f} | "
                     f"{med([x['bubble'] for x in st]):.3f} | {1.0 - raw_util:.3f} | "
                     f"{1.0 - raw1_util:.3f} |")
    bs = res["bare_stages"]
    lines.append("\nBare stage forward, median ms (this process, threads 1): " + ", ".join(
        f"{k.removesuffix('_ms')} {v:.2f}" for k, v in sorted(bs.items())))
    for key in ("raw", "raw1"):
        s0 = [x["stage0"] for x in windows(key)]
        s1 = [x["stage1"] for x in windows(key)]
        lines.append(
            f"{key} per micro-batch, median ms: stage 0 compute "
            f"{med([x['compute_ms_per_micro'] for x in s0]):.2f} + send "
            f"{med([x['send_ms_per_micro'] for x in s0]):.2f}; stage 1 compute "
            f"{med([x['compute_ms_per_micro'] for x in s1]):.2f}, waiting in recv "
            f"{med([x['recv_wait_ms_per_micro'] for x in s1]):.2f}")

    lines += ["", "CPU cores used during each pipeline's windows, and CPU per row (medians over "
              "the same windows)",
              "| process | " + " | ".join(KINDS) + " |", "|---" + "|---:" * len(KINDS) + "|"]
    roles = {"controller": "controller", "bench (client)": "bench (client; bare loop)",
             "stage 0": "stage 0 process", "stage 1": "stage 1 process"}
    for role, label in roles.items():
        cells = []
        for k in KINDS:
            vals = [c for x in windows(k) for name, c in x["cores"].items()
                    if _belongs(name, k) and name.endswith(role)]
            cells.append(f"{med(vals):.2f}" if vals else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    totals = {k: [sum(c for name, c in x["cores"].items() if _belongs(name, k))
                  for x in windows(k)] for k in KINDS}
    per_row = {k: [t / x["rows_per_s"] * 1e6 for t, x in zip(totals[k], windows(k),
                                                                strict=True) if x["rows_per_s"]]
               for k in KINDS}
    lines.append("| all of the above | " + " | ".join(f"{med(totals[k]):.2f}" for k in KINDS)
                 + " |")
    lines.append("| CPU us per row | " + " | ".join(f"{med(per_row[k]):.0f}" for k in KINDS)
                 + " |")
    lines.append("| other processes on the machine | " + " | ".join(
        f"{med([x['cores']['@other'] for x in windows(k)]):.2f}" for k in KINDS) + " |")
    idle = {name: med([x["cores"].get(name, 0.0) for k in ("raw", "raw1", "bare")
                       for x in windows(k)])
            for name in ("controller", "mesh2 stage 0", "mesh2 stage 1", "mesh1 stage 0")}
    lines.append("\nIdle meshserve processes during the raw and bare windows, cores: " +
                 ", ".join(f"{k} {v:.3f}" for k, v in idle.items()))
    for dep in ("mesh2", "mesh1"):
        errs = sum(sum(r[dep]["errors"].values()) for r in every)
        lines.append(f"\n{dep}: request p50 {med([x['p50_ms'] for x in windows(dep)]):.1f} ms, "
                     f"p99 {med([x['p99_ms'] for x in windows(dep)]):.1f} ms, errors {errs}")

    if "formation" in res:
        f = res["formation"]
        fs = f["summary"]
        lines += ["", f"3. World formation on running idle workers ({fs['n']} times; 'cached': "
                  f"the {fs['n_cached']} that leave out each worker pair's first world, whose "
                  "ranks load their stage then)",
                  "| figure | median | max | median cached | max cached |",
                  "|---|---:|---:|---:|---:|"]
        labels = {"form_ms": "form_ms (process group)",
                  "formed_ms": "formed_ms (Join sent -> every rank joined)",
                  "load_ms": "load_ms (stage load, slowest rank)",
                  "client_seen_ms": "admin form -> world_serving seen in status"}
        for key, label in labels.items():
            v = fs[key]
            lines.append(f"| {label} | {v['median']:.1f} | {v['max']:.1f} | "
                         f"{v['median_cached']:.1f} | {v['max_cached']:.1f} |")
        lines.append(f"\nWarm-pool refills refused (max_local_workers = 4) while the extra "
                     f"world lived: {f['failed_spawn_entries']} dead 'launch failed' worker "
                     f"entries in status, {f['cannot_start_log_lines']} 'cannot start a worker' "
                     "log lines")
    return "\n".join(lines)


def _belongs(name: str, kind: str) -> bool:
    """Which processes count towards a pipeline's CPU: its own stages, plus the controller
    and the client for the served ones, plus this process for the bare loop."""
    if kind in ("raw", "raw1"):
        return name.startswith(f"{kind} stage")
    if kind == "bare":
        return name == "bench (client)"
    return name.startswith(f"{kind} stage") or name in ("controller", "bench (client)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=1.5,
                        help="each measured window (there are 5 per round)")
    parser.add_argument("--warmup-s", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds")
    parser.add_argument("--min-quiet", type=int, default=3,
                        help="add rounds (up to --max-rounds) until this many rounds had "
                             "quiet windows for both (a) and (b)")
    parser.add_argument("--max-rounds", type=int, default=11)
    parser.add_argument("--quiet-cores", type=float, default=0.3,
                        help="a window is quiet when the machine's other processes used less "
                             "CPU than this")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="requests in flight on the served worlds (at 4, stage 0 of the "
                             "2-stage world idles ~10%% of the time on a 2-core machine: the "
                             "controller and the client wait for a core to pass requests on)")
    parser.add_argument("--micro-batches", type=int, default=2,
                        help="micro-batches of raw pipeline (a) and meshserve's micro_batches")
    parser.add_argument("--formations", type=int, default=10, help="0 skips part 3")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--raw-stage", type=int, choices=range(STAGES), default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--control", default="", help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_stage is not None:
        return raw_stage(args)
    results = run_loop(run(args))
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MESH_LOG_LEVEL", "WARNING")
    # Set before torch loads (bare loops here; the controller's workers inherit it too).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    sys.exit(main())
