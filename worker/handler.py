"""The handler interface: what a worker runs for one deployment.

The simplest model is a factory returning a ``torch.nn.Module``; the loader wraps it in a
``TensorHandler`` (requests carry ``x``, batched along dim 0; responses carry ``y``). Models
that need more (several inputs, tokenizers, generation) implement ``Handler`` directly and
return an instance from their factory:

    class MyHandler(Handler):
        def validate(self, inputs, params) -> int: ...        # raise BadRequest; return rows
        def run_batch(self, batch) -> list[dict]: ...           # one output dict per request
        def input_spec(self) -> dict: ...                       # for status and meshctl bench

``validate`` runs for each request as it arrives, so one bad request is answered with
BadRequest alone and never poisons a batch. Both ``validate`` and ``run_batch`` run on the
worker's data-plane thread, off the event loop that keeps heartbeats flowing; ``run_batch``
gets the requests the batcher grouped together.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

from mesh.errors import BadRequest


@dataclass(slots=True)
class Request:
    """One request as a handler sees it."""

    inputs: dict[str, Any]
    params: dict[str, Any]
    rows: int


class Handler(abc.ABC):
    """A deployment's serving logic on one worker."""

    def setup(self, *, checkpoint: str, device: str) -> None:  # noqa: B027 - optional hook
        """Load weights and move to the device; called once, off the event loop."""

    @abc.abstractmethod
    def validate(self, inputs: dict[str, Any], params: dict[str, Any]) -> int:
        """Check one request; return its size in batch rows, or raise BadRequest."""

    @abc.abstractmethod
    def run_batch(self, batch: list[Request]) -> list[dict[str, Any]]:
        """Compute a batch; return one dict of named outputs per request, in order."""

    def input_spec(self) -> dict[str, Any]:
        """Describe the inputs, e.g. {"x": {"dtype": "float32", "shape": [1, 64]}}."""
        return {}


def _torch_dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


class TensorHandler(Handler):
    """Serves an ``nn.Module`` as ``{"x": tensor [B, ...]} -> {"y": tensor [B, ...]}``."""

    def __init__(self, module: Any, *, feature_shape: tuple[int, ...] | None = None) -> None:
        import torch

        self._torch = torch
        self.module = module
        self.device = "cpu"
        params = list(module.parameters())
        self.dtype = params[0].dtype if params else torch.float32
        self.feature_shape = feature_shape if feature_shape is not None else _infer_features(module)

    def setup(self, *, checkpoint: str, device: str) -> None:
        torch = self._torch
        if checkpoint:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            self.module.load_state_dict(state)
        self.device = device
        self.module.to(device).eval()

    def input_spec(self) -> dict[str, Any]:
        shape = [1, *self.feature_shape] if self.feature_shape is not None else [1]
        return {"x": {"dtype": _torch_dtype_name(self.dtype), "shape": shape}}

    def validate(self, inputs: dict[str, Any], params: dict[str, Any]) -> int:
        torch = self._torch
        if set(inputs) != {"x"}:
            raise BadRequest(f"inputs must be exactly {{'x'}}, got {sorted(inputs)}")
        x = inputs["x"]
        if not isinstance(x, torch.Tensor):
            raise BadRequest(f"input 'x' must be a tensor, got {type(x).__name__}")
        if x.dtype != self.dtype:
            raise BadRequest(f"input 'x' must be {_torch_dtype_name(self.dtype)}, got "
                             f"{_torch_dtype_name(x.dtype)}")
        if x.dim() < 1:
            raise BadRequest("input 'x' must have a batch dimension")
        if self.feature_shape is not None and tuple(x.shape[1:]) != self.feature_shape:
            want = ["B", *self.feature_shape]
            raise BadRequest(f"input 'x' must have shape {want}, got {list(x.shape)}")
        return int(x.shape[0])

    def run_batch(self, batch: list[Request]) -> list[dict[str, Any]]:
        torch = self._torch
        xs = [r.inputs["x"] for r in batch]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        if self.device != "cpu":
            x = x.to(self.device, non_blocking=True)
        with torch.inference_mode():
            y = self.module(x)
        if self.device != "cpu":
            y = y.cpu()
        out = []
        start = 0
        for r in batch:
            out.append({"y": y[start : start + r.rows]})
            start += r.rows
        return out


def _infer_features(module: Any) -> tuple[int, ...] | None:
    """The per-row input shape, from an explicit attribute or the first Linear layer."""
    import torch

    shape = getattr(module, "input_shape", None)
    if shape is not None:
        return tuple(shape)
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            return (m.in_features,)
        if isinstance(m, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Embedding):
            return None
    return None
