"""deploy/observability matches the code: every metric that the alert rules and the Grafana
dashboard query is one the controller exports, under the same type, and every rule carries
what an on-call person needs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from controller.metrics import render_metrics
from controller.stats import LatencyWindow

OBSERVABILITY = Path(__file__).resolve().parent.parent / "deploy" / "observability"
METRIC = re.compile(r"\bmeshserve_[a-z0-9_]+")


def exported() -> set[str]:
    """Every series name the controller can export (histogram and counter suffixes too)."""
    status = {
        "deployments": [{"name": "m", "answered_ok": 1, "errors": {"overloaded": 1},
                         "p50_ms": 1.0, "p95_ms": 1.0, "p99_ms": 1.0, "rps": 1.0, "queued": 0,
                         "in_flight": 0, "worlds_current": 1, "worlds_desired": 1,
                         "slo_p99_ms": 100.0, "quarantined": ""}],
        "worlds": [{"deployment": "m", "state": "serving"}],
        "workers": [{"id": "w", "state": "serving", "stages_loaded": 1, "stages_idle": 0,
                     "quarantined": ""}],
        "controller": {"requests_rejected": {"bad_request": 1}},
    }
    names = set()
    for family in text_string_to_metric_families(render_metrics(status,
                                                                {"m": LatencyWindow()})):
        names.update(sample.name for sample in family.samples)
    return names


def queried(exprs: list[str]) -> set[str]:
    return {name for e in exprs for name in METRIC.findall(e)}


def test_alert_rules_query_exported_metrics_and_say_what_to_do() -> None:
    doc: dict[str, Any] = yaml.safe_load((OBSERVABILITY / "alerts.yml").read_text())
    rules = [r for group in doc["groups"] for r in group["rules"]]
    names = {r["alert"] for r in rules}
    # The alerts the operators asked for: SLO burn, no serving world, quarantine, churn.
    assert {"MeshserveNoServingWorld", "MeshserveLatencySLOBurnFast",
            "MeshserveErrorBudgetBurn", "MeshserveDeploymentQuarantined",
            "MeshserveWorkerQuarantined", "MeshserveWorkerChurn"} <= names
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
    missing = queried([r["expr"] for r in rules]) - exported()
    assert not missing, f"alert rules query metrics the controller does not export: {missing}"


def test_the_dashboard_queries_exported_metrics() -> None:
    dash = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    assert len(dash["panels"]) >= 6
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    missing = queried(exprs) - exported()
    assert not missing, f"the dashboard queries metrics the controller does not export: {missing}"
