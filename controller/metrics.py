"""Prometheus metrics over plain HTTP (``GET /metrics``), served from the controller's loop.

The families are built at each scrape from the status snapshot (one owner per figure: the
routers, the WorldManager, the frontend) and the routers' latency histograms, and written out
by prometheus_client, which owns the text format and the escaping of label values. The
latency histograms are counted by controller/stats.py on the hot path, without
prometheus_client's locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from controller.records import WorkerState
from controller.stats import GenWindow, LatencyWindow
from mesh.logs import speaker

log = speaker(logging.getLogger(__name__), "controller")


# Counters taken from the status snapshot's controller block: (key, name, help).
_CONTROLLER_COUNTERS = (
    ("worker_messages_rejected", "meshserve_worker_messages_rejected",
     "Control messages on the worker port that did not decode or type-check (dropped)."),
    ("unroutable_replies", "meshserve_unroutable_replies",
     "Data-path frames on the worker port for no known world, or malformed (dropped)."),
    ("foreign_replies", "meshserve_foreign_replies",
     "Replies from a socket that is not a member of the world they name (dropped)."),
    ("answers_dropped", "meshserve_answers_dropped",
     "Answers not delivered: the client was gone, or did not read and had CLIENT_SEND_HWM "
     "answers waiting."),
    ("client_connections_refused", "meshserve_client_connections_refused",
     "Client connections closed at once because max_client_connections were open."),
    ("workers_died", "meshserve_worker_deaths",
     "Workers declared dead (exited, or silent) other than those retired."),
    ("worlds_broken", "meshserve_world_breaks", "Worlds broken by a failure."),
)

# Counters by one label, from maps in the controller block: (key, name, label, help).
_CONTROLLER_LABELLED_COUNTERS = (
    ("requests_rejected", "meshserve_requests_rejected", "code",
     "Requests the frontend refused before a deployment saw them (malformed, unknown model, "
     "too large, ...), by error code."),
    ("revoked_messages", "meshserve_revoked_messages", "port",
     "Messages dropped (CURVE on) because the key of the connection they came on was revoked "
     "after it connected, by port."),
)

# Per-deployment gauges from the status snapshot: (key, help).
_DEPLOYMENT_GAUGES = (
    ("rps", "Requests per second over the last 10 s."),
    ("queued", "Requests waiting for a world."),
    ("in_flight", "Requests on a world."),
    ("worlds_current", "Serving worlds."),
    ("worlds_desired", "Target number of worlds."),
    ("slo_p99_ms", "Latency target."),
)

_HISTOGRAMS = (
    ("request", "meshserve_request_duration_seconds",
     "Time at the controller of requests answered ok, arrival to answer."),
    ("queue", "meshserve_queue_duration_seconds",
     "Of that, the wait before a request's last dispatch to a world."),
    ("compute", "meshserve_compute_duration_seconds",
     "Of that, from the last dispatch to the answer: the world's queue, compute and transit."),
)


def families(status: dict[str, Any], stats: Mapping[str, LatencyWindow],
             gen: Mapping[str, GenWindow] | None = None) -> list[Metric]:
    """Every metric family, from a status snapshot and each deployment's latency figures
    (``gen``: the token-level ones of generative deployments)."""
    out: list[Metric] = []
    deps = status["deployments"]
    requests = CounterMetricFamily("meshserve_requests",
                                   "Requests answered by a deployment, by outcome (ok or an "
                                   "error code).", labels=["deployment", "outcome"])
    for d in deps:
        requests.add_metric([d["name"], "ok"], d["answered_ok"])
        for code, n in sorted(d["errors"].items()):
            requests.add_metric([d["name"], code], n)
    out.append(requests)
    c = status["controller"]
    for key, name, label, help_text in _CONTROLLER_LABELLED_COUNTERS:
        family = CounterMetricFamily(name, help_text, labels=[label])
        for value, n in sorted(c.get(key, {}).items()):
            family.add_metric([value], n)
        out.append(family)
    for key, name, help_text in _HISTOGRAMS:
        hist = HistogramMetricFamily(name, help_text, labels=["deployment"])
        for dep_name, window in sorted(stats.items()):
            h = getattr(window, key)
            hist.add_metric([dep_name], [(_le(b), n) for b, n in h.cumulative()], h.sum)
        out.append(hist)
    out += _generation_families(status, gen or {})
    latency = GaugeMetricFamily("meshserve_latency_ms", "End-to-end latency over the last "
                                "10 s.", labels=["deployment", "quantile"])
    for d in deps:
        for q in ("p50", "p95", "p99"):
            latency.add_metric([d["name"], q], d[q + "_ms"])
    out.append(latency)
    for key, help_text in _DEPLOYMENT_GAUGES:
        gauge = GaugeMetricFamily(f"meshserve_{key}", help_text, labels=["deployment"])
        for d in deps:
            gauge.add_metric([d["name"]], d[key])
        out.append(gauge)
    quarantined = GaugeMetricFamily("meshserve_deployment_quarantined",
                                    "1 while a deployment is quarantined (no formation "
                                    "attempts until meshctl scale).", labels=["deployment"])
    for d in deps:
        quarantined.add_metric([d["name"]], 1 if d.get("quarantined") else 0)
    out.append(quarantined)
    worlds = GaugeMetricFamily("meshserve_worlds", "Worlds by deployment and state (serving "
                               "is always present, 0 included).", labels=["deployment", "state"])
    counts: dict[tuple[str, str], int] = {(d["name"], "serving"): 0 for d in deps}
    for w in status["worlds"]:
        counts[w["deployment"], w["state"]] = counts.get((w["deployment"], w["state"]), 0) + 1
    for (dep_name, state), n in sorted(counts.items()):
        worlds.add_metric([dep_name, state], n)
    out.append(worlds)
    for key, name, help_text in _CONTROLLER_COUNTERS:
        out.append(CounterMetricFamily(name, help_text, value=c.get(key, 0)))
    out.append(GaugeMetricFamily("meshserve_client_connections", "Client connections open.",
                                 value=c.get("client_connections", 0)))
    workers = GaugeMetricFamily("meshserve_workers", "Workers by state.", labels=["state"])
    states: dict[str, int] = {}
    for w in status["workers"]:
        states[w["state"]] = states.get(w["state"], 0) + 1
    for state, n in sorted(states.items()):
        workers.add_metric([state], n)
    out.append(workers)
    out.append(GaugeMetricFamily(
        "meshserve_workers_quarantined", "Live workers given no world because they kept "
        "stalling their worlds or dropping off.",
        value=sum(1 for w in status["workers"]
                  if w.get("quarantined") and w["state"] != WorkerState.DEAD)))
    stages = GaugeMetricFamily("meshserve_worker_stages", "Model stages a live worker holds "
                               "in memory, in use by its worlds or idle (kept for reuse, at "
                               "most max_idle_stages).", labels=["worker", "use"])
    for w in status["workers"]:
        if w["state"] == WorkerState.DEAD:
            continue
        idle = w["stages_idle"]
        stages.add_metric([w["id"], "in_use"], w["stages_loaded"] - idle)
        stages.add_metric([w["id"], "idle"], idle)
    out.append(stages)
    return out


# Per generative deployment, from its status ``generation`` block: (key, name, help, kind).
_GENERATION = (
    ("running", "meshserve_sequences_running", "Sequences decoding (holding KV).", "gauge"),
    ("waiting", "meshserve_sequences_waiting", "Sequences waiting at their world.", "gauge"),
    ("kv_used_bytes", "meshserve_kv_used_bytes", "KV cache in use, all stages.", "gauge"),
    ("kv_budget_bytes", "meshserve_kv_budget_bytes", "KV cache budget, all stages.", "gauge"),
    ("preemptions", "meshserve_preemptions", "Sequences preempted (KV given back, recomputed "
     "later), by serving worlds.", "counter"),
    ("tokens_delivered", "meshserve_tokens_delivered", "Stream tokens sent to clients.",
     "counter"),
)


def _generation_families(status: dict[str, Any], gen: Mapping[str, GenWindow]) -> list[Metric]:
    out: list[Metric] = []
    deps = [d for d in status["deployments"] if "generation" in d]
    for key, name, help_text, kind in _GENERATION:
        family: Metric = (GaugeMetricFamily(name, help_text, labels=["deployment"])
                          if kind == "gauge" else
                          CounterMetricFamily(name, help_text, labels=["deployment"]))
        for d in deps:
            family.add_metric([d["name"]], d["generation"][key])  # type: ignore[attr-defined]
        out.append(family)
    for key, name, help_text in (
            ("ttft", "meshserve_time_to_first_token_seconds",
             "Streams: arrival to first chunk."),
            ("tpot", "meshserve_time_per_output_token_seconds",
             "Streams that ended well: first chunk to last, per token after the first.")):
        hist = HistogramMetricFamily(name, help_text, labels=["deployment"])
        for dep_name, window in sorted(gen.items()):
            h = getattr(window, key)
            hist.add_metric([dep_name], [(_le(b), n) for b, n in h.cumulative()], h.sum)
        out.append(hist)
    return out


def _le(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(bound)


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


def render_metrics(status: dict[str, Any], stats: Mapping[str, LatencyWindow] | None = None,
                   gen: Mapping[str, GenWindow] | None = None) -> str:
    """The Prometheus text exposition (prometheus_client escapes the label values)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families(status, stats or {}, gen)))
    return generate_latest(registry).decode()


