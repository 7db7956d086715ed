"""The Prometheus exposition (controller/metrics.py): parsed back with prometheus_client's own
parser, so names, types, histogram buckets and label escaping are checked as a scraper reads
them."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from controller.metrics import render_metrics
from controller.stats import LatencyWindow


def status(name: str = "mlp") -> dict[str, Any]:
    dep = {"name": name, "answered_ok": 3, "errors": {"overloaded": 2}, "p50_ms": 1.0,
           "p95_ms": 2.0, "p99_ms": 3.0, "rps": 1.5, "queued": 0, "in_flight": 1,
           "worlds_current": 1, "worlds_desired": 2, "slo_p99_ms": 100.0, "quarantined": ""}
    return {
        "deployments": [dep],
        "worlds": [{"deployment": name, "state": "serving"},
                   {"deployment": name, "state": "forming"}],
        "workers": [{"id": 'w"1\n', "state": "serving", "stages_loaded": 2, "stages_idle": 1,
                     "quarantined": ""},
                    {"id": "w2", "state": "idle", "stages_loaded": 1, "stages_idle": 1,
                     "quarantined": "declared dead 3 times within 600s"}],
        "controller": {"requests_rejected": {"bad_request": 4, "unknown_model": 1},
                       "unroutable_replies": 7, "workers_died": 2, "worlds_broken": 3,
                       "client_connections": 5,
                       "revoked_messages": {"client": 6, "worker": 0, "admin": 1}},
    }


def scrape(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_every_outcome_is_counted_and_latency_is_a_histogram() -> None:
    window = LatencyWindow()
    for latency_s, queue_s in ((0.004, 0.001), (0.02, 0.016), (0.3, 0.0)):
        window.record(1.0, latency_s, queue_s)
    families = scrape(render_metrics(status(), {"mlp": window}))
    requests = {s.labels["outcome"]: s.value for s in families["meshserve_requests"].samples
                if s.name.endswith("_total")}
    assert requests == {"ok": 3, "overloaded": 2}
    rejected = {s.labels["code"]: s.value
                for s in families["meshserve_requests_rejected"].samples}
    assert rejected == {"bad_request": 4, "unknown_model": 1}
    hist = families["meshserve_request_duration_seconds"]
    assert hist.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in hist.samples if s.name.endswith("_bucket")}
    assert buckets["0.001"] == 0 and buckets["0.005"] == 1 and buckets["0.025"] == 2
    assert buckets["0.25"] == 2 and buckets["0.5"] == 3 and buckets["+Inf"] == 3
    count = next(s.value for s in hist.samples if s.name.endswith("_count"))
    total = next(s.value for s in hist.samples if s.name.endswith("_sum"))
    assert count == 3 and abs(total - 0.324) < 1e-9
    queue = {s.labels["le"]: s.value for s in families["meshserve_queue_duration_seconds"]
             .samples if s.name.endswith("_bucket")}
    assert queue["0.001"] == 2 and queue["0.025"] == 3  # 0 and 1 ms: at or below 1 ms
    compute = {s.labels["le"]: s.value for s in families["meshserve_compute_duration_seconds"]
               .samples if s.name.endswith("_bucket")}
    assert compute["0.005"] == 2 and compute["0.25"] == 2 and compute["0.5"] == 3
    worlds = {(s.labels["deployment"], s.labels["state"]): s.value
              for s in families["meshserve_worlds"].samples}
    assert worlds == {("mlp", "serving"): 1, ("mlp", "forming"): 1}
    assert families["meshserve_worker_deaths"].samples[0].value == 2
    assert families["meshserve_world_breaks"].samples[0].value == 3
    assert families["meshserve_workers_quarantined"].samples[0].value == 1
    revoked = {s.labels["port"]: s.value for s in families["meshserve_revoked_messages"].samples
               if s.name.endswith("_total")}
    assert revoked == {"client": 6, "worker": 0, "admin": 1}


def test_label_values_are_escaped_and_a_deployment_without_worlds_reads_zero() -> None:
    s = status()
    s["worlds"] = []
    text = render_metrics(s)
    assert 'worker="w\\\\"1\\\\n"' not in text  # nothing double-escaped ...
    assert 'worker="w\\"1\\n"' in text  # ... and the quote and newline escaped once
    families = scrape(text)
    stages = {s.labels["worker"] for s in families["meshserve_worker_stages"].samples}
    assert stages == {'w"1\n', "w2"}  # read back as it was
    worlds = {(s.labels["deployment"], s.labels["state"]): s.value
              for s in families["meshserve_worlds"].samples}
    assert worlds == {("mlp", "serving"): 0}  # the "no serving world" alert can fire
