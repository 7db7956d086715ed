"""KServe v2 (the Open Inference Protocol, REST) to meshserve and back, with Triton's binary
tensor data extension.

An infer request names each input's ``datatype`` and ``shape`` and carries its elements in
``data`` (flat or nested, row-major) or, with the extension, as raw little-endian bytes after
the JSON: the header ``Inference-Header-Content-Length`` says where the JSON ends, and each
binary input's ``parameters.binary_data_size`` its length, in order. ``BYTES`` elements are
strings: in binary, each a 4-byte little-endian length and its bytes. A ``BYTES`` input of one
element reaches the model as that string (``{"prompt": "hello"}``), more as a nested list.

The answer lists the model's outputs (or those the request names in ``outputs``) as JSON, or
in binary where an output asks ``parameters.binary_data`` or the request
``parameters.binary_data_output``. A request's other ``parameters`` go to the model as its
``params``; ``timeout`` (microseconds, as Triton's clients send it) is its deadline.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from mesh.gateway.http import HttpError

# KServe datatype -> numpy dtype (BYTES: strings)
DATATYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16,
    "INT32": np.int32, "INT64": np.int64, "FP16": np.float16, "FP32": np.float32,
    "FP64": np.float64, "BYTES": None,
}
_BY_NUMPY = {np.dtype(v).name: k for k, v in DATATYPES.items() if v is not None}
# meshserve dtype names (describe's) -> KServe datatype
FROM_MESH = {"bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "int16": "INT16",
             "int32": "INT32", "int64": "INT64", "float16": "FP16", "float32": "FP32",
             "float64": "FP64", "bfloat16": "BF16", "str": "BYTES"}
# Request parameters that are the protocol's, not the model's.
RESERVED = frozenset({"binary_data_output", "timeout", "priority", "sequence_id",
                      "sequence_start", "sequence_end"})
HEADER_LENGTH = "inference-header-content-length"
# msgspec's JSON, several times json's speed on the numbers lists tensors are made of.
_decode_json = msgspec.json.Decoder().decode
_encode_json = msgspec.json.Encoder().encode


@dataclass(slots=True)
class InferRequest:
    inputs: dict[str, Any]
    params: dict[str, Any]
    id: str = ""
    timeout_s: float | None = None
    outputs: dict[str, bool] = field(default_factory=dict)  # name -> binary
    binary_default: bool = False


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in value):
        raise HttpError(400, f"input {name!r}: shape must be a list of non-negative integers")
    return tuple(value)


def parse_infer(body: bytes, header_length: str | None) -> InferRequest:
    """An infer request's JSON (and binary tensors), checked; HttpError 400 says what is
    wrong, naming the input and never echoing its data."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise HttpError(400, f"{HEADER_LENGTH} must be a length within the body")
        split = int(header_length)
        head, binary = body[:split], memoryview(body)[split:]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = _decode_json(head)
    except (msgspec.DecodeError, ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"the request is not JSON: {str(exc)[:80]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise HttpError(400, "the request must be an object with an 'inputs' list")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise HttpError(400, "'parameters' must be an object")
    request = InferRequest({}, {k: v for k, v in params.items() if k not in RESERVED},
                           id=str(doc.get("id", ""))[:256],
                           binary_default=params.get("binary_data_output") is True)
    timeout = params.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise HttpError(400, "parameters.timeout must be a positive number of microseconds")
        request.timeout_s = timeout / 1e6
    at = 0
    for item in doc["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise HttpError(400, "each input must be an object with a 'name'")
        name = item["name"]
        if name in request.inputs:
            raise HttpError(400, f"input {name!r} is given twice")
        datatype = item.get("datatype")
        if datatype not in DATATYPES:
            raise HttpError(400, f"input {name!r}: datatype {str(datatype)[:20]!r} is not one of "
                                 f"{sorted(DATATYPES)}")
        shape = _shape(item.get("shape"), name)
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or \
                    at + size > len(binary):
                raise HttpError(400, f"input {name!r}: binary_data_size does not fit the body")
            request.inputs[name] = _from_binary(name, datatype, shape, binary[at:at + size])
            at += size
        elif "data" in item:
            request.inputs[name] = _from_json(name, datatype, shape, item["data"])
        else:
            raise HttpError(400, f"input {name!r} has neither 'data' nor binary data")
    if at != len(binary):
        raise HttpError(400, f"{len(binary) - at} bytes of binary data belong to no input")
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(
                isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
            raise HttpError(400, "'outputs' must be a list of objects with a 'name'")
        for o in outputs:
            wants = (o.get("parameters") or {}).get("binary_data")
            request.outputs[o["name"]] = request.binary_default if wants is None else wants is True
    return request


def _count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> Any:
    if datatype == "BYTES":
        flat = np.asarray(data, dtype=object).reshape(-1).tolist() if isinstance(data, list) \
            else [data]
        if len(flat) != _count(shape) or not all(isinstance(s, str) for s in flat):
            raise HttpError(400, f"input {name!r}: expected {_count(shape)} strings for shape "
                                 f"{list(shape)}")
        return _strings(flat, shape)
    try:
        array = np.asarray(data, dtype=DATATYPES[datatype])
    except (ValueError, TypeError, OverflowError):
        raise HttpError(400, f"input {name!r}: data is not {datatype}") from None
    if array.size != _count(shape):
        raise HttpError(400, f"input {name!r}: {array.size} elements for shape {list(shape)}")
    return array.reshape(shape)


def _from_binary(name: str, datatype: str, shape: tuple[int, ...], raw: memoryview) -> Any:
    if datatype == "BYTES":
        strings, at = [], 0
        while at < len(raw):
            if at + 4 > len(raw):
                raise HttpError(400, f"input {name!r}: truncated BYTES element")
            (n,) = struct.unpack_from("<I", raw, at)
            if at + 4 + n > len(raw):
                raise HttpError(400, f"input {name!r}: truncated BYTES element")
            strings.append(bytes(raw[at + 4:at + 4 + n]).decode("utf-8", "replace"))
            at += 4 + n
        if len(strings) != _count(shape):
            raise HttpError(400, f"input {name!r}: {len(strings)} strings for shape "
                                 f"{list(shape)}")
        return _strings(strings, shape)
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    if len(raw) != _count(shape) * dtype.itemsize:
        raise HttpError(400, f"input {name!r}: {len(raw)} bytes for {datatype} "
                             f"{list(shape)} ({_count(shape) * dtype.itemsize} expected)")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _strings(flat: list[str], shape: tuple[int, ...]) -> Any:
    if len(flat) == 1:
        return flat[0]
    return np.asarray(flat, dtype=object).reshape(shape).tolist()


def encode_outputs(model: str, request: InferRequest, outputs: dict[str, Any]
                   ) -> tuple[bytes, dict[str, str]]:
    """The answer's body (JSON, then binary outputs) and headers."""
    names = list(request.outputs) or sorted(outputs)
    missing = [n for n in names if n not in outputs]
    if missing:
        raise HttpError(400, f"output {missing[0]!r} is not one of {sorted(outputs)}")
    listed, binary = [], []
    for name in names:
        value = outputs[name]
        entry, raw = _output(name, value)
        if request.outputs.get(name, request.binary_default):
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary.append(raw)
        else:
            entry["data"] = _json_data(value)
        listed.append(entry)
    doc: dict[str, Any] = {"model_name": model, "outputs": listed}
    if request.id:
        doc["id"] = request.id
    head = _encode_json(doc)
    if not binary:
        return head, {}
    return head + b"".join(binary), {HEADER_LENGTH: str(len(head))}


def _output(name: str, value: Any) -> tuple[dict[str, Any], bytes]:
    if isinstance(value, np.ndarray) and value.dtype.name in _BY_NUMPY:
        return ({"name": name, "datatype": _BY_NUMPY[value.dtype.name],
                 "shape": list(value.shape)},
                np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes())
    strings = value if isinstance(value, list) else [value]
    flat = [s if isinstance(s, str) else json.dumps(s) for s in _flatten(strings)]
    shape = [len(flat)] if not isinstance(value, list) else list(np.asarray(value,
                                                                            dtype=object).shape)
    raw = b"".join(struct.pack("<I", len(b)) + b for b in (s.encode() for s in flat))
    return {"name": name, "datatype": "BYTES", "shape": shape}, raw


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [x for v in value for x in _flatten(v)]
    return [value]


def _json_data(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.reshape(-1).tolist()
    return [s if isinstance(s, str) else json.dumps(s) for s in _flatten(
        value if isinstance(value, list) else [value])]


def model_metadata(model: dict[str, Any]) -> dict[str, Any]:
    """A model's KServe metadata, from meshserve's ``describe`` entry."""

    def tensors(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"name": t["name"], "datatype": FROM_MESH.get(t.get("datatype", ""), "BYTES"),
                 "shape": t.get("shape") or [1]} for t in items]

    return {"name": model["name"], "versions": ["1"], "platform": "meshserve",
            "inputs": tensors(model.get("inputs", [])),
            "outputs": tensors(model.get("outputs", []))}