Probe = Callable[[], tuple[bool, str]]


class MetricsServer:
    """HTTP/1.0 on ``metrics_port``: ``/metrics`` (Prometheus text), ``/healthz`` and
    ``/readyz`` (200 or 503, the reason in the body: controller/probes.py)."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], dict[str, Any]], *,
                 stats: Callable[[], Mapping[str, LatencyWindow]] | None = None,
                 gen: Callable[[], Mapping[str, GenWindow]] | None = None,
                 live: Probe | None = None, ready: Probe | None = None) -> None:
        self.host = host
        self.port = port
        self._snapshot = snapshot
        self._stats = stats or dict
        self._gen = gen or dict
        self._probes: dict[str, Probe] = {}
        if live is not None:
            self._probes["/healthz"] = live
        if ready is not None:
            self._probes["/readyz"] = ready
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as exc:
            from mesh.ports import holder

            held = holder(self.port) if exc.errno == errno.EADDRINUSE else ""
            raise OSError(f"cannot serve metrics on {self.host}:{self.port}: "
                          f"{'the port is in use by ' + held if held else exc.strerror}"
                          ) from exc

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    def _answer(self, path: str) -> tuple[bytes, bytes, bytes]:
        """(status line, content type, body) for ``path``."""
        if path == "/metrics":
            return (b"200 OK", CONTENT_TYPE_LATEST.encode(),
                    render_metrics(self._snapshot(), self._stats(), self._gen()).encode())
        probe = self._probes.get(path)
        if probe is not None:
            ok, why = probe()
            return (b"200 OK" if ok else b"503 Service Unavailable", b"text/plain",
                    why.encode() + b"\n")
        return b"404 Not Found", b"text/plain", b"not found\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5.0):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = request.decode(errors="replace").split()
            if len(parts) >= 2 and parts[0] in ("GET", "HEAD"):
                line, kind, body = self._answer(parts[1].split("?")[0])
            else:
                line, kind, body = b"405 Method Not Allowed", b"text/plain", b"GET only\n"
            head = (b"HTTP/1.0 " + line + b"\r\nContent-Type: " + kind +
                    b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
            writer.write(head if parts and parts[0] == "HEAD" else head + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()
