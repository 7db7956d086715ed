"""Unit tests for mesh/codec.py: round trips, frame layout, zero-copy, rejection of bad frames."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from mesh import codec
from mesh.errors import BadRequest

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
SHAPES = [[], [0, 3], [7], [2, 3, 4], [256, 513]]
DECODERS = {"to_numpy": codec.to_numpy, "to_torch": codec.to_torch}


def sample(dtype: str, shape: list[int], seed: int = 0) -> torch.Tensor:
    """Deterministic values that use the dtype's range (so a byte mix-up shows)."""
    gen = torch.Generator().manual_seed(seed)
    tdtype = TORCH_DTYPES[dtype]
    if dtype == "bool":
        return torch.randint(0, 2, shape, generator=gen).bool()
    if tdtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 100).to(tdtype)
    info = torch.iinfo(tdtype)
    low, high = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int64).to(tdtype)


def as_torch(value: Any) -> torch.Tensor:
    """A decoded value (numpy array or torch tensor) as a torch tensor, bit for bit."""
    if isinstance(value, torch.Tensor):
        return value
    assert isinstance(value, np.ndarray)
    if value.dtype.name == "bfloat16":  # ml_dtypes: reinterpret the 16-bit patterns
        return torch.from_numpy(value.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(value.copy())


def round_trip(header: dict[str, Any], decoder: Any = codec.to_numpy) -> Any:
    frames = codec.encode(header)
    # What ZeroMQ delivers: independent byte strings, not views of the sender's memory.
    received = [bytes(f) for f in frames]
    return codec.decode(received, decoder)


def tensor_ref(dtype: Any, shape: Any, index: Any) -> dict[str, Any]:
    return {codec.TENSOR_KEY: [dtype, shape, index]}


def buffer_address(buf: Any) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
def test_a_torch_tensor_comes_back_with_the_same_dtype_shape_and_bits(
    dtype: str, shape: list[int], decoder: str
) -> None:
    t = sample(dtype, shape)
    out = round_trip({"x": t}, DECODERS[decoder])["x"]
    if decoder == "to_torch":
        assert isinstance(out, torch.Tensor)
    elif dtype != "bfloat16":
        assert isinstance(out, np.ndarray)
        assert out.dtype == np.dtype(dtype)
    back = as_torch(out)
    assert back.dtype == t.dtype
    assert list(back.shape) == shape
    assert torch.equal(back, t)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [d for d in TORCH_DTYPES if d != "bfloat16"])
def test_a_numpy_array_comes_back_with_the_same_dtype_shape_and_bits(
    dtype: str, shape: list[int], decoder: str
) -> None:
    arr = sample(dtype, shape).numpy()
    out = round_trip({"x": arr}, DECODERS[decoder])["x"]
    back = as_torch(out).numpy()
    assert back.dtype == arr.dtype
    assert back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_the_header_names_the_wire_dtype_and_shape_of_each_tensor() -> None:
    a, b = torch.zeros(2, 3, dtype=torch.bfloat16), np.zeros((), np.int8)
    frames = codec.encode({"a": a, "b": b})
    header = msgpack.unpackb(frames[0])
    assert header == {"a": tensor_ref("bfloat16", [2, 3], 1), "b": tensor_ref("int8", [], 2)}
    assert [len(f) for f in frames[1:]] == [12, 1]


def test_a_transposed_torch_tensor_comes_back_equal_and_contiguous() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert not t.is_contiguous()
    as_tensor = round_trip({"x": t}, codec.to_torch)["x"]
    as_array = round_trip({"x": t}, codec.to_numpy)["x"]
    assert torch.equal(as_tensor, t)
    assert as_tensor.is_contiguous()
    np.testing.assert_array_equal(as_array, t.numpy())
    assert as_array.flags.c_contiguous


def test_a_strided_numpy_slice_comes_back_equal_and_contiguous() -> None:
    arr = np.arange(60, dtype=np.int32).reshape(6, 10)[::2, 1::3]
    assert not arr.flags.c_contiguous
    as_array = round_trip({"x": arr}, codec.to_numpy)["x"]
    as_tensor = round_trip({"x": arr}, codec.to_torch)["x"]
    np.testing.assert_array_equal(as_array, arr)
    assert as_array.flags.c_contiguous
    assert torch.equal(as_tensor, torch.from_numpy(np.ascontiguousarray(arr)))
    assert as_tensor.is_contiguous()


def test_a_negated_or_conjugate_view_travels_as_its_values() -> None:
    t = torch.arange(4, dtype=torch.float32)
    neg = torch._neg_view(t)
    out = round_trip({"x": neg}, codec.to_torch)["x"]
    assert torch.equal(out, -t)


