"""Prometheus metrics over plain HTTP (``GET /metrics``), served from the controller's loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from controller.fleet import WorkerState
from mesh.logs import speaker

log = speaker(logging.getLogger(__name__), "controller")


def render_metrics(status: dict[str, Any]) -> str:
    lines = [
        "# HELP meshserve_requests_total Requests answered, by deployment and outcome.",
        "# TYPE meshserve_requests_total counter",
    ]
    for d in status["deployments"]:
        lines.append(f'meshserve_requests_total{{deployment="{d["name"]}",outcome="ok"}} '
                     f'{d["answered_ok"]}')
        for code, n in sorted(d["errors"].items()):
            lines.append(
                f'meshserve_requests_total{{deployment="{d["name"]}",outcome="{code}"}} {n}')
    lines += ["# HELP meshserve_latency_ms End-to-end latency over the last 10 s.",
              "# TYPE meshserve_latency_ms gauge"]
    for d in status["deployments"]:
        for q in ("p50", "p95", "p99"):
            lines.append(f'meshserve_latency_ms{{deployment="{d["name"]}",quantile="{q}"}} '
                         f'{d[q + "_ms"]}')
    gauges = [("rps", "Requests per second over the last 10 s."),
              ("queued", "Requests waiting for a world."),
              ("in_flight", "Requests on a world."),
              ("worlds_current", "Serving worlds."),
              ("worlds_desired", "Target number of worlds."),
              ("slo_p99_ms", "Latency target.")]
    for key, help_text in gauges:
        lines += [f"# HELP meshserve_{key} {help_text}", f"# TYPE meshserve_{key} gauge"]
        for d in status["deployments"]:
            lines.append(f'meshserve_{key}{{deployment="{d["name"]}"}} {d[key]}')
    c = status["controller"]
    lines += ["# HELP meshserve_worker_messages_rejected_total Control messages on the worker "
              "port that did not decode or type-check (dropped).",
              "# TYPE meshserve_worker_messages_rejected_total counter",
              f"meshserve_worker_messages_rejected_total {c.get('worker_messages_rejected', 0)}",
              "# HELP meshserve_unroutable_replies_total Data-path frames on the worker port "
              "for no known world, or malformed (dropped).",
              "# TYPE meshserve_unroutable_replies_total counter",
              f"meshserve_unroutable_replies_total {c.get('unroutable_replies', 0)}",
              "# HELP meshserve_foreign_replies_total Replies from a socket that is not a "
              "member of the world they name (dropped).",
              "# TYPE meshserve_foreign_replies_total counter",
              f"meshserve_foreign_replies_total {c.get('foreign_replies', 0)}",
              "# HELP meshserve_answers_dropped_total Answers not delivered: the client was "
              "gone, or did not read and had CLIENT_SEND_HWM answers waiting.",
              "# TYPE meshserve_answers_dropped_total counter",
              f"meshserve_answers_dropped_total {c.get('answers_dropped', 0)}",
              "# HELP meshserve_client_connections Client connections open.",
              "# TYPE meshserve_client_connections gauge",
              f"meshserve_client_connections {c.get('client_connections', 0)}",
              "# HELP meshserve_client_connections_refused_total Client connections closed "
              "at once because max_client_connections were open.",
              "# TYPE meshserve_client_connections_refused_total counter",
              f"meshserve_client_connections_refused_total "
              f"{c.get('client_connections_refused', 0)}"]
    lines += ["# HELP meshserve_workers Workers by state.", "# TYPE meshserve_workers gauge"]
    states: dict[str, int] = {}
    for w in status["workers"]:
        states[w["state"]] = states.get(w["state"], 0) + 1
    for state, n in sorted(states.items()):
        lines.append(f'meshserve_workers{{state="{state}"}} {n}')
    lines += ["# HELP meshserve_worker_stages Model stages a live worker holds in memory, "
              "in use by its worlds or idle (kept for reuse, at most max_idle_stages).",
              "# TYPE meshserve_worker_stages gauge"]
    for w in status["workers"]:
        if w["state"] == WorkerState.DEAD:
            continue
        idle = w["stages_idle"]
        used = w["stages_loaded"] - idle
        lines.append(f'meshserve_worker_stages{{worker="{w["id"]}",use="in_use"}} {used}')
        lines.append(f'meshserve_worker_stages{{worker="{w["id"]}",use="idle"}} {idle}')
    return "\n".join(lines) + "\n"


Probe = Callable[[], tuple[bool, str]]


class MetricsServer:
    """HTTP/1.0 on ``metrics_port``: ``/metrics`` (Prometheus text), ``/healthz`` and
    ``/readyz`` (200 or 503, the reason in the body: controller/probes.py)."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], dict[str, Any]], *,
                 live: Probe | None = None, ready: Probe | None = None) -> None:
        self.host = host
        self.port = port
        self._snapshot = snapshot
        self._probes: dict[str, Probe] = {}
        if live is not None:
            self._probes["/healthz"] = live
        if ready is not None:
            self._probes["/readyz"] = ready
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    def _answer(self, path: str) -> tuple[bytes, bytes, bytes]:
        """(status line, content type, body) for ``path``."""
        if path == "/metrics":
            return (b"200 OK", b"text/plain; version=0.0.4",
                    render_metrics(self._snapshot()).encode())
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
