"""Conformance vectors: request frames (hex) and what a controller answers them, so that a
client in any language can check itself offline (docs/protocol-vectors/).

    python -m tests.protocol_vectors --write     # regenerate, against a live controller

Each case is a request as frames (hex), what it means, and the answer the controller gave:
its frames (hex) and the fields a client relies on (``kind``, ``id``, ``code``,
``retryable``, ``retry_after_ms``, the ``outputs`` of a result or chunk; never the message
text, which is for people). Encoder cases have a ``value`` too: the header a client would
build, whose msgpack encoding must give exactly ``frames``; each client's tests feed its own
request builder with them (tests/test_protocol_vectors.py for Python, clients/js/test,
clients/c/test_client.c). tests/test_protocol_vectors.py checks the file against a live
controller in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq
import zmq.asyncio

from mesh import codec

VECTORS = Path(__file__).resolve().parent.parent / "docs" / "protocol-vectors" / "vectors.json"
MAX_REQUEST_BYTES = 4096  # the controller the vectors were made against (tests use the same)

DEPLOYMENTS = """
[[deployments]]
name = "echo"
model = "worker.models.echo:build"
worlds = 1
"""


def _h(**fields: Any) -> bytes:
    return msgpack.packb({"v": 1, **fields})


def _x() -> list[bytes]:
    """A float32 [1, 4] tensor holding 1, 2, 3, 4: its header reference and frame."""
    frames = codec.encode({"x": np.array([[1, 2, 3, 4]], dtype=np.float32)})
    return [bytes(f) for f in frames]


def _with_params() -> tuple[dict[str, Any], list[bytes]]:
    """An infer with every kind of value a client sends: a tensor, a string and a negative int
    among the inputs, and params holding an int and a tensor (its frame follows the inputs')."""
    header = {"v": 1, "kind": "infer", "id": 17, "model": "echo",
              "inputs": {"x": np.array([[1, 2, 3, 4]], dtype=np.float32), "prompt": "hello",
                         "n": -42},
              "timeout_ms": 5000,
              "params": {"max_tokens": 4, "bias": np.array([1, -1], dtype=np.int32)}}
    frames = [bytes(f) for f in codec.encode(header)]
    return msgpack.unpackb(frames[0]), frames


def cases() -> list[dict[str, Any]]:
    """(name, meaning, request frames, value or None) for every case."""
    x_ref, x_frame = _x()[0], _x()[1]
    ref = msgpack.unpackb(x_ref)["x"]
    infer = {"v": 1, "kind": "infer", "id": 1, "model": "echo", "inputs": {"x": ref},
             "timeout_ms": 5000}
    stream = {**infer, "id": 16, "kind": "stream"}
    cancel = {"v": 1, "kind": "cancel", "id": 999}
    with_params, with_params_frames = _with_params()

    def frames(header: dict[str, Any], *tensors: bytes) -> list[bytes]:
        return [msgpack.packb(header), *tensors]

    out: list[dict[str, Any]] = [
        {"name": "infer", "meaning": "an infer of a float32 [1, 4] tensor: one result with "
         "the same tensor back (the echo model)", "value": infer,
         "frames": frames(infer, x_frame)},
        {"name": "ping", "meaning": "a ping: one pong with the same id and the controller's "
         "incarnation", "value": {"v": 1, "kind": "ping", "id": 2},
         "frames": frames({"v": 1, "kind": "ping", "id": 2})},
        {"name": "describe", "meaning": "describe one model: one description",
         "value": {"v": 1, "kind": "describe", "id": 3, "model": "echo"},
         "frames": frames({"v": 1, "kind": "describe", "id": 3, "model": "echo"})},
        {"name": "infer_params", "meaning": "an infer with a tensor, a string and a negative "
         "int as inputs and params holding an int and a tensor (frame 2, after the inputs' "
         "frame): one result with the inputs back (echo ignores params)",
         "value": with_params, "frames": with_params_frames},
        {"name": "string_id", "meaning": "a string id is echoed as sent",
         "frames": frames({**infer, "id": "req-7"}, x_frame)},
        {"name": "not_msgpack", "meaning": "frame 0 is not msgpack: bad_request, id nil",
         "frames": [b"\xc1"]},
        {"name": "not_a_map", "meaning": "the header is an array: bad_request, id nil",
         "frames": [msgpack.packb([1, "infer"])]},
        {"name": "too_large", "meaning": f"more than max_request_bytes ({MAX_REQUEST_BYTES}) "
         "in all: payload_too_large", "frames": frames({**infer, "id": 4}, b"\0" * 5000)},
        {"name": "version_missing", "meaning": "no v: unsupported_version",
         "frames": [msgpack.packb({"kind": "infer", "id": 5})]},
        {"name": "version_2", "meaning": "v = 2: unsupported_version",
         "frames": [msgpack.packb({"v": 2, "kind": "infer", "id": 6})]},
        {"name": "version_float", "meaning": "v = 1.0, a float: unsupported_version (integer "
         "fields must be integers)", "frames": [msgpack.packb({"v": 1.0, "kind": "infer",
                                                              "id": 7})]},
        {"name": "id_missing", "meaning": "no id: bad_request, id nil",
         "frames": [_h(kind="infer", model="echo", inputs={})]},
        {"name": "id_float", "meaning": "a float id: bad_request, id nil (only ints and "
         "strings are echoed)",
         "frames": [_h(kind="infer", id=1.5, model="echo", inputs={})]},
        {"name": "kind_unknown", "meaning": "an unknown kind: bad_request",
         "frames": [_h(kind="fetch", id=8)]},
        {"name": "model_unknown", "meaning": "no such deployment: unknown_model",
         "frames": frames({**infer, "id": 9, "model": "nope"}, x_frame)},
        {"name": "inputs_not_a_map", "meaning": "inputs is a list: bad_request",
         "frames": [_h(kind="infer", id=10, model="echo", inputs=[1, 2])]},
        {"name": "params_nil", "meaning": "params present but nil: bad_request",
         "frames": frames({**infer, "id": 11, "params": None}, x_frame)},
        {"name": "timeout_zero", "meaning": "timeout_ms 0: bad_request",
         "frames": frames({**infer, "id": 12, "timeout_ms": 0}, x_frame)},
        {"name": "timeout_nan", "meaning": "timeout_ms NaN: bad_request",
         "frames": frames({**infer, "id": 13, "timeout_ms": float("nan")}, x_frame)},
        {"name": "tensor_frame_missing", "meaning": "a tensor reference to a frame that is not "
         "there: bad_request", "frames": frames({**infer, "id": 14})},
        {"name": "tensor_size_mismatch", "meaning": "a frame shorter than the reference's "
         "dtype and shape: bad_request", "frames": frames({**infer, "id": 15}, x_frame[:12])},
        {"name": "stream_not_streaming", "meaning": "stream on a model that does not stream: "
         "bad_request (from the model)", "value": stream, "frames": frames(stream, x_frame)},
        {"name": "cancel_unknown", "meaning": "cancel of an id not in flight: no answer at all",
         "value": cancel, "frames": frames(cancel)},
    ]
    for case in out:
        case["frames"] = [bytes(f).hex() for f in case["frames"]]
    return out


def replies() -> list[dict[str, Any]]:
    """Answers as a controller sends them, one per error code of protocol section 7 (their
    retryable flags as the taxonomy says), a result, a chunk and an end, and a generative
    stream's chunk and end: for decoders."""
    from mesh.errors import ERROR_CLASSES
    from mesh.messages import error_header, result_header
    from worker.world import chunk_header, end_header

    # The fields are written out, not decoded from the frames: they say what the frames
    # mean independently of any decoder (the Python one included).
    out = []
    for n, (code, cls) in enumerate(sorted(ERROR_CLASSES.items())):
        after_ms = 100 if code == "overloaded" else 0
        header = error_header(100 + n, code, f"an example {code} error", cls.retryable,
                              after_ms)
        fields = {"kind": "error", "id": 100 + n, "code": code, "retryable": cls.retryable}
        if after_ms:
            fields["retry_after_ms"] = after_ms
        out.append({"name": f"error_{code}", "meaning": f"a final {code} error "
                    f"(retryable: {cls.retryable})",
                    "frames": [msgpack.packb(header).hex()], "fields": fields})
    y = codec.encode(result_header(200, {"y": np.array([[0.5, -1.0]], dtype=np.float32)}))
    out.append({"name": "result", "meaning": "a result: y float32 [1, 2] = 0.5, -1.0",
                "frames": [bytes(f).hex() for f in y],
                "fields": {"kind": "result", "id": 200, "outputs": {"y": {
                    "dtype": "float32", "shape": [1, 2], "data": [0.5, -1.0]}}}})
    chunk = {"v": 1, "kind": "chunk", "id": 201, "seq": 0, "outputs": {"text": "a"}}
    end = {"v": 1, "kind": "end", "id": 201, "seq": 1}
    out.append({"name": "chunk", "meaning": "a stream's first chunk", "frames":
                [msgpack.packb(chunk).hex()], "fields": {"kind": "chunk", "id": 201,
                                                         "outputs": {"text": "a"}}})
    out.append({"name": "end", "meaning": "the stream's end after 1 chunk", "frames":
                [msgpack.packb(end).hex()], "fields": {"kind": "end", "id": 201}})
    # A generative stream (protocol section 3.5): header keys beyond the base ones (tokens;
    # finish_reason and the token counts) that a client which does not resume streams must
    # read past, built as a world builds them.
    summary = {"finish_reason": "length", "prompt_tokens": 3, "completion_tokens": 2}
    last = chunk_header(202, 0, {"text": "hi", **summary}, tokens=[104, 105])
    out.append({"name": "chunk_generative", "meaning": "a generative stream's only chunk: "
                "tokens in the header, finish_reason and the token counts in its outputs",
                "frames": [msgpack.packb(last).hex()],
                "fields": {"kind": "chunk", "id": 202, "outputs": {"text": "hi", **summary}}})
    out.append({"name": "end_generative", "meaning": "that stream's end, repeating "
                "finish_reason and the token counts (a client reads past them)",
                "frames": [msgpack.packb(end_header(202, 1, summary)).hex()],
                "fields": {"kind": "end", "id": 202}})
    return out


def answer_fields(frames: list[bytes]) -> dict[str, Any]:
    """What a client must read from an answer: its kind, id, error code, retryable and
    retry_after_ms, and the outputs of a result or chunk, each tensor as its dtype, shape
    and flat (row-major) data."""
    header = msgpack.unpackb(frames[0], strict_map_key=False)
    keep = ("kind", "id", "code", "retryable", "retry_after_ms")
    fields = {k: header[k] for k in keep if k in header}
    if header.get("kind") in ("result", "chunk"):
        fields["outputs"] = codec.decode_tensors(header, frames, _tensor_fields)["outputs"]
    if header.get("kind") == "description":
        fields["models"] = [m["name"] for m in header["models"]]
    return fields


def _tensor_fields(dtype: str, shape: list[int], buf: Any) -> dict[str, Any]:
    data = codec.to_numpy(dtype, shape, buf).ravel().tolist()
    return {"dtype": dtype, "shape": list(shape), "data": data}


async def ask(endpoint: str, frames: list[bytes], wait_s: float = 3.0) -> list[bytes] | None:
    """Send one request on a fresh connection; its answer's frames, or None (no answer)."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        await sock.send_multipart(frames)
        if not await sock.poll(int(wait_s * 1000)):
            return None
        return list(await sock.recv_multipart())
    finally:
        sock.close()
        ctx.term()


async def run_against(endpoint: str) -> list[dict[str, Any]]:
    """Every case with the controller's answer filled in."""
    out = []
    for case in cases():
        frames = [bytes.fromhex(f) for f in case["frames"]]
        answer = await ask(endpoint, frames, wait_s=1.0 if case["name"] == "cancel_unknown"
                           else 5.0)
        case["answer"] = None if answer is None else {
            "frames": [bytes(f).hex() for f in answer], "fields": answer_fields(answer)}
        out.append(case)
    return out


def stable(case: dict[str, Any]) -> dict[str, Any]:
    """What must not change between runs: the request and the answer's fields (not its
    frames: a pong's incarnation and error messages differ)."""
    answer = case["answer"]
    return {"name": case["name"], "frames": case["frames"],
            "fields": None if answer is None else answer["fields"]}


def main(argv: list[str] | None = None) -> int:
    from mesh.testing.configs import write_config
    from mesh.testing.ports import free_ports
    from tests.cluster import start_controller

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write " + str(VECTORS))
    args = parser.parse_args(argv)

    async def go() -> list[dict[str, Any]]:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            ports = free_ports("client", "admin", "worker")
            config = Path(d) / "vectors.toml"
            write_config(config, ports, DEPLOYMENTS, f"max_request_bytes = {MAX_REQUEST_BYTES}"
                         '\nlauncher = "local"')
            proc = start_controller(config, Path(d) / "controller.log")
            try:
                endpoint = f"tcp://127.0.0.1:{ports['client']}"
                for _ in range(300):
                    answer = await ask(endpoint, [_h(kind="describe", id=0)], wait_s=0.2)
                    if answer and msgpack.unpackb(answer[0])["models"][0]["ready"]:
                        break
                return await run_against(endpoint)
            finally:
                proc.terminate()
                proc.wait(20)

    result = asyncio.run(go())
    text = json.dumps({"protocol_version": 1, "max_request_bytes": MAX_REQUEST_BYTES,
                       "cases": result, "replies": replies()}, indent=1) + "\n"
    if args.write:
        VECTORS.parent.mkdir(parents=True, exist_ok=True)
        VECTORS.write_text(text)
        print(f"wrote {len(result)} cases to {VECTORS}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
