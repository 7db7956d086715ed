"""Turning shell arguments into request inputs and outputs into JSON (meshctl infer, bench).

``KEY=JSON`` with a numeric (nested) list becomes a float32 array; ``KEY:DTYPE=JSON`` picks
the dtype (int64, uint8, bool, ...); strings, numbers and other JSON values pass as they are.
``KEY=@FILE`` reads the value from a file instead, where the command line could not hold it (a
3x224x224 image is millions of characters): ``.npy`` (the array as saved, dtype and shape
kept), ``.npz`` (its array named KEY, or its only array), anything else as JSON (as above);
``@-`` reads JSON from stdin (once).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Any

import numpy as np

from mesh.codec import DTYPES
from mesh.errors import BadRequest


def _is_numeric_list(value: Any) -> bool:
    if isinstance(value, list):
        return all(_is_numeric_list(v) for v in value)
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_assignments(items: list[str], stdin: IO[str] | None = None) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    read_stdin = False
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise BadRequest(f"input {item!r} is not KEY=JSON")
        name, _, dtype = key.partition(":")
        if raw.startswith("@"):
            if raw == "@-":
                if read_stdin:
                    raise BadRequest("only one input can come from stdin (@-)")
                read_stdin = True
                raw = (stdin or sys.stdin).read()
            else:
                array = _read_array_file(name, Path(raw[1:]))
                if array is not None:
                    inputs[name] = array if not dtype else _as_dtype(name, dtype, array)
                    continue
                raw = Path(raw[1:]).read_text()
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"input {name!r}: {raw[:40]!r} is not JSON ({exc.msg})") from None
        if dtype:
            value = _as_dtype(name, dtype, value)
        elif isinstance(value, list) and value and _is_numeric_list(value):
            value = np.asarray(value, dtype=np.float32)
        inputs[name] = value
    return inputs


def _as_dtype(name: str, dtype: str, value: Any) -> Any:
    if dtype not in DTYPES or DTYPES[dtype][0] is None:
        raise BadRequest(f"input {name!r}: dtype {dtype!r} is not one of "
                         f"{sorted(k for k, v in DTYPES.items() if v[0] is not None)}")
    return np.asarray(value, dtype=DTYPES[dtype][0])


def _read_array_file(name: str, path: Path) -> Any:
    """The array in a .npy or .npz file (None for any other file: it is JSON)."""
    if path.suffix not in (".npy", ".npz"):
        if not path.is_file():
            raise BadRequest(f"input {name!r}: no file {str(path)!r}")
        return None
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise BadRequest(f"input {name!r}: no file {str(path)!r}") from None
    except (OSError, ValueError) as exc:
        raise BadRequest(f"input {name!r}: {str(path)!r} is not a numpy file ({exc})") from None
    if path.suffix == ".npy":
        return loaded
    with loaded:
        names = list(loaded.files)
        if name in names:
            return loaded[name]
        if len(names) == 1:
            return loaded[names[0]]
    raise BadRequest(f"input {name!r}: {str(path)!r} holds {names}, none named {name!r}")


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
