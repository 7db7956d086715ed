"""meshserve against Ray Serve, in one run, on the same models and the same driver.

    pip install -e ".[peers]"          # Ray Serve; not installed by CI
    python -m bench.peers [--rounds 3] [--duration-s 5] [--json peers.json]

Cells (closed loop, ``mesh.loadgen.closed_loop`` drives both systems):

- ``echo``: a no-op that answers with its input (a float32 [1, 4]), at 1, 16 and 128 callers;
- ``mlp``: the seeded 4x1024 MLP (``worker.models.mlp:build(hidden=1024, layers=4)``, float32
  [1, 64] in, [1, 10] out) at batch 1, at 1 and 16 callers, without batching;
- ``mlp-b16``: the same model batching up to 16 requests (2 ms wait), at 16 callers;
- ``mlp-b16 http c=32``: that batching deployment over HTTP, 32 connections of ``wrk`` (a C
  load generator, one thread) posting KServe v2 JSON: meshserve's gateway (``meshctl gateway``)
  against Ray Serve's HTTP proxy (a deployment that reads the same JSON);
- meshserve alone: ``mlp http c=1``, the gateway's p50 at one connection against the ZeroMQ
  client's (``mlp c=1``); ``tinygpt tokens``, tokens/s of 32 concurrent streams through the
  gateway (server-sent events, read by a lean asyncio client) against the ZeroMQ client's.

Each system serves with one replica on one torch thread: meshserve a controller and one
worker process per deployment (and its gateway for the HTTP cells); Ray Serve one replica actor
per deployment reached through a ``DeploymentHandle`` from this process (Ray's fastest path in
Python, no HTTP), with ``@serve.batch`` for ``mlp-b16``, and for HTTP its proxy. The
systems take turns, round by round (A B, then B A, ...),
and each is stopped entirely (``ray.shutdown()``; the controller and its workers ended by
PID) before the other starts, so they never share the machine. Ratios are taken within a round
and the table quotes their medians over rounds. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mesh.client import Client
from mesh.errors import MeshError, Unavailable
from mesh.loadgen import BenchResult, closed_loop
from mesh.testing.configs import write_config
from mesh.testing.ports import free_ports
from mesh.testing.processes import end_processes, start_controller
from mesh.testing.waits import admin_status, http_ready, serving, until, wait_status

MLP_KWARGS = {"hidden": 1024, "layers": 4}
HTTP_CALLERS = 32
STREAMS = 32
ROOT = str(Path(__file__).resolve().parents[1])  # Ray's replicas import the models from here
# (cell, deployment, callers)
CELLS = [("echo c=1", "echo", 1), ("echo c=16", "echo", 16), ("echo c=128", "echo", 128),
         ("mlp c=1", "mlp", 1), ("mlp c=16", "mlp", 16), ("mlp-b16 c=16", "mlp-b16", 16)]
HTTP_CELL = "mlp-b16 http c=32"
# The cells both systems run, in the tables' order (the HTTP one driven by wrk).
COMPARED = [*CELLS, (HTTP_CELL, "mlp-b16", HTTP_CALLERS)]
INPUTS = {"echo": {"x": np.arange(4, dtype=np.float32).reshape(1, 4)},
          "mlp": {"x": np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)}}


def inputs_of(deployment: str) -> dict[str, Any]:
    return INPUTS["echo" if deployment == "echo" else "mlp"]


def kserve_body() -> str:
    x = INPUTS["mlp"]["x"]
    return json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.reshape(-1).tolist()}]})


def wrk(url: str, body: str, connections: int, duration_s: float) -> dict[str, Any]:
    """POST ``body`` to ``url`` from ``connections`` connections of wrk (one thread) for
    ``duration_s``: req/s, latency percentiles, and answers that were not 2xx."""
    import shutil
    import subprocess

    if shutil.which("wrk") is None:
        raise SystemExit("the HTTP cells need wrk (apt-get install wrk)")
    script = Path(tempfile.mkdtemp(prefix="bench-wrk-")) / "post.lua"
    escaped = body.replace("\\", "\\\\").replace("'", "\\'")
    script.write_text(f"wrk.method = 'POST'\nwrk.body = '{escaped}'\n"
                      "wrk.headers['Content-Type'] = 'application/json'\n")
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
                          "--latency", "-s", str(script), url], capture_output=True, text=True,
                         timeout=duration_s + 60).stdout
    result: dict[str, Any] = {"rps": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "errors": 0}
    for line in out.splitlines():
        words = line.split()
        if line.startswith("Requests/sec:"):
            result["rps"] = float(words[1])
        elif len(words) == 2 and words[0] in ("50%", "99%"):
            result[f"p{words[0][:2]}_ms"] = _ms(words[1])
        elif line.strip().startswith("Non-2xx"):
            result["errors"] += int(words[-1])
        elif line.strip().startswith("Socket errors"):
            result["errors"] += sum(int(w.rstrip(",")) for w in words if w.rstrip(",").isdigit())
    return result


def _ms(text: str) -> float:
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if text.endswith(unit):
            return float(text[:-len(unit)]) * scale
    return float(text)


async def sse_tokens_per_s(port: int, streams: int, duration_s: float, tokens: int = 64
                           ) -> float:
    """Tokens a second of ``streams`` concurrent streamed completions through the gateway,
    closed loop, read with a lean asyncio HTTP/1.1 client (each token is one event)."""
    body = json.dumps({"model": "tinygpt", "prompt": "the pipeline keeps", "max_tokens": tokens,
                       "temperature": 0, "stream": True}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
               + f"content-length: {len(body)}\r\n\r\n".encode() + body)
    loop = asyncio.get_running_loop()
    counted = 0
    start = loop.time() + 1.0  # a second of warm-up
    stop_at = start + duration_s

    async def lane() -> None:
        nonlocal counted
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while loop.time() < stop_at:
                writer.write(request)
                await writer.drain()
                while await reader.readline() not in (b"\r\n", b""):
                    pass  # the headers; the body is chunked
                done = False
                while not done:
                    size = int((await reader.readline()).strip() or b"0", 16)
                    chunk = await reader.readexactly(size + 2) if size else b""
                    if size == 0:
                        await reader.readline()
                        done = True
                    now = loop.time()
                    if start <= now < stop_at:
                        counted += chunk.count(b'"finish_reason":null')
        finally:
            writer.close()

    await asyncio.gather(*(lane() for _ in range(streams)))
    return counted / duration_s


async def zmq_tokens_per_s(client: Client, streams: int, duration_s: float, tokens: int = 64
                           ) -> float:
    loop = asyncio.get_running_loop()
    counted = 0
    start = loop.time() + 1.0
    stop_at = start + duration_s

    async def lane() -> None:
        nonlocal counted
        while loop.time() < stop_at:
            async for _ in client.stream("tinygpt", {"prompt": "the pipeline keeps"},
                                         max_tokens=tokens, params={"temperature": 0}):
                if start <= loop.time() < stop_at:
                    counted += 1

    await asyncio.gather(*(lane() for _ in range(streams)))
    return counted / duration_s


# -- meshserve --------------------------------------------------------------------------------


class Meshserve:
    name = "meshserve"

    def __init__(self, busy_poll_us: int = 0) -> None:
        self._proc: Any = None
        self._gateway: Any = None
        self.http_port = 0
        self.extra: dict[str, float] = {}  # the cells meshserve alone runs
        self.client: Client | None = None
        self._tmp = Path(tempfile.mkdtemp(prefix="bench-peers-"))
        self._busy_poll_us = busy_poll_us

    async def start(self) -> None:
        ports = free_ports("client", "admin", "worker")
        mlp = f'model = "worker.models.mlp:build"\nfactory_kwargs = {{ hidden = ' \
              f'{MLP_KWARGS["hidden"]}, layers = {MLP_KWARGS["layers"]} }}\n'
        deployments = f"""
