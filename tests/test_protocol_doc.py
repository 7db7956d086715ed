"""docs/protocol.md must not drift from the code.

The spec marks what this test reads with HTML comments (invisible when rendered):

    <!-- protocol-example: NAME value -->       a fenced block: the example's logical value, in
                                                JSON plus tensor(dtype, shape, [flat data])
    <!-- protocol-example: NAME frames -->      a fenced block: "frame N (K bytes)" lines, each
                                                followed by that frame's bytes as hex pairs
    <!-- protocol-example: NAME annotation -->  a table: offset | bytes | meaning, covering
                                                frame 0 byte for byte
    <!-- protocol-table: NAME -->               a table checked against a code constant

For every example: decoding the documented frames with mesh.codec.decode yields exactly the
documented value, encoding the documented value with mesh.codec.encode yields exactly the
documented bytes, and the mesh.messages header builders produce the same bytes.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh import codec
from mesh.errors import ERROR_CLASSES
from mesh.messages import (
    ADMIN_COMMANDS,
    CONTROLLER_MESSAGES,
    REQUEST_KINDS,
    WORKER_MESSAGES,
    ClientKind,
    error_header,
    request_header,
    result_header,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
EXAMPLES = ("request", "result", "error")

# How the examples are built with the code's own header builders.
BUILDERS = {
    "request": lambda: request_header(
        ClientKind.INFER, 7, "toy", {"x": np.array([[1, 2, 3, 4]], dtype=np.float32)}, 5000
    ),
    "result": lambda: result_header(7, {"y": np.array([[0.5, -1.0]], dtype=np.float32)}),
    "error": lambda: error_header(
        8, "overloaded", "mlp: 4096 requests queued, limit 4096", True
    ),
}


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


# -- extraction --------------------------------------------------------------------------------


def _after_marker(doc: str, marker: str) -> str:
    """The text following ``<!-- marker -->`` (exactly one such marker must exist)."""
    pattern = re.compile(r"<!--\s*" + re.escape(marker) + r"\s*-->")
    found = pattern.findall(doc)
    assert len(found) == 1, f"expected one '<!-- {marker} -->' in {DOC.name}, found {len(found)}"
    return doc[pattern.search(doc).end():]  # type: ignore[union-attr]


def _fenced_block(doc: str, marker: str) -> str:
    rest = _after_marker(doc, marker)
    m = re.match(r"\s*```[^\n]*\n(.*?)\n```", rest, re.S)
    assert m, f"'{marker}' must be followed by a fenced code block"
    return m.group(1)


def _table(doc: str, marker: str) -> list[list[str]]:
    """The body rows of the markdown table that follows the marker, as stripped cells."""
    rest = _after_marker(doc, marker).lstrip("\n")
    lines = []
    for line in rest.split("\n"):
        if not line.startswith("|"):
            break
        lines.append(line)
    assert len(lines) >= 3, f"'{marker}' must be followed by a table"
    rows = []
    for line in lines[2:]:  # skip the heading and the |---| line
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        rows.append([c.strip() for c in cells])
    return rows


def _code(cell: str) -> str:
    m = re.fullmatch(r"`([^`]*)`", cell)
    assert m, f"expected a single `code` cell, got {cell!r}"
    return m.group(1)


def _frames(doc: str, name: str) -> list[bytes]:
    text = _fenced_block(doc, f"protocol-example: {name} frames")
    frames: list[bytes] = []
    declared: list[int] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        m = re.fullmatch(r"frame (\d+) \((\d+) bytes?\)", line)
        if m:
            assert int(m.group(1)) == len(frames), f"{name}: frames must be numbered 0, 1, ..."
            frames.append(b"")
            declared.append(int(m.group(2)))
            continue
        assert frames, f"{name}: hex before the first 'frame N' line"
        assert re.fullmatch(r"([0-9a-f]{2})( [0-9a-f]{2})*", line), f"{name}: bad hex {line!r}"
        frames[-1] += bytes.fromhex(line)
    for i, (frame, size) in enumerate(zip(frames, declared, strict=True)):
        assert len(frame) == size, f"{name} frame {i}: says {size} bytes, holds {len(frame)}"
    return frames


class _Tensor:
    """A documented tensor: tensor(dtype, shape, [elements in C order])."""

    def __init__(self, dtype: str, shape: list[int], data: list[Any]) -> None:
        assert dtype in codec.DTYPES and dtype != "bfloat16", dtype
        assert len(data) == math.prod(shape), "tensor data does not match its shape"
        self.array = np.array(data, dtype=codec.DTYPES[dtype][0]).reshape(shape)


def _literal(node: ast.AST) -> Any:
    """Evaluate the value notation: JSON literals plus tensor(...) calls, nothing else."""
    if isinstance(node, ast.Expression):
        return _literal(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, str | int | float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _literal(node.operand)
        assert isinstance(value, int | float) and not isinstance(value, bool)
        return -value
    if isinstance(node, ast.Name) and node.id in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[node.id]
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        keys = [_literal(k) for k in node.keys if k is not None]
        assert len(keys) == len(node.keys) == len(set(keys)), "bad or duplicate keys"
        return dict(zip(keys, (_literal(v) for v in node.values), strict=True))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "tensor" and not node.keywords and len(node.args) == 3):
        return _Tensor(*(_literal(a) for a in node.args))
    raise AssertionError(f"unsupported syntax in a documented value: {ast.dump(node)}")


def _value(doc: str, name: str, *, arrays: bool) -> Any:
    """The documented value; tensors as numpy arrays (arrays=True) or as _Tensor markers."""
    text = _fenced_block(doc, f"protocol-example: {name} value")
    value = _literal(ast.parse(text.strip(), mode="eval"))

    def convert(v: Any) -> Any:
        if isinstance(v, _Tensor):
            return v.array if arrays else v
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        if isinstance(v, list):
            return [convert(x) for x in v]
        return v

    return convert(value)


def _assert_same(got: Any, want: Any, path: str = "header") -> None:
    """Strict equality: same types (int is not float, bool is not int), same tensors."""
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), f"{path}: expected a tensor, got {type(got).__name__}"
        assert got.dtype == want.dtype, f"{path}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{path}: shape {got.shape} != {want.shape}"
        assert np.array_equal(got, want), f"{path}: {got!r} != {want!r}"
        return
    assert type(got) is type(want), f"{path}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for k in want:
            _assert_same(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same(g, w, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def _encode(header: dict[str, Any]) -> list[bytes]:
    return [bytes(f) for f in codec.encode(header)]


# -- the worked examples ------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
def test_documented_frames_decode_to_documented_value(doc: str, name: str) -> None:
    frames = _frames(doc, name)
    _assert_same(codec.decode(frames), _value(doc, name, arrays=True))


@pytest.mark.parametrize("name", EXAMPLES)
def test_documented_value_encodes_to_documented_frames(doc: str, name: str) -> None:
    assert _encode(_value(doc, name, arrays=True)) == _frames(doc, name)


@pytest.mark.parametrize("name", EXAMPLES)
def test_header_builders_produce_documented_frames(doc: str, name: str) -> None:
    assert _encode(BUILDERS[name]()) == _frames(doc, name)


@pytest.mark.parametrize("name", EXAMPLES)
def test_annotation_covers_header_byte_for_byte(doc: str, name: str) -> None:
    header = _frames(doc, name)[0]
    offset = 0
    for row in _table(doc, f"protocol-example: {name} annotation"):
        assert len(row) == 3, f"{name} annotation row {row!r} must have 3 cells"
        chunk = bytes.fromhex(_code(row[1]))
        assert int(row[0]) == offset, f"{name}: row at offset {row[0]}, expected {offset}"
        assert header[offset:offset + len(chunk)] == chunk, f"{name}: bytes at {offset} differ"
        offset += len(chunk)
    assert offset == len(header), f"{name}: annotation covers {offset} of {len(header)} bytes"


def test_error_example_agrees_with_error_classes(doc: str) -> None:
    value = _value(doc, "error", arrays=True)
    cls = ERROR_CLASSES[value["code"]]
    assert value["retryable"] is cls.retryable


# -- the marked tables --------------------------------------------------------------------------


def test_error_code_table_matches_error_classes(doc: str) -> None:
    rows = _table(doc, "protocol-table: error-codes")
    documented = {_code(r[0]): r[1] for r in rows}
    assert len(documented) == len(rows), "an error code is listed twice"
    assert set(documented) == set(ERROR_CLASSES)
    for code, retryable in documented.items():
        assert retryable in ("yes", "no"), f"{code}: retryable must be yes or no"
        assert (retryable == "yes") is ERROR_CLASSES[code].retryable, code


def test_dtype_table_matches_codec(doc: str) -> None:
    rows = _table(doc, "protocol-table: dtypes")
    assert [_code(r[0]) for r in rows] == list(codec.DTYPES)
    for r in rows:
        assert int(r[1]) == codec.DTYPES[_code(r[0])][1], r[0]


def test_dtype_table_itemsizes_hold_on_the_wire(doc: str) -> None:
    # Rule 4 of section 4.2, for each dtype numpy can build: frame length = prod(shape)*itemsize.
    for name, (np_dtype, itemsize) in codec.DTYPES.items():
        if np_dtype is None:
            continue
        frames = _encode({"t": np.zeros((2, 3), dtype=np_dtype), "e": np.zeros((0, 5), np_dtype),
                          "s": np.zeros((), dtype=np_dtype)})
        assert [len(f) for f in frames[1:]] == [6 * itemsize, 0, itemsize], name
        decoded = codec.decode(frames)
        assert decoded["e"].shape == (0, 5) and decoded["s"].shape == (), name


def test_kind_tables_match_messages(doc: str) -> None:
    requests = {_code(r[0]) for r in _table(doc, "protocol-table: request-kinds")}
    replies = {_code(r[0]) for r in _table(doc, "protocol-table: reply-kinds")}
    assert requests == set(REQUEST_KINDS)
    kinds = {v for k, v in vars(ClientKind).items() if not k.startswith("_")}
    assert requests | replies == kinds


def test_admin_command_table_matches_messages(doc: str) -> None:
    rows = _table(doc, "protocol-table: admin-commands")
    assert {_code(r[0]) for r in rows} == set(ADMIN_COMMANDS)


def test_control_message_table_matches_messages(doc: str) -> None:
    rows = _table(doc, "protocol-table: control-messages")
    tables = {"worker to controller": WORKER_MESSAGES, "controller to worker": CONTROLLER_MESSAGES}
    seen = set()
    for row in rows:
        kind, direction, fields = _code(row[0]), row[1], row[2]
        cls = tables[direction].get(kind)
        assert cls is not None, f"{kind} is not a {direction} message"
        documented = re.findall(r"`(\w+)`", fields)
        assert documented == [f.name for f in dataclasses.fields(cls)], kind
        seen.add((direction, kind))
    assert seen == {(d, k) for d, t in tables.items() for k in t}
