"""The handler interface: what a worker runs for one deployment (and one pipeline stage).

The simplest model is a factory returning a ``torch.nn.Module``; the loader wraps it in a
``TensorHandler`` (requests carry ``x``, batched along dim 0; responses carry ``y``). A
``torch.nn.Sequential`` also splits into pipeline stages along its children.

Models that need more (several inputs, tokenizers, generation) subclass ``Handler`` and return
an instance from their factory. The hooks, and where they run:

    validate(inputs, params, kind) -> rows    stage 0, per request as it arrives: raise
                                              BadRequest to refuse it (alone; it never joins
                                              a batch)
    collate(batch) -> tensors                 stage 0: a batch of requests -> named tensors
    forward(tensors) -> tensors               every stage: this stage's part of the model
    split(tensors, batch) -> [outputs]        last stage: one dict of named outputs per request
    run_batch(batch) -> [outputs]             one-stage worlds: split(forward(collate(batch)))

Generative models (text in, tokens out, streamed) subclass ``worker.generative.
GenerativeHandler`` instead: the engine batches their sequences step by step with a KV cache
(worker.gen_stage), and the handler computes one packed micro-batch at a time.

All hooks run on the worker's data-plane (or stage) thread, off the event loop that keeps
heartbeats flowing.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mesh.errors import BadRequest

if TYPE_CHECKING:
    from worker.splits import Split


@dataclass(slots=True)
class Request:
    """One request as a handler sees it."""

    inputs: dict[str, Any]
    params: dict[str, Any]
    rows: int
    kind: str = "infer"


class Handler(abc.ABC):
    """A deployment's serving logic on one worker, for one stage."""

    streaming = False
    stage = 0
    stages = 1
    # How a pipeline model was cut into stages, when the loader cut it (worker/splits.py).
    pipeline_split: Split | None = None

    def setup(self, *, checkpoint: str, device: str, stage: int = 0,  # noqa: B027
              stages: int = 1, split_points: list[int] | None = None) -> None:
        """Load weights (this stage's only) and move to the device; runs once, off the loop.

        Optional: a handler that builds everything in its constructor needs no setup.
        """

    @abc.abstractmethod
    def validate(self, inputs: dict[str, Any], params: dict[str, Any], kind: str = "infer") -> int:
        """Check one request; return its size in batch rows, or raise BadRequest."""

    def collate(self, batch: list[Request]) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} cannot run in a pipeline")

    def forward(self, tensors: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} cannot run in a pipeline")

    def split(self, tensors: dict[str, Any], batch: list[Request]) -> list[dict[str, Any]]:
        raise NotImplementedError(f"{type(self).__name__} cannot run in a pipeline")

    def run_batch(self, batch: list[Request]) -> list[dict[str, Any]]:
        """Compute a batch in one stage; one dict of named outputs per request, in order."""
        return self.split(self.forward(self.collate(batch)), batch)

    def input_spec(self) -> dict[str, Any]:
        """Describe the inputs, e.g. {"x": {"dtype": "float32", "shape": [1, 64]}} (a tensor,
        one row), or {"prompt": {"dtype": "str", "shape": [], "example": "hello"}}."""
        return {}

    def output_spec(self) -> dict[str, Any]:
        """Describe the outputs (of one request), in the form of ``input_spec``."""
        return {}

    def param_spec(self) -> dict[str, Any]:
        """Describe ``params``: name -> {"type", "min", "max", "default", ...}."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What this stage takes and gives, sent with every join: the controller answers a
        client's ``describe`` with rank 0's inputs, parameters and streaming and the last
        rank's outputs."""
        out = {"inputs": self.input_spec(), "outputs": self.output_spec(),
               "parameters": self.param_spec(), "streaming": self.streaming}
        if self.pipeline_split is not None:
            out["split"] = self.pipeline_split.describe()  # each stage: children, cost
        return out

    def stage_bytes(self) -> int:
        """Bytes this stage holds on its device: by default the parameters and buffers of
        every ``nn.Module`` among the handler's attributes (and in lists, tuples and dicts of
        them), and its tensor attributes, each storage counted once (tied weights share
        one). Measured once, when the stage loads, for ``max_stage_bytes``."""
        return held_bytes(getattr(self, "__dict__", {}).values())


def held_bytes(values: Any) -> int:
    """The bytes of the distinct tensor storages in ``values``: tensors, modules (their
    parameters and buffers), and lists, tuples and dicts of them, one level deep."""
    import torch

    seen: set[tuple[str, int]] = set()
    total = 0

    def count(tensor: Any) -> None:
        nonlocal total
        try:
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            size = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # no storage of its own (meta, sparse)
            key, size = ("", id(tensor)), tensor.numel() * tensor.element_size()
        if key not in seen:
            seen.add(key)
            total += size

    def visit(value: Any) -> None:
        if isinstance(value, torch.nn.Module):
            for tensor in (*value.parameters(), *value.buffers()):
                count(tensor)
        elif isinstance(value, torch.Tensor):
            count(value)

    for value in values:
        if isinstance(value, list | tuple):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        else:
            visit(value)
    return total


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

    def setup(self, *, checkpoint: str, device: str, stage: int = 0, stages: int = 1,
              split_points: list[int] | None = None) -> None:
        torch = self._torch
        from worker.loader_errors import LoadError
        from worker.stages import load_stage_state, stage_slice

        self.stage, self.stages = stage, stages
        if stages > 1:
            if not isinstance(self.module, torch.nn.Sequential):
                raise LoadError(f"only an nn.Sequential splits into stages, got "
                                f"{type(self.module).__name__}")
            self.module, indices = stage_slice(self.module, stage, stages, split_points)
            if checkpoint:
                load_stage_state(self.module, checkpoint, indices)
        elif checkpoint:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            self.module.load_state_dict(state)
        self.device = device
        self.module.to(device).eval()

    def input_spec(self) -> dict[str, Any]:
        shape = [1, *self.feature_shape] if self.feature_shape is not None else [1]
        return {"x": {"dtype": _torch_dtype_name(self.dtype), "shape": shape}}

    def output_spec(self) -> dict[str, Any]:
        out = _out_features(self.module)
        return {"y": {"dtype": _torch_dtype_name(self.dtype),
                      "shape": [1, out] if out is not None else [1, -1]}}

    def validate(self, inputs: dict[str, Any], params: dict[str, Any], kind: str = "infer") -> int:
        torch = self._torch
        if kind != "infer":
            raise BadRequest("this model answers 'infer' requests only (it does not stream)")
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

    def collate(self, batch: list[Request]) -> dict[str, Any]:
        xs = [r.inputs["x"] for r in batch]
        x = xs[0] if len(xs) == 1 else self._torch.cat(xs)
        if self.device != "cpu":
            x = x.to(self.device, non_blocking=True)
        return {"x": x}

    def forward(self, tensors: dict[str, Any]) -> dict[str, Any]:
        with self._torch.inference_mode():
            return {"x": self.module(tensors["x"])}

    def split(self, tensors: dict[str, Any], batch: list[Request]) -> list[dict[str, Any]]:
        y = tensors["x"]
        if self.device != "cpu":  # not y.device: building a torch.device costs more than this
            y = y.cpu()
        if len(batch) == 1:
            return [{"y": y}]
        out = []
        start = 0
        for r in batch:
            out.append({"y": y[start: start + r.rows]})
            start += r.rows
        return out


def _out_features(module: Any) -> int | None:
    """The width of the last Linear layer's output (a module's output row), if any."""
    import torch

    last = None
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            last = m.out_features
    return last


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