[[deployments]]
name = "echo"
model = "worker.models.echo:build"
max_batch_size = 64
max_inflight_per_world = 256

[[deployments]]
name = "mlp"
{mlp}max_batch_size = 1
max_inflight_per_world = 256

[[deployments]]
name = "mlp-b16"
{mlp}max_batch_size = 16
max_batch_delay_ms = 2.0
max_inflight_per_world = 256

[[deployments]]
name = "tinygpt"
model = "worker.models.tinygpt:build"
stages = 2
"""
        config = write_config(self._tmp / "meshserve.toml", ports, deployments,
                              autoscale=False, warm_workers=0, worker_threads=1,
                              busy_poll_us=self._busy_poll_us)
        self._proc = start_controller(config, self._tmp / "controller.log")
        await wait_status(admin_status(f"tcp://127.0.0.1:{ports['admin']}"), serving, 180.0,
                          "every deployment serving", interval_s=0.2)
        self.http_port = free_ports("http")["http"]
        self._gateway = start_gateway(f"tcp://127.0.0.1:{ports['client']}",
                                      f"127.0.0.1:{self.http_port}",
                                      (self._tmp / "gateway.log").open("ab"))
        self.client = Client(f"tcp://127.0.0.1:{ports['client']}")
        await self.client.connect()
        await until(lambda: http_ready(self.http_port), 60.0, "the gateway ready",
                    interval_s=0.25)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        if self._gateway is not None:
            end_processes([self._gateway], 20.0)
            self._gateway = None
        if self._proc is not None:
            end_processes([self._proc], 20.0)
            self._proc = None

    async def infer(self, model: str, inputs: dict[str, Any], *, timeout_s: float = 30.0
                    ) -> dict[str, Any]:
        assert self.client is not None
        return await self.client.infer(model, inputs, timeout_s=timeout_s)


# -- Ray Serve --------------------------------------------------------------------------------


def _load_mlp() -> tuple[Any, Any]:
    """torch on one thread, and the same seeded MLP meshserve's worker builds."""
    import torch

    from worker.models.mlp import build
    torch.set_num_threads(1)
    return torch, build(**MLP_KWARGS)


