"""The msgpack codec: a header frame plus one raw frame per tensor.

A message is a list of ZeroMQ frames. Frame 0 is a msgpack map (the header); every numpy
array or torch tensor found anywhere in the header's values is replaced by a small reference
map ``{"$tensor": [dtype, shape, frame]}`` and its bytes travel as frame ``frame`` on their own.

Why separate frames: a tensor's bytes are never copied into a msgpack buffer, and ZeroMQ can
send them straight from the array's memory (``copy=False``); a controller forwarding a request
relays those frames without ever looking inside them. Non-contiguous tensors are made
contiguous first (the one copy we cannot avoid). No pickle anywhere: dtype and shape are plain
msgpack values, and a frame whose length does not match its reference is rejected.

Decoding yields numpy arrays (what a client wants: no torch import needed) or torch tensors
(what a worker wants), both zero-copy views of the received frames where the frame allows it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np

from mesh.errors import BadRequest, excerpt

TENSOR_KEY = "$tensor"
# Limits checked before anything walks a header from the wire: nesting (the walk recurses, and
# msgpack itself allows 1,024 levels) and a tensor's dimensions.
MAX_DEPTH = 32
MAX_DIMS = 32

# Wire dtype name -> (numpy dtype or None for bf16, itemsize).
DTYPES: dict[str, tuple[Any, int]] = {
    "float32": (np.float32, 4),
    "float64": (np.float64, 8),
    "float16": (np.float16, 2),
    "bfloat16": (None, 2),
    "int64": (np.int64, 8),
    "int32": (np.int32, 4),
    "int16": (np.int16, 2),
    "int8": (np.int8, 1),
    "uint8": (np.uint8, 1),
    "bool": (np.bool_, 1),
}
_NUMPY_NAMES = {np.dtype(v[0]).name: k for k, v in DTYPES.items() if v[0] is not None}
# By dtype object: ``dtype.name`` is computed in Python by numpy (more than the rest of a
# tensor's encoding costs); a dtype hashes in C. Native byte order only: a big-endian dtype
# is not equal to these and takes the name lookup.
_NUMPY_DTYPES = {np.dtype(v[0]): k for k, v in DTYPES.items() if v[0] is not None}

Frame = Any  # bytes, memoryview, or zmq.Frame
TensorDecoder = Callable[[str, tuple[int, ...], Any], Any]


class EncodeError(TypeError):
    """A value cannot be put on the wire (unsupported type or dtype)."""


# Below this, a tensor's bytes are copied out rather than viewed (a flattening reshape and
# numpy's buffer export cost more than copying a few KiB); ZeroMQ copies frames this small on
# sending anyway (mesh.transport.ZERO_COPY_MIN_BYTES). Figures: docs/benchmarks.md.
COPY_OUT_MAX_BYTES = 8 * 1024


def _flat_bytes(arr: np.ndarray) -> bytes | memoryview:
    # Flat bytes: ZeroMQ and every other-language reader want plain bytes.
    if arr.nbytes <= COPY_OUT_MAX_BYTES:
        return arr.tobytes()  # C order, whatever the strides: the caller made it contiguous
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    return memoryview(arr).cast("B")  # type: ignore[arg-type]


def _numpy_ref(arr: np.ndarray, frames: list[Frame]) -> dict[str, Any]:
    name = _NUMPY_DTYPES.get(arr.dtype)
    if name is None:
        name = _NUMPY_NAMES.get(arr.dtype.name)
        if name is None:
            raise EncodeError(
                f"dtype {arr.dtype} cannot travel on the wire; use one of {sorted(DTYPES)}")
        if arr.dtype.byteorder == ">":  # the wire is little-endian
            arr = arr.astype(arr.dtype.newbyteorder("<"))
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    frames.append(_flat_bytes(arr))
    return {TENSOR_KEY: [name, list(arr.shape), len(frames) - 1]}


def _torch_ref(t: Any, frames: list[Frame]) -> dict[str, Any]:
    # The common case (a CPU tensor of a numpy dtype, no autograd, no conj/neg view) is one
    # call: numpy() refuses everything else, which then takes the general path below. On the
    # hot path of a reply every torch call counts, and more so right after a forward pass
    # has pushed this code out of the CPU caches.
    try:
        return _numpy_ref(t.numpy(), frames)
    except (TypeError, RuntimeError):
        pass
    import torch

    if t.requires_grad:
        t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype == torch.bfloat16:
        arr = t.view(torch.int16).numpy()
        frames.append(_flat_bytes(arr))
        return {TENSOR_KEY: ["bfloat16", list(t.shape), len(frames) - 1]}
    try:
        arr = t.numpy()
    except TypeError as exc:
        raise EncodeError(f"dtype {t.dtype} cannot travel on the wire") from exc
    return _numpy_ref(arr, frames)


def encode(header: dict[str, Any]) -> list[Frame]:
    """Encode a header map into frames: the msgpack header first, then one frame per tensor."""
    frames: list[Frame] = [b""]

    def default(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            return _numpy_ref(obj, frames)
        if isinstance(obj, np.generic):
            return obj.item()
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor):
            return _torch_ref(obj, frames)
        if isinstance(obj, tuple):
            return list(obj)
        raise EncodeError(f"cannot encode a value of type {type(obj).__name__}")

    frames[0] = msgpack.packb(header, default=default, use_bin_type=True)
    return frames


def pack(obj: Any) -> bytes:
    """Pack a header with no tensors (control messages)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack_header(data: Any) -> Any:
    """Unpack a header frame, mapping msgpack failures to BadRequest."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise BadRequest(f"header is not valid msgpack: {type(exc).__name__}") from None


def frame_buffer(frame: Frame) -> Any:
    """The buffer behind a frame (zmq.Frame, bytes or memoryview) without copying."""
    if type(frame) is bytes:  # most frames: a failed getattr costs twice the whole check
        return frame
    buf = getattr(frame, "buffer", None)
    return frame if buf is None else buf


def _check_ref(ref: Any, nframes: int) -> tuple[str, tuple[int, ...], int]:
    if type(ref) is not list or len(ref) != 3:
        raise BadRequest(f"{TENSOR_KEY} reference must be [dtype, shape, frame], got "
                         f"{excerpt(ref)}")
    dtype, shape, index = ref
    if type(dtype) is not str or dtype not in DTYPES:
        raise BadRequest(f"unknown dtype {excerpt(dtype)}; expected one of {sorted(DTYPES)}")
    if type(shape) is not list:
        raise BadRequest(f"tensor shape must be a list of non-negative ints, got "
                         f"{excerpt(shape)}")
    if len(shape) > MAX_DIMS:
        raise BadRequest(f"tensor shape has {len(shape)} dimensions; at most {MAX_DIMS}")
    for d in shape:
        if type(d) is not int or d < 0:
            raise BadRequest(f"tensor shape must be a list of non-negative ints, got "
                             f"{excerpt(d)} in it")
    if type(index) is not int or not 1 <= index < nframes:
        raise BadRequest(f"tensor frame index {excerpt(index)} is outside frames "
                         f"1..{nframes - 1}")
    return dtype, tuple(shape), index


def _size_error(index: int, size: int, dtype: str, shape: tuple[int, ...],
                expected: int) -> BadRequest:
    return BadRequest(f"frame {index} holds {size} bytes but dtype {dtype} shape "
                      f"{list(shape)} needs {expected}")


def _decode_simple(obj: dict[Any, Any], frames: Sequence[Frame],
                   decoder: TensorDecoder) -> bool:
    """Every request and answer has one shape: a map of plain values and maps (``inputs``,
    ``outputs``) of plain values and tensor references numbered 1..n in order. Decode that in
    one flat pass (cheaper than the general walk); False, with ``obj``
    untouched, for anything else, which the general walk then takes."""
    nframes = len(frames)
    found: list[tuple[dict[Any, Any], Any, str, tuple[int, ...], int]] = []
    for value in obj.values():
        kind = type(value)
        if kind is list:
            return False
        if kind is dict:
            if TENSOR_KEY in value:
                return False
            for key, v in value.items():
                inner = type(v)
                if inner is list:
                    return False
                if inner is dict:
                    ref = v.get(TENSOR_KEY)
                    if ref is None or len(v) != 1:
                        return False
                    dtype, shape, index = _check_ref(ref, nframes)
                    if index != len(found) + 1:
                        return False
                    found.append((value, key, dtype, shape, index))
    if len(found) != nframes - 1:
        return False
    for container, key, dtype, shape, index in found:
        buf = frame_buffer(frames[index])
        expected = math.prod(shape) * DTYPES[dtype][1]
        if len(buf) != expected:
            raise _size_error(index, len(buf), dtype, shape, expected)
        container[key] = decoder(dtype, shape, buf)
    return True


def decode_tensors(obj: Any, frames: Sequence[Frame], decoder: TensorDecoder) -> Any:
    """Replace every tensor reference inside ``obj`` by ``decoder(dtype, shape, buffer)``."""
    if type(obj) is dict and _decode_simple(obj, frames, decoder):
        return obj
    nframes = len(frames)
    used: set[int] = set()

    def walk(value: Any, depth: int = 1) -> Any:
        if depth > MAX_DEPTH:
            raise BadRequest(f"header is nested deeper than {MAX_DEPTH} levels")
        if type(value) is dict:
            if TENSOR_KEY in value:
                if len(value) != 1:
                    raise BadRequest(f"a {TENSOR_KEY} map must have no other keys")
                dtype, shape, index = _check_ref(value[TENSOR_KEY], nframes)
                if index in used:
                    raise BadRequest(f"frame {index} is referenced twice")
                used.add(index)
                buf = frame_buffer(frames[index])
                expected = math.prod(shape) * DTYPES[dtype][1]
                if len(buf) != expected:
                    raise _size_error(index, len(buf), dtype, shape, expected)
                return decoder(dtype, shape, buf)
            for k, v in value.items():
                if type(v) is dict or type(v) is list:
                    value[k] = walk(v, depth + 1)
            return value
        if type(value) is list:
            for i, v in enumerate(value):
                if type(v) is dict or type(v) is list:
                    value[i] = walk(v, depth + 1)
        return value

    out = walk(obj)
    if len(used) != nframes - 1:
        raise BadRequest(f"message has {nframes - 1} tensor frames but references {len(used)}")
    return out


def to_numpy(dtype: str, shape: tuple[int, ...], buf: Any) -> Any:
    """Decode a tensor frame as a numpy array (bfloat16 needs ml_dtypes, else torch)."""
    np_dtype = DTYPES[dtype][0]
    if np_dtype is None:  # bfloat16
        try:
            import ml_dtypes

            return np.frombuffer(buf, dtype=ml_dtypes.bfloat16).reshape(shape)
        except ImportError:
            return to_torch(dtype, shape, buf)
    return np.frombuffer(buf, dtype=np_dtype).reshape(shape)


_torch: Any = None


def to_torch(dtype: str, shape: tuple[int, ...], buf: Any) -> Any:
    """Decode a tensor frame as a torch tensor, zero-copy when the frame is writable.

    Through numpy: ``np.frombuffer`` and ``torch.from_numpy`` cost a quarter of what
    ``torch.frombuffer`` and a torch reshape do, once per input tensor of every request a
    worker takes (docs/benchmarks.md). A read-only frame (bytes) is copied: a
    model may write to its input in place."""
    global _torch
    torch = _torch
    if torch is None:
        import torch

        _torch = torch
    np_dtype = DTYPES[dtype][0]
    if np_dtype is None:  # bfloat16: no numpy dtype
        tdtype = torch.bfloat16
        if len(buf) == 0:
            return torch.empty(shape, dtype=tdtype)
        mv = memoryview(buf)
        if mv.readonly:
            mv = memoryview(bytearray(mv))
        return torch.frombuffer(mv, dtype=tdtype).reshape(shape)
    arr = np.frombuffer(buf, dtype=np_dtype)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr.reshape(shape))


def decode(frames: Sequence[Frame], decoder: TensorDecoder = to_numpy) -> Any:
    """Decode frames produced by ``encode``: the header with its tensors filled in."""
    if not frames:
        raise BadRequest("message has no frames")
    header = unpack_header(frame_buffer(frames[0]))
    return decode_tensors(header, frames, decoder)


def _ignore(dtype: str, shape: tuple[int, ...], buf: Any) -> None:
    return None


def check_tensor_refs(header: dict[str, Any], inputs: dict[str, Any], frames: Sequence[Frame],
                      first: int) -> None:
    """Validate a request's tensor references against its frames without decoding anything.

    ``frames[first:]`` are the tensor frames (``first`` is where frame index 1 lives). The
    common case (inputs are plain values and tensor references, params hold none) is checked
    in one pass; anything else goes through the general walk.
    """
    ntensors = len(frames) - first
    params = header.get("params")
    if params is None or params == {}:
        seen = 0
        simple = True
        for value in inputs.values():
            if type(value) is dict:
                ref = value.get(TENSOR_KEY)
                if ref is None or len(value) != 1:
                    simple = False
                    break
                dtype, shape, index = _check_ref(ref, ntensors + 1)
                seen += 1
                if index != seen:  # refs in order 1..n: duplicates impossible, easy to check
                    simple = False
                    break
                expected = math.prod(shape) * DTYPES[dtype][1]
                size = len(frames[first + index - 1])
                if size != expected:
                    raise BadRequest(f"frame {index} holds {size} bytes but dtype {dtype} shape "
                                     f"{list(shape)} needs {expected}")
            elif type(value) is list:
                simple = False
                break
        if simple:
            if seen != ntensors:
                raise BadRequest(f"message has {ntensors} tensor frames but references {seen}")
            return
    decode_tensors(header, [b"", *frames[first:]], _ignore)
