"""The status snapshot (``meshctl status --json``, the admin ``status`` command).

Top-level keys are a public contract (docs/reference.md, Status JSON): ``controller``,
``deployments``, ``worlds``, ``workers``, ``events``; every entry carries at least the keys
listed there. Extra keys may be added, never renamed. Built from the Fleet's records, the
routers' figures and the counters of the controller's sockets; ``meshctl status`` prints it
as tables (mesh/cli/admin.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from controller.describe import stage_split
from controller.records import WorkerInfo, WorldInfo, WorldState
from mesh import gc_policy

if TYPE_CHECKING:
    from collections.abc import Mapping

    from controller.admin import Admin
    from controller.autoscaler import Autoscaler
    from controller.backend import Backend
    from controller.catalog import RouteConfig
    from controller.config import Config
    from controller.fleet import Fleet
    from controller.frontend import Frontend
    from controller.launcher import Launcher
    from controller.router import Router
    from mesh.loop_lag import LoopLag


@dataclass(frozen=True, slots=True)
class Parts:
    """The controller's parts whose counters the status reports."""

    started_s: float
    launcher: Launcher
    backend: Backend
    frontend: Frontend
    admin: Admin
    autoscaler: Autoscaler
    loop_lag: LoopLag


def build_status(config: Config, fleet: Fleet, routers: Mapping[str, Router],
                 parts: Parts) -> dict[str, Any]:
    now = time.monotonic()
    return {
        "controller": _controller(config, fleet, routers, parts, now),
        "deployments": [_deployment(fleet, name, routers[name], parts.autoscaler, now)
                        for name in fleet.deployments],
        "worlds": [_world(w, routers[w.deployment], now)
                   for w in sorted(fleet.worlds.values(), key=lambda w: w.id)],
        "workers": [_worker(w, now)
                    for w in sorted(fleet.workers.values(), key=_worker_sort_key)],
        "routes": [_route(route, routers) for route in fleet.routes],
        "events": list(fleet.events),
    }


def _route(route: RouteConfig, routers: Mapping[str, Router]) -> dict[str, Any]:
    """A route: its weights, and the split observed since it was applied."""
    picker = getattr(routers, "routes", {}).get(route.name)
    sent = dict(picker.sent) if picker is not None else dict.fromkeys(route.to, 0)
    total = sum(sent.values())
    return {"name": route.name, "to": dict(route.to), "sent": sent,
            "observed": {name: round(n / total, 4) if total else 0.0
                         for name, n in sent.items()}}


def _deployment(fleet: Fleet, name: str, router: Router, autoscaler: Autoscaler,
                now: float) -> dict[str, Any]:
    dep = fleet.deployments[name]
    summary = router.stats.summary(now)
    out = {
        "name": name,
        "model": dep.config.model,
        "stages": dep.config.stages,
        "worlds_current": fleet.serving(name),
        "worlds_desired": dep.desired,
        "min_worlds": dep.min_worlds,
        "max_worlds": dep.max_worlds,
        "slo_p99_ms": dep.slo_p99_ms,
        "p50_ms": round(summary.p50_ms, 3),
        "p95_ms": round(summary.p95_ms, 3),
        "p99_ms": round(summary.p99_ms, 3),
        "max_ms": round(summary.max_ms, 3),
        "rps": round(summary.rps, 2),
        "queued": router.queued,
        "in_flight": router.in_flight,
        "answered_ok": router.stats.total_ok,
        "errors": dict(router.stats.errors),
        "resent": router.resent,
        "late_replies": router.late_replies,
        # Replies a world sent that no client could read (the world was broken for it).
        "bad_replies": router.bad_replies,
        # The service rate measured while saturated (deadline-aware admission; 0: none).
        "service_rps": round(router.capacity.rps, 1),
        "max_batch_size": dep.config.max_batch_size,
        "inputs": dep.inputs,
        "last_error": dep.last_error,
        "quarantined": dep.quarantined,
        # Why no world can serve it now ("" when one can): requests get Unavailable.
        "unavailable": router.unavailable,
        "last_decision": autoscaler.last[name].to_dict() if name in autoscaler.last else None,
        "autoscaler": autoscaler.reason.get(name, ""),
        "stage_workers": _stage_workers(fleet, name, dep.config.stages),
        # How rank 0 cut the model into stages: each stage's children and measured ms.
        "split": stage_split(fleet, name),
        "formation_failures": dep.failures,
        # Its spec's revision (one more with every applied change) and hash; the rollout in
        # progress, or the last one; applied away and draining.
        "revision": dep.revision,
        "spec_hash": dep.spec_hash,
        "rollout": dep.rollout.to_dict() if dep.rollout is not None else None,
        "removing": dep.removing,
    }
    if router.generative:
        out["generation"] = generation(fleet, name, router, now)
    return out


def _world(world: WorldInfo, router: Router, now: float) -> dict[str, Any]:
    route = router.worlds.get(world.id)
    return {
        "id": world.id,
        "deployment": world.deployment,
        "epoch": world.epoch,
        "state": world.state,
        "workers": list(world.workers),
        "ranks": [{"rank": r, "stage": r, "worker": w} for r, w in enumerate(world.workers)],
        "in_flight": len(route.inflight) if route is not None else 0,
        "served": route.served if route is not None else 0,
        "age_s": round(now - world.created_s, 3),
        "load_ms": round(world.load_ms, 1),
        "form_ms": round(world.form_ms, 1),
        # Times its joins were sent again to members that had not answered (forming).
        "join_resends": world.join_resends,
        "backend": world.backend,
        "revision": world.revision,  # of its deployment's spec
    }


