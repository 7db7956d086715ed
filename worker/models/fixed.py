"""A model with a fixed service time per batch (sleeps, burns no CPU): ``y = x * scale``.

For tests and autoscaling experiments that need a known, load-independent service rate on a
small machine: each batch takes ``batch_ms`` plus ``row_ms`` per row, whatever the CPU is doing.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from mesh.errors import BadRequest
from worker.handler import Handler, Request


class FixedTimeHandler(Handler):
    def __init__(self, batch_ms: float, row_ms: float, features: int, scale: float) -> None:
        self.batch_s = batch_ms / 1000.0
        self.row_s = row_ms / 1000.0
        self.features = features
        self.scale = scale

    def validate(self, inputs: dict[str, Any], params: dict[str, Any], kind: str = "infer") -> int:
        if kind != "infer":
            raise BadRequest("this model answers 'infer' requests only")
        x = inputs.get("x")
        if set(inputs) != {"x"} or x is None or not hasattr(x, "shape"):
            raise BadRequest("inputs must be exactly {'x': tensor [B, features]}")
        if str(x.dtype).removeprefix("torch.") != "float32":
            raise BadRequest(f"input 'x' must be float32, got {x.dtype}")
        if x.dim() != 2 or x.shape[1] != self.features:
            raise BadRequest(f"input 'x' must have shape [B, {self.features}], got {list(x.shape)}")
        return int(x.shape[0])

    def run_batch(self, batch: list[Request]) -> list[dict[str, Any]]:
        rows = sum(r.rows for r in batch)
        time.sleep(self.batch_s + self.row_s * rows)
        return [{"y": r.inputs["x"] * self.scale} for r in batch]

    def input_spec(self) -> dict[str, Any]:
        return {"x": {"dtype": "float32", "shape": [1, self.features]}}


def build(batch_ms: float = 20.0, row_ms: float = 0.0, features: int = 4,
          scale: float = 2.0) -> FixedTimeHandler:
    return FixedTimeHandler(batch_ms, row_ms, features, scale)


def reference(x: np.ndarray, scale: float = 2.0) -> np.ndarray:
    return x * scale


def build_pipeline(stage_ms: list[float] | None = None, features: int = 4) -> Any:
    """An ``nn.Sequential`` of sleeping stages, e.g. stage 1 twice as slow as stage 0.

    Splits into ``len(stage_ms)`` stages (one child each); ``y = x``.
    """
    import torch

    class Sleep(torch.nn.Module):
        def __init__(self, ms: float) -> None:
            super().__init__()
            self.seconds = ms / 1000.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(self.seconds)
            return x

    model = torch.nn.Sequential(*[Sleep(ms) for ms in (stage_ms or [5.0, 10.0])])
    model.input_shape = (features,)  # type: ignore[assignment]
    return model
