"""Shell arguments into request inputs (mesh/cli/inputs.py): JSON on the command line, and
values too large for one read from files (.npy, .npz, JSON) or stdin."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from mesh.cli.inputs import parse_assignments
from mesh.errors import BadRequest


def test_json_on_the_command_line_keeps_working() -> None:
    inputs = parse_assignments(['x=[[1, 2]]', 'ids:int64=[3, 4]', 'prompt="hi"'])
    assert inputs["x"].dtype == np.float32 and inputs["x"].shape == (1, 2)
    assert inputs["ids"].dtype == np.int64 and inputs["prompt"] == "hi"


def test_an_image_comes_from_a_npy_file_with_its_dtype_and_shape(tmp_path: Path) -> None:
    image = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    np.save(tmp_path / "image.npy", image)
    got = parse_assignments([f"x=@{tmp_path / 'image.npy'}"])["x"]
    assert got.dtype == np.float32 and np.array_equal(got, image)
    as_half = parse_assignments([f"x:float16=@{tmp_path / 'image.npy'}"])["x"]
    assert as_half.dtype == np.float16


def test_an_npz_gives_the_array_of_the_inputs_name_or_its_only_one(tmp_path: Path) -> None:
    np.savez(tmp_path / "two.npz", x=np.ones(2), y=np.zeros(3))
    np.savez(tmp_path / "one.npz", anything=np.arange(4))
    assert parse_assignments([f"y=@{tmp_path / 'two.npz'}"])["y"].shape == (3,)
    assert parse_assignments([f"z=@{tmp_path / 'one.npz'}"])["z"].tolist() == [0, 1, 2, 3]
    with pytest.raises(BadRequest, match="none named 'z'"):
        parse_assignments([f"z=@{tmp_path / 'two.npz'}"])


def test_json_from_a_file_or_stdin(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("[[0.5, 1.5]]")
    assert parse_assignments([f"x=@{tmp_path / 'x.json'}"])["x"].tolist() == [[0.5, 1.5]]
    got = parse_assignments(["prompt=@-"], stdin=io.StringIO('"from stdin"'))
    assert got == {"prompt": "from stdin"}
    with pytest.raises(BadRequest, match="only one input"):
        parse_assignments(["a=@-", "b=@-"], stdin=io.StringIO("1"))


def test_a_missing_or_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="no file"):
        parse_assignments([f"x=@{tmp_path / 'nope.npy'}"])
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(BadRequest, match="is not a numpy file"):
        parse_assignments([f"x=@{tmp_path / 'bad.npy'}"])