def _ray_apps() -> dict[str, Any]:
    """The three deployments as Ray Serve applications (built on first use: Ray is optional)."""
    from ray import serve

    @serve.deployment(num_replicas=1, max_ongoing_requests=256,
                      ray_actor_options={"num_cpus": 0})
    class Echo:
        async def __call__(self, inputs: dict[str, Any]) -> dict[str, Any]:
            return inputs

    @serve.deployment(num_replicas=1, max_ongoing_requests=256,
                      ray_actor_options={"num_cpus": 0})
    class Mlp:
        def __init__(self) -> None:
            self.torch, self.model = _load_mlp()

        def __call__(self, inputs: dict[str, Any]) -> dict[str, Any]:
            with self.torch.inference_mode():
                y = self.model(self.torch.from_numpy(inputs["x"]))
            return {"y": y.numpy()}

    @serve.deployment(num_replicas=1, max_ongoing_requests=256,
                      ray_actor_options={"num_cpus": 0})
    class MlpBatched:
        def __init__(self) -> None:
            self.torch, self.model = _load_mlp()

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
        async def __call__(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
            torch = self.torch
            x = torch.from_numpy(np.concatenate([b["x"] for b in batch]))
            with torch.inference_mode():
                y = self.model(x).numpy()
            return [{"y": y[i:i + 1]} for i in range(len(batch))]

    @serve.deployment(num_replicas=1, max_ongoing_requests=256,
                      ray_actor_options={"num_cpus": 0})
    class MlpHttp:
        """mlp-b16 over Ray's HTTP proxy, reading and answering KServe v2 JSON."""

        def __init__(self) -> None:
            self.torch, self.model = _load_mlp()

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
        async def run(self, xs: list[Any]) -> list[Any]:
            torch = self.torch
            with torch.inference_mode():
                y = self.model(torch.from_numpy(np.concatenate(xs))).numpy()
            return [y[i:i + 1] for i in range(len(xs))]

        async def __call__(self, request: Any) -> dict[str, Any]:
            body = await request.json()
            item = body["inputs"][0]
            x = np.asarray(item["data"], dtype=np.float32).reshape(item["shape"])
            y = await self.run(x)
            return {"model_name": "mlp-b16", "outputs": [
                {"name": "y", "datatype": "FP32", "shape": list(y.shape),
                 "data": y.reshape(-1).tolist()}]}

    return {"echo": Echo.bind(), "mlp": Mlp.bind(), "mlp-b16": MlpBatched.bind(),
            "mlp-http": MlpHttp.bind()}


class RayServe:
    name = "ray-serve"

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}
        self.http_port = 0

    async def start(self) -> None:
        import ray
        from ray import serve

        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}})
        self.http_port = free_ports("http")["http"]
        serve.start(http_options={"host": "127.0.0.1", "port": self.http_port})
        for name, app in _ray_apps().items():
            if name == "mlp-http":
                serve.run(app, name=name, route_prefix="/v2/models/mlp-b16/infer",
                          blocking=False)
                continue
            self._handles[name] = serve.run(app, name=name, route_prefix=None,
                                            blocking=False)
        for name, handle in self._handles.items():  # first call: replicas up and warm
            await handle.remote(inputs_of(name))
        await until(lambda: http_ready(self.http_port, "/-/healthz"), 60.0,
                    "Ray Serve's HTTP proxy ready", interval_s=0.25)

    async def stop(self) -> None:
        import ray
        from ray import serve

        self._handles.clear()
        serve.shutdown()
        ray.shutdown()

    async def infer(self, model: str, inputs: dict[str, Any], *, timeout_s: float = 30.0
                    ) -> dict[str, Any]:
        try:
            out: dict[str, Any] = await asyncio.wait_for(
                self._handles[model].remote(inputs), timeout_s)
        except MeshError:
            raise
        except Exception as exc:  # counted as an error of the cell, as meshserve's are
            raise Unavailable(f"ray: {type(exc).__name__}: {exc}") from None
        return out


