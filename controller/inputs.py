"""Turning shell arguments into request inputs and outputs into JSON (meshctl infer, bench).

``KEY=JSON`` with a numeric (nested) list becomes a float32 array; ``KEY:DTYPE=JSON`` picks
the dtype (int64, uint8, bool, ...); strings, numbers and other JSON values pass as they are.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from mesh.codec import DTYPES
from mesh.errors import BadRequest


def _is_numeric_list(value: Any) -> bool:
    if isinstance(value, list):
        return all(_is_numeric_list(v) for v in value)
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_assignments(items: list[str]) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise BadRequest(f"input {item!r} is not KEY=JSON")
        name, _, dtype = key.partition(":")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"input {name!r}: {raw[:40]!r} is not JSON ({exc.msg})") from None
        if dtype:
            if dtype not in DTYPES or DTYPES[dtype][0] is None:
                raise BadRequest(f"input {name!r}: dtype {dtype!r} is not one of "
                                 f"{sorted(k for k, v in DTYPES.items() if v[0] is not None)}")
            value = np.asarray(value, dtype=DTYPES[dtype][0])
        elif isinstance(value, list) and value and _is_numeric_list(value):
            value = np.asarray(value, dtype=np.float32)
        inputs[name] = value
    return inputs


def example_inputs(spec: dict[str, Any]) -> dict[str, Any]:
    """Zero inputs shaped as a deployment's input spec (from status ``inputs``)."""
    out: dict[str, Any] = {}
    for name, desc in spec.items():
        if isinstance(desc, dict) and "example" in desc:
            out[name] = desc["example"]
        elif isinstance(desc, dict) and "dtype" in desc:
            np_dtype = DTYPES.get(desc["dtype"], (np.float32, 4))[0] or np.float32
            out[name] = np.zeros(desc.get("shape", [1]), dtype=np_dtype)
    return out


def outputs_to_json(outputs: dict[str, Any]) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return v.astype(np.float64).tolist() if v.dtype.kind == "f" else v.tolist()
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v

    return {k: conv(v) for k, v in outputs.items()}
