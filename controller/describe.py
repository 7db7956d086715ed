"""What a client is told by ``describe``: each deployment's inputs, outputs, parameters and
whether it streams, in the shape of KServe v2's model metadata (``name``, ``inputs`` and
``outputs`` as ``{name, datatype, shape}`` with -1 for the batch dimension), plus
``parameters``, ``streaming``, ``stages``, ``ready`` and, for a module cut into stages,
``split``. Pure: from what the handlers sent with their joins (controller/records.py
``DeploymentState.description``, and each world's ``split`` from its rank 0)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from controller.records import WorldState

if TYPE_CHECKING:
    from controller.fleet import Fleet


def tensor_list(spec: dict[str, Any], *, batched: bool) -> list[dict[str, Any]]:
    """A handler's spec ({name: {"dtype", "shape", ...}}) as a sorted list of
    {"name", "datatype", "shape", ...}; a batched tensor's first dimension becomes -1."""
    out = []
    for name, desc in sorted(spec.items()):
        desc = dict(desc) if isinstance(desc, dict) else {}
        shape = list(desc.pop("shape", []) or [])
        if batched and shape and desc.get("dtype", "") != "str":
            shape[0] = -1
        out.append({"name": name, "datatype": desc.pop("dtype", "any"), "shape": shape,
                    **desc})
    return out


def stage_split(fleet: Fleet, name: str) -> dict[str, Any] | None:
    """How rank 0 cut deployment ``name``'s model into stages (each stage's children and
    measured cost), as its newest serving world was cut: in a rollout, the old spec's until a
    world of the new one serves, and never a world's that failed to form. None: no world
    serves, one stage, or a handler that cuts itself."""
    worlds = [w for w in fleet.worlds.values() if w.deployment == name
              and w.state == WorldState.SERVING and isinstance(w.split, dict)
              and len(w.split.get("stages") or []) == len(w.workers)]
    return max(worlds, key=lambda w: w.id).split if worlds else None


def model_metadata(name: str, description: dict[str, Any], *, stages: int,
                   ready: bool, split: dict[str, Any] | None = None) -> dict[str, Any]:
    out = {
        "name": name,
        "ready": ready,
        "stages": stages,
        "streaming": bool(description.get("streaming", False)),
        "inputs": tensor_list(description.get("inputs") or {}, batched=True),
        "outputs": tensor_list(description.get("outputs") or {}, batched=True),
        "parameters": dict(description.get("parameters") or {}),
        # Known once a world has formed (its handlers say); empty before.
        "described": bool(description),
    }
    if split is not None:
        out["split"] = split
    if description.get("generative"):
        # A generative model: the context a prompt and its answer share, the token ids a
        # stream's chunks carry and a resume may name.
        out["generative"] = True
        out["max_context"] = description.get("max_context", 0)
        out["vocab_size"] = description.get("vocab_size", 0)
    return out


def describe_fleet(fleet: Fleet) -> list[dict[str, Any]]:
    """Every deployment's metadata, and every route's, for a client's ``describe``. A route
    answers with its first deployment's description (its deployments serve the same
    contract), its weights, and ready when any of them serves."""
    serving = {w.deployment for w in fleet.worlds.values() if w.state == WorldState.SERVING}
    deployments = {name: dep for name, dep in fleet.deployments.items() if not dep.removing}
    out = [model_metadata(name, dep.description, stages=dep.config.stages,
                          ready=name in serving, split=stage_split(fleet, name))
           for name, dep in deployments.items()]
    for route in fleet.routes:
        first_name = next(iter(route.to))
        first = deployments.get(first_name)
        if first is None:
            continue
        entry = model_metadata(route.name, first.description, stages=first.config.stages,
                               ready=any(name in serving for name in route.to),
                               split=stage_split(fleet, first_name))
        out.append({**entry, "route": {"to": dict(route.to)}})
    return out