# -- the run ----------------------------------------------------------------------------------


def http_result(model: str, res: dict[str, Any], callers: int, duration_s: float
                ) -> BenchResult:
    return BenchResult(model, callers, duration_s, int(res["rps"] * duration_s),
                       {"http": res["errors"]} if res["errors"] else {}, rps=res["rps"],
                       p50_ms=res["p50_ms"], p99_ms=res["p99_ms"])


def start_gateway(controller: str, listen: str, log: Any) -> Any:
    import subprocess

    return subprocess.Popen([sys.executable, "-m", "mesh.cli", "--log-level", "WARNING",
                             "gateway", "--controller", controller, "--listen", listen],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


async def measure(system: Meshserve | RayServe, duration_s: float) -> dict[str, BenchResult]:
    await system.start()
    try:
        out = {}
        for cell, deployment, callers in CELLS:
            r = await closed_loop(system, deployment, inputs_of(deployment),  # type: ignore[arg-type]
                                  concurrency=callers, duration_s=duration_s, warmup_s=1.0)
            out[cell] = r
            print(f"  {system.name:9s} {cell:13s} {r.rps:9.1f} req/s  p50 {r.p50_ms:8.3f} ms"
                  f"  p99 {r.p99_ms:8.3f} ms  errors {sum(r.errors.values())}",
                  file=sys.stderr, flush=True)
        http = await asyncio.to_thread(
            wrk, f"http://127.0.0.1:{system.http_port}/v2/models/mlp-b16/infer", kserve_body(),
            HTTP_CALLERS, duration_s)
        out[HTTP_CELL] = http_result("mlp-b16", http, HTTP_CALLERS, duration_s)
        print(f"  {system.name:9s} {HTTP_CELL:13s} {http['rps']:9.1f} req/s  p50 "
              f"{http['p50_ms']:8.3f} ms  errors {http['errors']}", file=sys.stderr, flush=True)
        if isinstance(system, Meshserve):
            assert system.client is not None
            one = await asyncio.to_thread(
                wrk, f"http://127.0.0.1:{system.http_port}/v2/models/mlp/infer", kserve_body(),
                1, duration_s)
            zmq = await zmq_tokens_per_s(system.client, STREAMS, duration_s)
            sse = await sse_tokens_per_s(system.http_port, STREAMS, duration_s)
            system.extra = {"http_c1_p50_ms": one["p50_ms"], "zmq_c1_p50_ms":
                            out["mlp c=1"].p50_ms, "tokens_zmq": zmq, "tokens_http": sse}
            print(f"  meshserve mlp http c=1 p50 {one['p50_ms']:.3f} ms; tinygpt 32 streams "
                  f"{zmq:.0f} tokens/s ZeroMQ, {sse:.0f} through the gateway",
                  file=sys.stderr, flush=True)
        return out
    finally:
        await system.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    for n in range(args.rounds):
        systems: list[Meshserve | RayServe] = [Meshserve(args.busy_poll_us), RayServe()]
        if n % 2:
            systems.reverse()
        print(f"round {n + 1}: {' then '.join(s.name for s in systems)}", file=sys.stderr)
        results = {}
        extra: dict[str, float] = {}
        for system in systems:
            results[system.name] = await measure(system, args.duration_s)
            if isinstance(system, Meshserve):
                extra = system.extra
            await asyncio.sleep(2.0)  # let the machine settle after a system stops
        round_: dict[str, Any] = {cell: {"meshserve": results["meshserve"][cell].to_dict(),
                                         "ray": results["ray-serve"][cell].to_dict()}
                                  for cell, _, _ in COMPARED}
        round_["meshserve alone"] = extra
        rounds.append(round_)
    return {"rounds": rounds, "summary": summarize(rounds),
            "config": {"duration_s": args.duration_s, "rounds": args.rounds,
                       "mlp": MLP_KWARGS, "busy_poll_us": args.busy_poll_us}}


def summarize(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for cell, _, callers in COMPARED:
        rows = [r[cell] for r in rounds]

        def med(get: Any, rows: list[dict[str, Any]] = rows) -> float:
            return float(statistics.median(get(row) for row in rows))

        out.append({
            "cell": cell, "callers": callers,
            "meshserve_rps": med(lambda r: r["meshserve"]["rps"]),
            "ray_rps": med(lambda r: r["ray"]["rps"]),
            "rps_ratio": med(lambda r: r["meshserve"]["rps"] / max(r["ray"]["rps"], 1e-9)),
            "meshserve_p50_ms": med(lambda r: r["meshserve"]["p50_ms"]),
            "ray_p50_ms": med(lambda r: r["ray"]["p50_ms"]),
            "p50_ratio": med(lambda r: r["meshserve"]["p50_ms"] / max(r["ray"]["p50_ms"], 1e-9)),
            "errors": {"meshserve": sum(sum(r["meshserve"]["errors"].values()) for r in rows),
                       "ray": sum(sum(r["ray"]["errors"].values()) for r in rows)},
        })
    return out


def render(results: dict[str, Any]) -> str:
    lines = [f"meshserve vs Ray Serve (medians of {len(results['rounds'])} rounds; ratios per "
             "round)",
             "| cell | meshserve req/s | Ray req/s | req/s ratio | meshserve p50 ms | "
             "Ray p50 ms | p50 ratio | errors (mesh/Ray) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in results["summary"]:
        lines.append(f"| {s['cell']} | {s['meshserve_rps']:.0f} | {s['ray_rps']:.0f} | "
                     f"{s['rps_ratio']:.1f}x | {s['meshserve_p50_ms']:.3f} | "
                     f"{s['ray_p50_ms']:.3f} | {s['p50_ratio']:.2f} | "
                     f"{s['errors']['meshserve']}/{s['errors']['ray']} |")
    alone = [r["meshserve alone"] for r in results["rounds"] if r.get("meshserve alone")]
    if alone:
        def med(key: str) -> float:
            return float(statistics.median(a[key] for a in alone))

        gaps = [a["http_c1_p50_ms"] - a["zmq_c1_p50_ms"] for a in alone]
        shares = [a["tokens_http"] / max(a["tokens_zmq"], 1e-9) for a in alone]
        lines += ["", "meshserve alone: the gateway against the ZeroMQ client",
                  f"- mlp at one caller, p50: gateway (wrk) {med('http_c1_p50_ms'):.3f} ms, "
                  f"ZeroMQ client {med('zmq_c1_p50_ms'):.3f} ms; gateway - ZeroMQ per round "
                  + ", ".join(f"{g:+.3f}" for g in gaps) + " ms",
                  f"- tinygpt, {STREAMS} streams: {med('tokens_http'):.0f} tokens/s through the "
                  f"gateway, {med('tokens_zmq'):.0f} with the ZeroMQ client; per round "
                  + ", ".join(f"{x:.2f}" for x in shares)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--duration-s", type=float, default=5.0,
                        help="seconds measured per cell (default 5.0)")
    parser.add_argument("--json", help="write every figure, round by round, here")
    parser.add_argument("--busy-poll-us", type=int, default=0, metavar="US",
                        help="meshserve's controller busy_poll_us (default 0: off)")
    args = parser.parse_args()
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        print("bench.peers needs Ray Serve: pip install -e '.[peers]'", file=sys.stderr)
        return 2
    results = asyncio.run(run(args))
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
