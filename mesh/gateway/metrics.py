"""The gateway's own metrics (``GET /metrics`` on its port, Prometheus text): requests by route
and status code, latency by route, streams open, and connections refused over the limits.
Each gateway process counts its own; a Prometheus scrape of each adds them up."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Seconds: from a 1 ms health check to a long generation.
BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
             60.0, 120.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("meshserve_gateway_requests", "HTTP requests answered, by "
                                "route and status code.", ["route", "code"],
                                registry=self.registry)
        self.latency = Histogram("meshserve_gateway_request_duration_seconds",
                                 "From a request's arrival to its answer's end (a stream's "
                                 "last event), by route.", ["route"], buckets=BUCKETS_S,
                                 registry=self.registry)
        self.streams = Gauge("meshserve_gateway_open_streams", "Streamed answers under way.",
                             registry=self.registry)
        self.disconnects = Counter("meshserve_gateway_client_disconnects", "Requests whose "
                                   "client went away before the answer ended (cancelled).",
                                   ["route"], registry=self.registry)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
