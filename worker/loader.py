"""Model loading: import a factory ``package.module:function``, build, load weights.

The factory returns an ``nn.Module`` (wrapped in a TensorHandler) or a ``Handler``. The optional
checkpoint is a ``state_dict`` file read with ``torch.load(weights_only=True)``: no pickle code
runs from a checkpoint.
"""

from __future__ import annotations

import importlib
from typing import Any

from mesh.spec import DeploymentSpec
from worker.handler import Handler, TensorHandler
from worker.loader_errors import LoadError

__all__ = ["LoadError", "load_handler", "resolve_factory"]


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


def load_handler(deployment: DeploymentSpec, device: str, *, stage: int = 0,
                 stages: int = 1) -> Handler:
    """Build the handler of one stage of a deployment and put it on ``device``."""
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
    try:
        handler.setup(checkpoint=deployment.checkpoint, device=device, stage=stage,
                      stages=stages, split_points=list(deployment.split_points))
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(f"loading weights failed: {type(exc).__name__}: {exc}") from exc
    return handler
