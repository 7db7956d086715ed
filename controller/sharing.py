"""Worker-granular scaling: which stages a new world of a pipeline shares with its siblings.

The bottleneck is the stage with the highest compute time per request (measured from the
workers' heartbeats). A stage that costs at most 2/3 of the bottleneck, and whose least busy
worker still has headroom, is shared instead of started anew: the new world then adds
processes only for the stages that need them. Nothing is shared while any stage's cost is
unknown, and never every stage (a world of only shared workers adds nothing).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from controller.records import WorkerState
from controller.view import WorkerView, WorldView

MAX_UTIL = 0.85  # a worker busier than this has no room for another world's stage
SHARE_BELOW = 1 / 1.5  # of the bottleneck's cost


def shareable(stages: int, serving: Iterable[WorldView], workers: Mapping[str, WorkerView]
              ) -> tuple[dict[int, str], str]:
    """For each stage to share, the worker that takes the new world's rank; and why (for the
    log). ``serving`` are the deployment's serving worlds."""
    if stages < 2:
        return {}, ""
    by_stage: dict[int, list[WorkerView]] = {}
    for world in serving:
        for rank, wid in enumerate(world.workers):
            worker = workers.get(wid)
            if worker is not None and worker.state == WorkerState.SERVING:
                by_stage.setdefault(rank, []).append(worker)
    costs = {s: min(w.cost_ms for w in ws) for s, ws in by_stage.items() if ws}
    if len(costs) < stages or min(costs.values()) <= 0.0:
        return {}, ""
    worst = max(costs.values())
    shared: dict[int, WorkerView] = {}
    for stage, candidates in by_stage.items():
        best = min(candidates, key=lambda w: w.util)
        if costs[stage] <= worst * SHARE_BELOW and best.util < MAX_UTIL:
            shared[stage] = best
    if len(shared) == stages:  # never a world of only shared workers
        shared.pop(max(shared, key=lambda s: costs[s]))
    why = (f"stage costs { {s: round(c, 1) for s, c in sorted(costs.items())} } ms, "
           f"busiest-stage utilisation "
           f"{ {s: round(max(w.util for w in ws), 2) for s, ws in sorted(by_stage.items())} }"
           f": sharing { {s: w.id for s, w in shared.items()} }")
    return {s: w.id for s, w in shared.items()}, why
