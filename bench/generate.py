"""Generative serving, measured in one run: many streams decoded together against one at a
time, against the same engine in one process, and what latency users see.

    python -m bench.generate [--model tinygpt] [--streams 32] [--tokens 64] [--rounds 3]
                             [--window-s 8] [--json out.json]

One controller serves two copies of the model, each one world of ``--stages`` stages on its
own workers (autoscaling off, one torch thread per worker): ``new`` (the deployment's
defaults: up to 64 sequences decoded together) and ``one`` (``max_seqs = 1``: the old
behaviour, one stream at a time). Each round, back to back, in windows of ``--window-s``:

* ``new`` and ``one``: ``--streams`` concurrent streams of ``--tokens`` tokens, closed loop
  (a stream that ends is replaced at once);
* ``floor``: the same closed loop in this process, with no meshserve: the engine's scheduler
  (the same ``max_seqs`` and ``max_batch_tokens``), the whole model in one stage, greedy
  decoding, no sockets, no pipeline. What the model itself gives with this batching.

Reported per window: tokens/s, time to first token (TTFT) p50/p99, time per output token
(TPOT, per stream: first chunk to last over the tokens after the first) p50/p99, and for
``new`` each stage's busy share (its workers' heartbeats). Medians over the rounds, and the
ratios ``new / one`` and ``new / floor`` per round.

Then, once, on ``new``:

* ``burst``: ``--streams`` streams at the same instant: the slowest one's TTFT against the
  burst's whole duration;
* ``poisson``: Poisson arrivals at half the stream rate the ``new`` windows sustained:
  TTFT p99;
* ``long prompts``: ``--streams``/2 streams decoding while streams with long prompts arrive:
  TPOT p50 and p99 of the decoding ones (chunked prefill keeps them steady), and inter-token
  gaps;
* ``cancel``: ``--streams`` streams, half of them abandoned mid-way (the client cancels):
  the world's KV before and after, and the TPOT of the next half that starts against a
  clean window's.

Tables on stdout, JSON with ``--json``. Results and their host: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.admin_client import admin_call
from mesh.client import Client
from mesh.loop import run as run_loop
from mesh.stats import percentile
from mesh.testing.configs import write_config
from mesh.testing.ports import free_ports
from mesh.testing.processes import end_processes, start_controller
from mesh.testing.waits import admin_status, serving, wait_status

PROMPT_WORDS = ("the", "pipeline", "keeps", "every", "stage", "busy", "with", "tokens", "of",
                "many", "streams", "at", "once", "and", "a", "cache")


@dataclass
class Stream:
    """One stream as its client saw it."""

    started_s: float
    first_s: float = 0.0
    chunk_s: list[float] = field(default_factory=list)
    tokens: int = 0
    end_s: float = 0.0
    code: str = ""  # "" while running, "ok" or an error code when it ended

    @property
    def tpot_s(self) -> float | None:
        if self.code != "ok" or self.tokens < 2 or len(self.chunk_s) < 2:
            return None
        return (self.chunk_s[-1] - self.chunk_s[0]) / (self.tokens - 1)


def prompt_for(i: int, words: int = 3) -> str:
    rng = random.Random(i)
    return " ".join(rng.choice(PROMPT_WORDS) for _ in range(words)) + f" {i}"


def pct(values: list[float], q: float) -> float:
    return percentile(sorted(values), q)


async def run_stream(client: Client, model: str, prompt: str, max_tokens: int,
                     record: Stream, stop_after: int = 0, timeout_s: float = 300.0,
                     abandoned: asyncio.Event | None = None) -> None:
    """Stream once; ``stop_after``: abandon it (the client cancels) after that many chunks,
    and set ``abandoned``."""
    chunks = 0
    try:
        async for _ in client.stream(model, {"prompt": prompt}, max_tokens=max_tokens,
                                         timeout_s=timeout_s):
            now = time.perf_counter()
            if not record.first_s:
                record.first_s = now
            record.chunk_s.append(now)
            record.tokens += 1
            chunks += 1
            if stop_after and chunks >= stop_after:
                record.code = "abandoned"
                if abandoned is not None:
                    abandoned.set()
                break
        else:
            record.code = "ok"
    except Exception as exc:
        record.code = getattr(exc, "code", type(exc).__name__)
    record.end_s = time.perf_counter()


def window_figures(records: list[Stream], t0: float, t1: float) -> dict[str, Any]:
    """Tokens delivered inside [t0, t1], and the latencies of the streams that started (TTFT)
    or ended (TPOT) inside it."""
    tokens = sum(1 for r in records for t in r.chunk_s if t0 <= t < t1)
    ttft = [(r.first_s - r.started_s) * 1e3 for r in records
            if r.first_s and t0 <= r.started_s < t1]
    tpot = [r.tpot_s * 1e3 for r in records if r.tpot_s is not None and t0 <= r.end_s < t1]
    gaps = [(b - a) * 1e3 for r in records for a, b in itertools.pairwise(r.chunk_s)
            if t0 <= a and b < t1]
    errors = sum(1 for r in records if r.code not in ("", "ok", "abandoned"))
    return {"tokens_per_s": tokens / (t1 - t0), "ttft_p50_ms": pct(ttft, 50),
            "ttft_p99_ms": pct(ttft, 99), "ttft_max_ms": max(ttft, default=0.0),
            "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99),
            "itl_p50_ms": pct(gaps, 50), "itl_p99_ms": pct(gaps, 99),
            "streams_ended": sum(1 for r in records if r.end_s and t0 <= r.end_s < t1),
            "errors": errors}


async def closed_loop(client: Client, model: str, streams: int, tokens: int,
                      window_s: float, warm_s: float = 1.0) -> dict[str, Any]:
    """``streams`` streams at all times for ``warm_s + window_s``; figures over the window."""
    records: list[Stream] = []
    stop_at = time.perf_counter() + warm_s + window_s
    counter = iter(range(1 << 30))

    async def lane() -> None:
        while time.perf_counter() < stop_at:
            record = Stream(time.perf_counter())
            records.append(record)
            await run_stream(client, model, prompt_for(next(counter)), tokens, record)

    t0 = time.perf_counter() + warm_s
    await asyncio.gather(*(lane() for _ in range(streams)))
    return window_figures(records, t0, t0 + window_s)


class InProcess:
    """The floor: the engine's scheduler and the whole model in this process, greedy."""

    def __init__(self, model: str, max_seqs: int, max_batch_tokens: int, threads: int,
                 device: str = "cpu") -> None:
        import torch

        from mesh.spec import DeploymentSpec
        from worker.kv_cache import MB, KvCache
        from worker.loader import load_handler

        torch.set_num_threads(threads)
        spec = DeploymentSpec(name="floor", model=model)
        self.device = device
        self.handler: Any = load_handler(spec, device)
        self.cache = KvCache(self.handler.kv_layout(), budget_bytes=int(spec.kv_cache_mb * MB),
                             device=device)
        self.max_seqs = max_seqs
        self.max_batch_tokens = max_batch_tokens

    def run(self, streams: int, tokens: int, window_s: float, warm_s: float = 1.0
            ) -> dict[str, Any]:
        import torch

        from worker import pipeline
        from worker.gen_scheduler import Scheduler, Seq
        from worker.gen_stage import build_batch
        from worker.sampling import Resume, SamplingParams

        scheduler = Scheduler(max_seqs=self.max_seqs, max_batch_tokens=self.max_batch_tokens,
                              total_blocks=self.cache.total_blocks, stages=1,
                              clock=time.perf_counter)
        records: dict[int, Stream] = {}
        counter = iter(range(1, 1 << 30))

        def add() -> None:
            sid = next(counter)
            prompt = self.handler.tokenizer.encode(prompt_for(sid))
            records[sid] = Stream(time.perf_counter())
            scheduler.add(Seq(sid, (sid, sid), "stream", len(prompt), list(prompt),
                              SamplingParams(max_tokens=tokens), Resume(), 0.0, 1e18))

        for _ in range(streams):
            add()
        t0 = time.perf_counter() + warm_s
        stop_at = t0 + window_s
        while time.perf_counter() < stop_at:
            plan = scheduler.plan()
            assert plan is not None
            for sid in (*plan.frees, *plan.preempts):
                self.cache.free(sid)
            chunks = [pipeline.GenChunk(c.seq.sid, c.start, c.n, c.sample) for c in plan.chunks]
            batch = build_batch(self.cache, chunks, device=self.device, tokens=[
                t for c in plan.chunks for t in c.seq.tokens[c.start:c.start + c.n]])
            logits = self.handler.step(batch)
            picked = torch.argmax(logits, dim=-1).tolist()
            now = time.perf_counter()
            sampled = {}
            rows = iter(picked)
            for c in plan.chunks:
                if c.sample:
                    record = records[c.seq.sid]
                    record.first_s = record.first_s or now
                    record.chunk_s.append(now)
                    record.tokens += 1
                    finished = c.seq.generated + 1 >= tokens
                    sampled[c.seq.sid] = (next(rows), finished)
                    if finished:
                        record.end_s, record.code = now, "ok"
            for _ in scheduler.returned(plan.step, sampled):
                add()
        for sid in list(records):
            self.cache.free(sid)
        return window_figures(list(records.values()), t0, stop_at)


