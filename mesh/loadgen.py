"""Load generators: a client-side tool (``meshctl bench``, bench/ and the tests drive it),
not a part of the server.

``closed_loop``: N concurrent callers each send a request, wait for its answer, and send the
next, for ``duration_s`` seconds after a warm-up; req/s, latency percentiles (p50, p95, p99,
max) and errors by code. ``open_loop``: Poisson arrivals whose rate follows a function of
time, every request its own task. ``run_profile``: an open loop following a named profile,
with the fleet's size polled from the admin port once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from mesh.client import Client, backoff_s
from mesh.errors import MeshError
from mesh.stats import percentile


@dataclass
class BenchResult:
    model: str
    concurrency: int
    duration_s: float
    requests: int
    errors: dict[str, int] = field(default_factory=dict)
    rps: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    mean_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Progress:
    """A one-line live display on a terminal; a line per second when piped."""

    def __init__(self, out: TextIO, total_s: float) -> None:
        self.out = out
        self.total_s = total_s
        self.tty = out.isatty()
        self._last_line_s = 0.0

    def update(self, elapsed_s: float, done: int, errors: int, recent_ms: list[float]) -> None:
        recent = sorted(recent_ms)
        line = (f"[{elapsed_s:5.1f}/{self.total_s:.0f}s] {done / max(elapsed_s, 1e-9):9.1f} req/s"
                f"  p50 {percentile(recent, 50):7.2f} ms  p99 {percentile(recent, 99):7.2f} ms"
                f"  errors {errors}")
        if self.tty:
            self.out.write("\r" + line)
            self.out.flush()
        elif elapsed_s - self._last_line_s >= 1.0:
            self._last_line_s = elapsed_s
            self.out.write(line + "\n")
            self.out.flush()

    def finish(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def _raise_from_dead_callers(tasks: list[asyncio.Task[None]]) -> None:
    """A caller ends only when told to, or on an error that is not the service's answer (a
    client that is not connected, a bug): raise it rather than report a quiet, empty run."""
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]


async def closed_loop(
    client: Client,
    model: str,
    inputs: dict[str, Any],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 0.5,
    timeout_s: float = 30.0,
    progress: Progress | None = None,
) -> BenchResult:
    latencies: list[float] = []
    recent: list[float] = []
    errors: dict[str, int] = {}
    measuring = False
    stop = False

    async def caller() -> None:
        failures = 0  # in a row: a refused caller backs off instead of spinning
        while not stop:
            t0 = time.perf_counter()
            try:
                await client.infer(model, inputs, timeout_s=timeout_s)
            except MeshError as exc:
                if measuring:
                    errors[exc.code] = errors.get(exc.code, 0) + 1
                failures += 1
                if exc.retryable:  # overloaded, a controller shutting down (cancelled), ...
                    await asyncio.sleep(backoff_s(exc.retry_after_ms, failures))
                continue
            failures = 0
            if measuring:
                ms = (time.perf_counter() - t0) * 1000.0
                latencies.append(ms)
                recent.append(ms)

    tasks = [asyncio.create_task(caller(), name=f"bench.caller.{i}") for i in range(concurrency)]
    try:
        await asyncio.sleep(warmup_s)
        measuring = True
        started = time.perf_counter()
        while True:
            await asyncio.sleep(0.25)
            elapsed = time.perf_counter() - started
            _raise_from_dead_callers(tasks)
            if progress is not None:
                progress.update(elapsed, len(latencies), sum(errors.values()), recent[-2000:])
                del recent[:-2000]
            if elapsed >= duration_s:
                break
        measuring = False
        elapsed = time.perf_counter() - started
    finally:
        stop = True
        await asyncio.wait(tasks, timeout=timeout_s + 5)
        for t in tasks:
            t.cancel()
        if progress is not None:
            progress.finish()
    _raise_from_dead_callers(tasks)
    values = sorted(latencies)
    return BenchResult(
        model=model, concurrency=concurrency, duration_s=round(elapsed, 3),
        requests=len(values), errors=errors, rps=round(len(values) / elapsed, 2),
        p50_ms=round(percentile(values, 50), 3), p95_ms=round(percentile(values, 95), 3),
        p99_ms=round(percentile(values, 99), 3), max_ms=round(values[-1] if values else 0.0, 3),
        mean_ms=round(sum(values) / len(values), 3) if values else 0.0,
    )


@dataclass
class Arrival:
    sent_s: float  # seconds since the start of the run
    latency_ms: float | None = None
    error: str = ""


def profile_rate(profile: str, t: float, duration_s: float, base: float, peak: float) -> float:
    """Requests per second at time ``t`` of a named load profile.

    step: base, then peak from 1/3 to 2/3 of the run, then base again; ramp: base to peak
    over the first half, back down over the second; spike: base with a peak for a tenth of
    the run in the middle; diurnal: one smooth day, base at night, peak at noon.
    """
    x = t / duration_s
    if profile == "step":
        return peak if 1 / 3 <= x < 2 / 3 else base
    if profile == "ramp":
        return base + (peak - base) * (1 - abs(2 * x - 1))
    if profile == "spike":
        return peak if 0.45 <= x < 0.55 else base
    if profile == "diurnal":
        return base + (peak - base) * (1 - math.cos(2 * math.pi * x)) / 2
    raise ValueError(f"unknown profile {profile!r}; use step, ramp, spike or diurnal")


async def open_loop(
    client: Any,
    model: str,
    inputs: dict[str, Any],
    rate: Callable[[float], float],
    *,
    duration_s: float,
    timeout_s: float = 30.0,
    seed: int = 0,
    max_outstanding: int = 20_000,
    on_second: Callable[[float, list[Arrival]], Awaitable[None]] | None = None,
) -> list[Arrival]:
    """Poisson arrivals whose rate follows ``rate(t)``; every request is its own task, so a
    slow server does not slow the arrivals (unlike a closed loop)."""
    rng = random.Random(seed)
    arrivals: list[Arrival] = []
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()

    async def one(a: Arrival) -> None:
        try:
            await client.infer(model, inputs, timeout_s=timeout_s)
            a.latency_ms = (time.perf_counter() - start - a.sent_s) * 1000.0
        except MeshError as exc:
            a.error = exc.code

    next_report = 1.0
    t = 0.0
    while t < duration_s:
        r = max(rate(t), 1e-6)
        t += rng.expovariate(r)
        now = time.perf_counter() - start
        if t > now:
            await asyncio.sleep(t - now)
        if len(tasks) < max_outstanding:
            a = Arrival(sent_s=time.perf_counter() - start)
            arrivals.append(a)
            task = asyncio.create_task(one(a))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if on_second is not None and time.perf_counter() - start >= next_report:
            next_report += 1.0
            await on_second(time.perf_counter() - start, arrivals)
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s + 5.0)
    return arrivals


@dataclass
class Second:
    t: float
    target_rps: float
    sent: int
    done: int
    p99_ms: float
    worlds: int
    workers: int


async def run_profile(client: Any, admin: str, model: str, inputs: dict[str, Any], *,
                      profile: str | Callable[[float], float], duration_s: float,
                      base_rps: float = 0.0, peak_rps: float = 0.0, timeout_s: float = 30.0,
                      out: TextIO | None = None,
                      admin_curve: Any = None) -> tuple[list[Arrival], list[Second]]:
    """Open-loop load following a profile (a name for ``profile_rate``, or the rate itself as a
    function of seconds); one line per second with p99 and live worlds.

    The worlds and workers come from the admin port, polled once a second by a task of their
    own: a slow or refused status call (-1 in the table) never holds up the arrivals."""
    from mesh.admin_client import admin_call

    seconds: list[Second] = []
    marks = {"sent": 0}
    fleet = {"worlds": -1, "workers": -1}

    def rate(t: float) -> float:
        if callable(profile):
            return profile(t)
        return profile_rate(profile, t, duration_s, base_rps, peak_rps)

    async def watch_fleet() -> None:
        while True:
            try:
                status = await admin_call(admin, "status", timeout_s=2.0, curve=admin_curve)
                dep = next(d for d in status["deployments"] if d["name"] == model)
                fleet["worlds"] = dep["worlds_current"]
                fleet["workers"] = sum(1 for w in status["workers"]
                                       if w["state"] != "dead")
            except (MeshError, StopIteration):
                fleet["worlds"] = fleet["workers"] = -1
            await asyncio.sleep(1.0)

    async def every_second(t: float, arrivals: list[Arrival]) -> None:
        recent = sorted(a.latency_ms for a in arrivals if a.latency_ms is not None
                        and t - 1.0 <= a.sent_s + a.latency_ms / 1e3 < t)
        worlds, workers = fleet["worlds"], fleet["workers"]
        row = Second(t=round(t, 2), target_rps=round(rate(t), 1),
                     sent=len(arrivals) - marks["sent"], done=len(recent),
                     p99_ms=round(percentile(recent, 99), 2), worlds=worlds, workers=workers)
        marks["sent"] = len(arrivals)
        seconds.append(row)
        if out is not None:
            out.write(f"t={row.t:6.1f}s target {row.target_rps:7.1f}/s sent {row.sent:5d} "
                      f"done {row.done:5d} p99 {row.p99_ms:8.2f} ms worlds {row.worlds} "
                      f"workers {row.workers}\n")
            out.flush()

    watcher = asyncio.create_task(watch_fleet(), name="bench.profile.fleet")
    try:
        arrivals = await open_loop(client, model, inputs, rate, duration_s=duration_s,
                                   timeout_s=timeout_s, on_second=every_second)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return arrivals, seconds


def plot_profile(seconds: list[Second], arrivals: list[Arrival], slo_ms: float, path: str,
                 title: str, *, oracle: list[int] | None = None) -> None:
    """A PNG: each request's latency, p99 per second against the SLO, the serving worlds
    (and, given, an oracle's worlds per second) and the offered load scaled to them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    done = [(a.sent_s, a.latency_ms) for a in arrivals if a.latency_ms is not None]
    ax.scatter([t for t, _ in done], [lat for _, lat in done], s=2, alpha=0.3,
               label="request latency")
    ax.plot([s.t for s in seconds], [s.p99_ms for s in seconds], color="black",
            label="p99 (1 s window)")
    ax.axhline(slo_ms, color="red", linestyle="--", label=f"SLO p99 {slo_ms:g} ms")
    ax.set_yscale("log")
    ax.set_ylabel("latency ms")
    ax.set_xlabel("seconds")
    ax2 = ax.twinx()
    ax2.step([s.t for s in seconds], [s.worlds for s in seconds], where="post", color="green",
             label="serving worlds")
    if oracle is not None:
        ax2.step([s.t for s in seconds], oracle, where="post", color="purple", linestyle=":",
                 label="oracle worlds")
    ax2.plot([s.t for s in seconds], [s.target_rps / max(1.0, max(x.target_rps for x in seconds))
                                      * max(1, max(x.worlds for x in seconds))
                                      for s in seconds],
             color="orange", alpha=0.6, label="offered load (scaled)")
    ax2.set_ylabel("worlds")
    ax2.set_ylim(0, max([s.worlds for s in seconds] + [1]) + 1)
    ax.set_title(title)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render_result(r: BenchResult) -> str:
    errors = ", ".join(f"{k}={v}" for k, v in sorted(r.errors.items())) or "0"
    rows = [
        ("model", r.model), ("concurrency", r.concurrency), ("duration_s", r.duration_s),
        ("requests", r.requests), ("req/s", r.rps), ("p50_ms", r.p50_ms), ("p95_ms", r.p95_ms),
        ("p99_ms", r.p99_ms), ("max_ms", r.max_ms), ("mean_ms", r.mean_ms), ("errors", errors),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