def _worker(worker: WorkerInfo, now: float) -> dict[str, Any]:
    hb = worker.heartbeat
    return {
        "id": worker.id,
        "pid": worker.pid,
        "host": worker.host,
        # The address it advertises (its rendezvous store and gloo listen there).
        "address": worker.store_addr.rpartition(":")[0],
        "device": worker.device,
        "state": worker.state,
        "worlds": sorted(worker.worlds),
        "reason": worker.reason,
        "quarantined": worker.quarantined,  # why it is given no world ("" if it is)
        "batches": hb.batches if hb else 0,
        "rows": hb.rows if hb else 0,
        "requests": hb.requests if hb else 0,
        "busy_s": round(hb.busy_s, 6) if hb else 0.0,
        "stages_loaded": hb.stages if hb else 0,
        "stages_idle": hb.idle_stages if hb else 0,
        "stage_bytes": hb.stage_bytes if hb else 0,
        "heartbeat_age_ms": round((now - worker.heartbeat_s) * 1000.0, 1)
        if worker.heartbeat_s else None,
    }


def _controller(config: Config, fleet: Fleet, routers: Mapping[str, Router], parts: Parts,
                now: float) -> dict[str, Any]:
    c = config.controller
    frontend, backend = parts.frontend, parts.backend
    return {
        "pid": os.getpid(), "uptime_s": round(now - parts.started_s, 3),
        "incarnation": frontend.incarnation,
        "launcher_quarantined": fleet.spawn_quarantined,
        # Time the controller's loop was stalled (not listening) and its longest stall:
        # silence in that time is never blamed on a worker.
        "loop_stalled_s": round(parts.loop_lag.total_s, 3),
        "loop_stall_max_s": round(parts.loop_lag.max_s, 3),
        # What the local launcher's host can compute at once ({}: no launcher).
        "host": parts.launcher.host(),
        # Worker-port messages dropped: control maps that did not decode or type-check, and
        # data-path frames for no known world.
        "worker_messages_rejected": backend.rejected,
        "unroutable_replies": backend.unroutable,
        # Replies from a socket that is not a member of the world they name.
        "foreign_replies": sum(r.foreign_replies for r in routers.values()),
        # Control messages about a world from a worker not in it (dropped).
        "foreign_messages": fleet.foreign_messages,
        # Since the start: deaths of workers that were not retiring, and world breaks (both
        # drive the churn alert).
        "workers_died": fleet.workers_died,
        "worlds_broken": fleet.worlds_broken,
        # Requests the frontend refused before any deployment saw them.
        "requests_rejected": dict(frontend.rejected_by_code),
        # Answers dropped for clients gone, or not reading (a full send queue).
        "answers_dropped": frontend.pump.dropped,
        # Client connections open now, and the ones closed over the cap.
        "client_connections": frontend.connections.open,
        "client_connections_refused": frontend.connections.refused,
        # With CURVE: messages dropped, per port, because the key of the connection they
        # came on was revoked after it connected.
        "revoked_messages": {"client": frontend.pump.refused, "worker": backend.pump.refused,
                             "admin": parts.admin.pump.refused},
        # The cyclic collector in this process (mesh.gc_policy).
        "gc": gc_policy.stats(),
        "client_endpoint": c.client_endpoint,
        "admin_endpoint": c.admin_endpoint,
        "worker_endpoint": c.worker_endpoint,
    }


def generation(fleet: Fleet, name: str, router: Router, now: float) -> dict[str, Any]:
    """A generative deployment's sequences and KV cache, summed over its serving worlds from
    their workers' last heartbeats (rank 0: sequences running, waiting, preemptions; every
    stage: KV bytes in use and budget), and its token-level latencies from the router."""
    totals = {"running": 0, "waiting": 0, "kv_used_bytes": 0, "kv_budget_bytes": 0,
              "preemptions": 0, "generated": 0}
    for world in fleet.worlds.values():
        if world.deployment != name or world.state != WorldState.SERVING:
            continue
        for rank, wid in enumerate(world.workers):
            worker = fleet.workers.get(wid)
            hb = worker.heartbeat if worker is not None else None
            entry = next((g for g in hb.gen if g.world_id == world.id), None) if hb else None
            if entry is None:
                continue
            totals["kv_used_bytes"] += entry.kv_used_bytes
            totals["kv_budget_bytes"] += entry.kv_budget_bytes
            if rank == 0:
                totals["running"] += entry.running
                totals["waiting"] += entry.waiting
                totals["preemptions"] += entry.preemptions
                totals["generated"] += entry.generated
    summary = router.gen.summary(now)
    return {**totals, "ttft_p50_ms": round(summary.ttft_p50_ms, 3),
            "ttft_p99_ms": round(summary.ttft_p99_ms, 3),
            "tpot_p50_ms": round(summary.tpot_p50_ms, 3),
            "tpot_p99_ms": round(summary.tpot_p99_ms, 3),
            "tokens_per_s": round(summary.tokens_per_s, 1),
            "tokens_delivered": router.gen.tokens_total,
            "slo_ttft_p99_ms": router.deployment.slo_ttft_p99_ms,
            "slo_tpot_p50_ms": router.deployment.slo_tpot_p50_ms}


def _stage_workers(fleet: Fleet, name: str, stages: int) -> list[int]:
    """Distinct workers serving each stage of a deployment (shared workers count once)."""
    per_stage: list[set[str]] = [set() for _ in range(stages)]
    for world in fleet.worlds.values():
        if world.deployment == name and world.state == WorldState.SERVING:
            for rank, wid in enumerate(world.workers[:stages]):
                per_stage[rank].add(wid)
    return [len(s) for s in per_stage]


def _worker_sort_key(worker: WorkerInfo) -> tuple[int, str]:
    digits = "".join(ch for ch in worker.id if ch.isdigit())
    return (int(digits) if digits and worker.id.startswith("w") else 1 << 30, worker.id)
