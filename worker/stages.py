"""Partitioning a model into pipeline stages.

An ``nn.Sequential`` splits along its children into ``stages`` contiguous slices: at the
explicit ``split_points`` (the child index where each stage after the first begins) or, by
default here, balanced by parameter count so each stage holds about the same weight. A worker
passes the points it chose by the children's measured time (worker/splits.py); this count is
the fallback, and what a handler that cuts itself gets. A stage keeps only its own children;
from a checkpoint it loads only the keys of those children.
"""

from __future__ import annotations

from typing import Any

from worker.loader_errors import LoadError


def split_points_for(module: Any, stages: int, split_points: list[int] | None = None) -> list[int]:
    """Child indices where stages 1..stages-1 begin (validated)."""
    n = len(module)
    if stages < 1:
        raise LoadError(f"stages must be >= 1, got {stages}")
    if stages > n:
        raise LoadError(f"cannot split {n} children into {stages} stages")
    points: list[int]
    if split_points:
        points = list(split_points)
        if len(points) != stages - 1:
            raise LoadError(f"split_points {points} must name {stages - 1} child indices")
        if points != sorted(set(points)) or points[0] < 1 or points[-1] >= n:
            raise LoadError(f"split_points {points} must increase strictly within 1..{n - 1}")
        return points
    weights = [sum(p.numel() for p in child.parameters()) + 1 for child in module]
    total = sum(weights)
    points = []
    acc = 0
    for i, w in enumerate(weights[:-1]):
        acc += w
        stage_idx = len(points) + 1
        remaining_children = n - (i + 1)
        remaining_stages = stages - stage_idx
        if stage_idx < stages and (acc >= total * stage_idx / stages
                                   or remaining_children == remaining_stages):
            points.append(i + 1)
    while len(points) < stages - 1:  # pathological weights: fill from the end
        points.append(n - (stages - 1 - len(points)))
        points = sorted(set(points))
    return points


def stage_slice(module: Any, stage: int, stages: int,
                split_points: list[int] | None = None) -> tuple[Any, list[int]]:
    """The ``nn.Sequential`` of one stage and the original child indices it holds."""
    import torch

    points = split_points_for(module, stages, split_points)
    bounds = [0, *points, len(module)]
    indices = list(range(bounds[stage], bounds[stage + 1]))
    children = list(module.children())
    part = torch.nn.Sequential()
    for i in indices:
        part.add_module(str(i), children[i])  # keep the original names: checkpoint keys match
    return part, indices


def load_stage_state(part: Any, checkpoint: str, indices: list[int]) -> None:
    """Load only this stage's tensors from a full-model state_dict file."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    wanted = {str(i) for i in indices}
    mine = {k: v for k, v in state.items() if k.split(".", 1)[0] in wanted}
    missing, unexpected = part.load_state_dict(mine, strict=False)
    if missing or unexpected:
        raise LoadError(f"checkpoint does not fit this stage: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