def test_a_tensor_that_requires_grad_travels_as_its_values() -> None:
    leaf = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    derived = leaf * 2  # has a grad_fn
    out = round_trip({"leaf": leaf, "derived": derived}, codec.to_torch)
    assert torch.equal(out["leaf"], leaf.detach())
    assert torch.equal(out["derived"], derived.detach())
    assert not out["leaf"].requires_grad
    assert not out["derived"].requires_grad


@pytest.mark.parametrize("dtype", [torch.complex64, torch.uint16, torch.float8_e4m3fn])
def test_a_torch_dtype_the_wire_does_not_carry_is_refused_by_name(dtype: torch.dtype) -> None:
    with pytest.raises(codec.EncodeError, match="cannot travel on the wire"):
        codec.encode({"x": torch.zeros(2, dtype=dtype)})

# -- frame layout -----------------------------------------------------------------------------


def test_encode_makes_one_header_frame_plus_one_frame_per_tensor() -> None:
    header = {
        "a": torch.ones(2),
        "nested": [np.zeros(3, np.float32), {"deep": torch.zeros(1, dtype=torch.int64)}],
        "text": "no tensor here",
    }
    frames = codec.encode(header)
    assert len(frames) == 4
    assert isinstance(frames[0], bytes)


def test_a_header_without_tensors_is_a_single_frame() -> None:
    assert len(codec.encode({"kind": "infer", "id": 1})) == 1


def test_tensors_nested_in_lists_and_dicts_come_back_in_place() -> None:
    a, b, c = torch.full((2,), 1.0), torch.full((3,), 2.0), torch.full((1, 1), 3.0)
    out = round_trip({"list": [a, {"inner": b}], "dict": {"k": [[c]]}}, codec.to_torch)
    assert torch.equal(out["list"][0], a)
    assert torch.equal(out["list"][1]["inner"], b)
    assert torch.equal(out["dict"]["k"][0][0], c)


def test_msgpack_native_values_come_back_untouched() -> None:
    header = {
        "v": 1,
        "s": "héllo",
        "f": 1.5,
        "neg": -7,
        "big": 2**62,
        "t": True,
        "none": None,
        "raw": b"\x00\xffbytes",
        "list": [1, "two", [3.0, {"four": 4}]],
        "map": {"a": {"b": []}, "empty": {}},
    }
    frames = codec.encode(header)
    assert len(frames) == 1
    assert codec.decode(frames) == header


def test_tuples_travel_as_lists_and_numpy_scalars_as_python_values() -> None:
    out = round_trip({"shape": (2, 3), "n": np.int64(5), "f": np.float32(0.5)})
    assert out == {"shape": [2, 3], "n": 5, "f": 0.5}


def test_encode_sends_a_large_contiguous_tensor_from_its_own_memory() -> None:
    n = codec.COPY_OUT_MAX_BYTES // 4 + 1  # just over the copy-out size, in float32s
    t = torch.arange(n, dtype=torch.float32)
    arr = np.arange(n, dtype=np.int64)
    frames = codec.encode({"t": t, "a": arr})
    assert buffer_address(frames[1]) == t.data_ptr()
    assert buffer_address(frames[2]) == arr.ctypes.data


def test_encode_copies_a_small_tensor_out_in_c_order() -> None:
    # Cheaper than viewing its memory (ZeroMQ copies frames this small anyway), and a
    # snapshot: writing to the tensor after encoding does not change what is sent.
    t = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    arr = np.arange(6, dtype=np.int64).reshape(2, 3)
    frames = codec.encode({"t": t, "a": arr})
    assert type(frames[1]) is bytes and type(frames[2]) is bytes
    t += 100
    arr += 100
    out = codec.decode(frames)
    np.testing.assert_array_equal(out["t"], np.arange(16, dtype=np.float32).reshape(4, 4))
    np.testing.assert_array_equal(out["a"], np.arange(6, dtype=np.int64).reshape(2, 3))


# -- zero-copy decoding -----------------------------------------------------------------------


def test_decoding_to_torch_from_a_writable_frame_shares_its_memory() -> None:
    frame = bytearray(np.arange(6, dtype=np.float32).tobytes())
    frames = [codec.pack({"x": tensor_ref("float32", [2, 3], 1)}), frame]
    t = codec.decode(frames, codec.to_torch)["x"]
    assert t.data_ptr() == buffer_address(frame)
    frame[0:4] = np.float32(42.0).tobytes()
    assert t[0, 0].item() == 42.0


def test_decoding_to_numpy_from_a_writable_frame_shares_its_memory() -> None:
    frame = bytearray(np.arange(4, dtype=np.int32).tobytes())
    frames = [codec.pack({"x": tensor_ref("int32", [4], 1)}), frame]
    arr = codec.decode(frames, codec.to_numpy)["x"]
    assert np.shares_memory(arr, np.frombuffer(frame, dtype=np.uint8))


