"""A no-op handler that answers every request with its own inputs.

Used by bench/overhead.py to measure what meshserve itself costs per request: there is no
model, so every microsecond measured is transport, routing and batching.
"""

from __future__ import annotations

from typing import Any

from mesh.errors import BadRequest
from worker.handler import Handler, Request


class EchoHandler(Handler):
    def validate(self, inputs: dict[str, Any], params: dict[str, Any], kind: str = "infer") -> int:
        if kind != "infer":
            raise BadRequest("echo answers 'infer' requests only")
        return 1

    def run_batch(self, batch: list[Request]) -> list[dict[str, Any]]:
        return [r.inputs for r in batch]

    def input_spec(self) -> dict[str, Any]:
        return {"x": {"dtype": "float32", "shape": [1, 4]}}


def build() -> EchoHandler:
    return EchoHandler()
