"""Model loading: import a factory ``package.module:function``, build, cut, load weights.

The factory returns an ``nn.Module`` (wrapped in a TensorHandler) or a ``Handler``. A module
served in several stages is cut where ``split_for`` says (worker/splits.py). The optional
checkpoint is a ``state_dict`` file read with ``torch.load(weights_only=True)``: no pickle code
runs from a checkpoint.
"""

from __future__ import annotations

import importlib
from typing import Any

from mesh.spec import DeploymentSpec
from worker.handler import Handler, TensorHandler
from worker.loader_errors import LoadError
from worker.splits import Split, choose, profile_rows

__all__ = ["LoadError", "build_handler", "load_handler", "resolve_factory", "split_for"]


def resolve_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise LoadError(f"model {spec!r} is not of the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LoadError(f"cannot import {module_name!r}: {exc}") from exc
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise LoadError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(factory):
        raise LoadError(f"{spec!r} is not callable")
    return factory


def build_handler(deployment: DeploymentSpec) -> Handler:
    """Call the deployment's factory: its handler, a module wrapped in a TensorHandler."""
    import torch

    factory = resolve_factory(deployment.model)
    try:
        built = factory(**deployment.factory_kwargs)
    except Exception as exc:
        raise LoadError(
            f"factory {deployment.model!r} raised {type(exc).__name__}: {exc}") from exc
    if isinstance(built, Handler):
        handler = built
    elif isinstance(built, torch.nn.Module):
        handler = TensorHandler(built)
    else:
        raise LoadError(
            f"factory {deployment.model!r} returned {type(built).__name__}; "
            "expected a torch.nn.Module or a worker.handler.Handler"
        )
    if handler.streaming and not getattr(handler, "generative", False):
        raise LoadError(f"{type(handler).__name__} streams but is not a GenerativeHandler: "
                        "streaming models subclass worker.generative.GenerativeHandler "
                        "(docs/models.md)")
    return handler


def split_for(handler: Handler, deployment: DeploymentSpec, device: str,
              stages: int) -> Split | None:
    """How to cut the model of a freshly built ``handler`` into ``stages``: for a module (an
    ``nn.Sequential`` of at least that many children), the configured points, else by the
    measured cost of its children on ``device``, else by parameter count (worker/splits.py).
    None for a handler, which cuts itself, and for a module that cannot be cut (its setup
    says why)."""
    import torch

    module = getattr(handler, "module", None)
    if stages < 2 or not isinstance(handler, TensorHandler) \
            or not isinstance(module, torch.nn.Sequential) or len(module) < stages:
        return None
    micro = deployment.micro_batches or stages
    return choose(module, stages, configured=deployment.split_points,
                  inputs=handler.input_spec(), device=device,
                  rows=profile_rows(deployment.max_batch_size, micro),
                  label=f"{deployment.name} in {stages} stages")


def load_handler(deployment: DeploymentSpec, device: str, *, stage: int = 0,
                 stages: int = 1, split: Split | None = None,
                 built: Handler | None = None) -> Handler:
    """Build the handler of one stage of a deployment and put it on ``device``.

    A module is cut at ``split``'s points when given (and reports it in ``describe``), else
    at the configured ``split_points``, else by parameter count; a handler cuts itself.
    ``built``: the handler the factory already returned (for ``split_for``), used once."""
    handler = built if built is not None else build_handler(deployment)
    points = list(deployment.split_points)
    if split is not None and isinstance(handler, TensorHandler) and stages > 1:
        points = list(split.points)
        handler.pipeline_split = split
    try:
        handler.setup(checkpoint=deployment.checkpoint, device=device, stage=stage,
                      stages=stages, split_points=points)
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(f"loading weights failed: {type(exc).__name__}: {exc}") from exc
    return handler