def deployments(args: argparse.Namespace) -> str:
    text = ""
    for name, extra in (("new", ""), ("one", "max_seqs = 1\n")):
        text += (f'\n[[deployments]]\nname = "{name}"\nmodel = "{args.model}"\n'
                 f"stages = {args.stages}\nworlds = 1\nmin_worlds = 1\nmax_worlds = 1\n"
                 f"max_inflight_per_world = 1024\n{extra}")
    return text


async def stage_busy_s(admin: str, deployment: str) -> list[float]:
    """Cumulative busy seconds of each stage's worker of ``deployment``'s world."""
    status = await admin_call(admin, "status", timeout_s=5.0)
    world = next(w for w in status["worlds"] if w["deployment"] == deployment)
    by_id = {w["id"]: w for w in status["workers"]}
    return [by_id[wid]["busy_s"] for wid in world["workers"]]


async def generation(admin: str, deployment: str) -> dict[str, Any]:
    status = await admin_call(admin, "status", timeout_s=5.0)
    dep = next(d for d in status["deployments"] if d["name"] == deployment)
    return dict(dep.get("generation") or {})


async def served_round(client: Client, admin: str, args: argparse.Namespace
                       ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("new", "one"):
        before = await stage_busy_s(admin, name)
        started = time.perf_counter()
        out[name] = await closed_loop(client, name, args.streams, args.tokens, args.window_s)
        await asyncio.sleep(0.5)  # the next heartbeats carry the window's last busy time
        after = await stage_busy_s(admin, name)
        elapsed = time.perf_counter() - started - 0.5
        out[name]["stage_busy"] = [round((b - a) / elapsed, 3) for a, b in zip(before, after,
                                                                               strict=True)]
    return out


async def burst(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    records = [Stream(time.perf_counter()) for _ in range(args.streams)]
    started = time.perf_counter()
    await asyncio.gather(*(run_stream(client, "new", prompt_for(10_000 + i), args.tokens, r)
                           for i, r in enumerate(records)))
    run_s = time.perf_counter() - started
    slowest = max(r.first_s - r.started_s for r in records)
    return {"streams": args.streams, "run_s": run_s, "slowest_ttft_s": slowest,
            "slowest_ttft_share": slowest / run_s,
            "all_ok": all(r.code == "ok" for r in records)}


async def poisson(client: Client, args: argparse.Namespace, capacity_tokens_s: float
                  ) -> dict[str, Any]:
    rate = 0.5 * capacity_tokens_s / args.tokens  # streams per second at half capacity
    rng = random.Random(7)
    records: list[Stream] = []
    tasks = []
    started = time.perf_counter()
    while time.perf_counter() - started < args.window_s:
        record = Stream(time.perf_counter())
        records.append(record)
        tasks.append(asyncio.ensure_future(run_stream(client, "new", prompt_for(20_000 + len(
            records)), args.tokens, record)))
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    ttft = [(r.first_s - r.started_s) * 1e3 for r in records if r.first_s]
    return {"streams_per_s": rate, "streams": len(records), "ttft_p50_ms": pct(ttft, 50),
            "ttft_p99_ms": pct(ttft, 99), "ok": sum(r.code == "ok" for r in records)}


async def long_prompts(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    """Half the streams decode 4x the tokens while long prompts keep arriving."""
    decoding = [Stream(time.perf_counter()) for _ in range(args.streams // 2)]
    runs = [asyncio.ensure_future(run_stream(client, "new", prompt_for(30_000 + i),
                                             4 * args.tokens, r))
            for i, r in enumerate(decoding)]
    arrivals: list[Stream] = []
    long_prompt = ("a long prompt arrives " * 40)[:args.long_prompt_chars]
    while not all(r.done() for r in runs):
        record = Stream(time.perf_counter())
        arrivals.append(record)
        runs.append(asyncio.ensure_future(run_stream(client, "new", long_prompt + str(len(
            arrivals)), 8, record)))
        await asyncio.sleep(args.long_every_s)
        if all(r.done() for r in runs[:len(decoding)]):
            break
    await asyncio.gather(*runs)
    tpot = [r.tpot_s * 1e3 for r in decoding if r.tpot_s is not None]
    gaps = [(b - a) * 1e3 for r in decoding for a, b in itertools.pairwise(r.chunk_s)]
    p50, p99 = pct(tpot, 50), pct(tpot, 99)
    return {"decoding": len(decoding), "long_prompts": len(arrivals),
            "prompt_chars": len(long_prompt), "tpot_p50_ms": p50, "tpot_p99_ms": p99,
            "tpot_p99_over_p50": p99 / p50 if p50 else 0.0, "itl_p50_ms": pct(gaps, 50),
            "itl_p99_ms": pct(gaps, 99)}


async def cancel_half(client: Client, admin: str, args: argparse.Namespace) -> dict[str, Any]:
    half = args.streams // 2
    tokens = 4 * args.tokens
    records = [Stream(time.perf_counter()) for _ in range(args.streams)]
    events = [asyncio.Event() for _ in range(half)]
    runs = [asyncio.ensure_future(run_stream(client, "new", prompt_for(40_000 + i), tokens, r,
                                             stop_after=args.tokens if i < half else 0,
                                             abandoned=events[i] if i < half else None))
            for i, r in enumerate(records)]
    await asyncio.gather(*(e.wait() for e in events))
    cancelled_s = time.perf_counter()
    before = await generation(admin, "new")
    await asyncio.sleep(0.5)  # two heartbeats
    after = await generation(admin, "new")
    following = [Stream(time.perf_counter()) for _ in range(half)]
    runs += [asyncio.ensure_future(run_stream(client, "new", prompt_for(50_000 + i), tokens, r))
             for i, r in enumerate(following)]
    await asyncio.gather(*runs)
    tpot_next = [r.tpot_s * 1e3 for r in following if r.tpot_s is not None]
    return {"cancelled": half, "running_before": before["running"],
            "running_after": after["running"], "kv_before_bytes": before["kv_used_bytes"],
            "kv_after_bytes": after["kv_used_bytes"],
            "next_tpot_p50_ms": pct(tpot_next, 50),
            "since_cancel_s": time.perf_counter() - cancelled_s,
            "next_ok": sum(r.code == "ok" for r in following)}


def median_of(rounds: list[dict[str, Any]], name: str, key: str) -> float:
    return statistics.median(r[name][key] for r in rounds)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ports = free_ports("client", "admin", "worker")
    tmp = Path(tempfile.mkdtemp(prefix="meshserve-generate-"))
    config = write_config(tmp / "generate.toml", ports, deployments(args), autoscale=False,
                          warm_workers=0, worker_threads=args.threads,
                          worker_device=args.device)
    admin = f"tcp://127.0.0.1:{ports['admin']}"
    ctrl = start_controller(config, tmp / "controller.log", log_level="WARNING")
    floor = InProcess(args.model, 64, 512, args.threads,
                      "cuda:0" if args.device == "cuda" else args.device)
    results: dict[str, Any] = {"model": args.model, "stages": args.stages, "device": args.device,
                               "streams": args.streams, "tokens": args.tokens,
                               "window_s": args.window_s, "threads": args.threads,
                               "rounds": []}
    try:
        await wait_status(admin_status(admin), lambda s: serving(s, 1), 240.0,
                          "both deployments serving", interval_s=0.25)
        async with Client(f"tcp://127.0.0.1:{ports['client']}", default_timeout_s=300) as c:
            await closed_loop(c, "new", 4, 8, 0.5, warm_s=0.0)  # warm both worlds
            await closed_loop(c, "one", 1, 8, 0.5, warm_s=0.0)
            for n in range(1, args.rounds + 1):
                served = await served_round(c, admin, args)
                served["floor"] = await asyncio.to_thread(floor.run, args.streams, args.tokens,
                                                          args.window_s)
                results["rounds"].append(served)
                print(f"round {n}: new {served['new']['tokens_per_s']:.0f} tok/s, one "
                      f"{served['one']['tokens_per_s']:.0f}, floor "
                      f"{served['floor']['tokens_per_s']:.0f}", flush=True)
            if not args.skip_scenarios:
                capacity = median_of(results["rounds"], "new", "tokens_per_s")
                results["burst"] = await burst(c, args)
                results["poisson"] = await poisson(c, args, capacity)
                results["long_prompts"] = await long_prompts(c, args)
                results["cancel"] = await cancel_half(c, admin, args)
                results["generation"] = await generation(admin, "new")
    finally:
        end_processes([ctrl], 30.0)
    rounds = results["rounds"]
    results["ratios"] = {
        "new_over_one": [r["new"]["tokens_per_s"] / r["one"]["tokens_per_s"] for r in rounds],
        "new_over_floor": [r["new"]["tokens_per_s"] / r["floor"]["tokens_per_s"]
                           for r in rounds]}
    return results


def render(results: dict[str, Any]) -> str:
    rounds = results["rounds"]
    lines = [f"{results['model']}, {results['stages']} stages, {results['streams']} streams "
             f"of {results['tokens']} tokens, windows of {results['window_s']} s, medians of "
             f"{len(rounds)} rounds (torch threads {results['threads']})", "",
             "| window | tokens/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | "
             "stage busy |", "|---|---:|---:|---:|---:|---:|---|"]
    for name in ("new", "one", "floor"):
        busy = ""
        if name != "floor":
            shares = [r[name]["stage_busy"] for r in rounds]
            busy = " / ".join(f"{statistics.median(s[i] for s in shares):.0%}"
                              for i in range(len(shares[0])))
        lines.append(f"| {name} | {median_of(rounds, name, 'tokens_per_s'):.0f} | "
                     f"{median_of(rounds, name, 'ttft_p50_ms'):.0f} | "
                     f"{median_of(rounds, name, 'ttft_p99_ms'):.0f} | "
                     f"{median_of(rounds, name, 'tpot_p50_ms'):.2f} | "
                     f"{median_of(rounds, name, 'tpot_p99_ms'):.2f} | {busy} |")
    ratios = results["ratios"]
    lines += ["", "new / one per round: " + ", ".join(f"{x:.1f}" for x in ratios["new_over_one"])
              + f" (median {statistics.median(ratios['new_over_one']):.1f}x)",
              "new / floor per round: " + ", ".join(f"{x:.2f}" for x in ratios["new_over_floor"])
              + f" (median {statistics.median(ratios['new_over_floor']):.2f})"]
    if "burst" in results:
        b, p, lp, c = (results["burst"], results["poisson"], results["long_prompts"],
                       results["cancel"])
        lines += ["",
                  f"burst: {b['streams']} streams at once, the slowest first token after "
                  f"{b['slowest_ttft_s'] * 1e3:.0f} ms of a {b['run_s']:.2f} s run "
                  f"({b['slowest_ttft_share']:.0%})",
                  f"poisson at half capacity ({p['streams_per_s']:.1f} streams/s, "
                  f"{p['streams']} streams): TTFT p50 {p['ttft_p50_ms']:.0f} ms, "
                  f"p99 {p['ttft_p99_ms']:.0f} ms",
                  f"long prompts ({lp['long_prompts']} of {lp['prompt_chars']} chars beside "
                  f"{lp['decoding']} decoding streams): TPOT p50 {lp['tpot_p50_ms']:.2f} ms, "
                  f"p99 {lp['tpot_p99_ms']:.2f} ms ({lp['tpot_p99_over_p50']:.2f}x); "
                  f"inter-token p50 {lp['itl_p50_ms']:.2f}, p99 {lp['itl_p99_ms']:.2f} ms",
                  f"cancel {c['cancelled']} of {2 * c['cancelled']}: sequences running "
                  f"{c['running_before']} -> {c['running_after']} within 0.5 s (KV "
                  f"{c['kv_before_bytes'] / 1e6:.2f} -> {c['kv_after_bytes'] / 1e6:.2f} MB, the "
                  f"others growing); the next {c['cancelled']} streams' TPOT p50 "
                  f"{c['next_tpot_p50_ms']:.2f} ms (clean window: "
                  f"{median_of(rounds, 'new', 'tpot_p50_ms'):.2f} ms)"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="worker.models.tinygpt:build")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-s", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="the workers' device and the floor's")
    parser.add_argument("--long-prompt-chars", type=int, default=480)
    parser.add_argument("--long-every-s", type=float, default=0.25)
    parser.add_argument("--skip-scenarios", action="store_true",
                        help="only the rounds of windows (new, one, floor)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = run_loop(run(args))
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