def test_decoding_to_torch_from_a_read_only_frame_gives_a_tensor_safe_to_write() -> None:
    frame = np.arange(4, dtype=np.float32).tobytes()
    frames = [codec.pack({"x": tensor_ref("float32", [4], 1)}), frame]
    t = codec.decode(frames, codec.to_torch)["x"]
    t += 1  # must not write into the immutable bytes object
    assert frame == np.arange(4, dtype=np.float32).tobytes()
    assert t.tolist() == [1.0, 2.0, 3.0, 4.0]


# -- rejection of malformed messages ----------------------------------------------------------


def header_frames(header: Any, *tensor_frames: bytes) -> list[Any]:
    return [codec.pack(header), *tensor_frames]


FOUR_FLOATS = np.zeros(4, dtype=np.float32).tobytes()

MALFORMED = {
    "header_is_not_msgpack": [b"\xc1\xc1\xc1"],
    "header_is_truncated": [b"\x82\xa1a"],
    "no_frames_at_all": [],
    "frame_index_past_the_end": header_frames({"x": tensor_ref("float32", [4], 2)}, FOUR_FLOATS),
    "frame_index_is_the_header": header_frames({"x": tensor_ref("float32", [4], 0)}, FOUR_FLOATS),
    "frame_index_is_not_an_int": header_frames({"x": tensor_ref("float32", [4], "1")}, FOUR_FLOATS),
    "frame_length_too_short": header_frames({"x": tensor_ref("float32", [5], 1)}, FOUR_FLOATS),
    "frame_length_too_long": header_frames({"x": tensor_ref("float32", [3], 1)}, FOUR_FLOATS),
    "frame_length_wrong_itemsize": header_frames({"x": tensor_ref("float64", [4], 1)}, FOUR_FLOATS),
    "unknown_dtype": header_frames({"x": tensor_ref("complex64", [2], 1)}, FOUR_FLOATS),
    "dtype_not_a_string": header_frames({"x": tensor_ref(7, [4], 1)}, FOUR_FLOATS),
    "negative_dimension": header_frames({"x": tensor_ref("float32", [-4], 1)}, FOUR_FLOATS),
    "float_dimension": header_frames({"x": tensor_ref("float32", [4.0], 1)}, FOUR_FLOATS),
    "string_dimension": header_frames({"x": tensor_ref("float32", ["4"], 1)}, FOUR_FLOATS),
    "bool_dimension": header_frames({"x": tensor_ref("uint8", [True], 1)}, b"\x00"),
    "shape_not_a_list": header_frames({"x": tensor_ref("float32", 4, 1)}, FOUR_FLOATS),
    "reference_not_a_list": header_frames({"x": {codec.TENSOR_KEY: "float32"}}, FOUR_FLOATS),
    "reference_too_short": header_frames({"x": {codec.TENSOR_KEY: ["float32", [4]]}}, FOUR_FLOATS),
    "unreferenced_extra_frame": header_frames(
        {"x": tensor_ref("float32", [4], 1)}, FOUR_FLOATS, FOUR_FLOATS
    ),
    "frame_without_any_reference": header_frames({"x": 1}, FOUR_FLOATS),
    "frame_referenced_twice": header_frames(
        {"x": tensor_ref("float32", [4], 1), "y": tensor_ref("float32", [4], 1)}, FOUR_FLOATS
    ),
    "tensor_map_with_extra_keys": header_frames(
        {"x": {codec.TENSOR_KEY: ["float32", [4], 1], "extra": 1}}, FOUR_FLOATS
    ),
}


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("case", MALFORMED)
def test_decode_rejects_a_malformed_message_with_bad_request(case: str, decoder: str) -> None:
    with pytest.raises(BadRequest):
        codec.decode(MALFORMED[case], DECODERS[decoder])


def test_a_bad_request_from_decode_says_what_is_wrong() -> None:
    with pytest.raises(BadRequest, match="complex64"):
        codec.decode(MALFORMED["unknown_dtype"])
    with pytest.raises(BadRequest, match="referenced twice"):
        codec.decode(MALFORMED["frame_referenced_twice"])


# -- encode rejections ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        torch.zeros(2, dtype=torch.complex64),
        np.zeros(2, dtype=np.complex64),
        np.zeros(2, dtype=np.uint16),
        np.array(["text"]),
        np.array([object()], dtype=object),
        {1, 2},
        object(),
    ],
    ids=["torch_complex64", "numpy_complex64", "numpy_uint16", "numpy_str", "numpy_object",
         "set", "object"],
)
def test_encode_rejects_a_value_that_cannot_travel_with_encode_error(value: Any) -> None:
    with pytest.raises(codec.EncodeError):
        codec.encode({"x": value})
