"""The generative example of docs/models.md runs as printed: its module, served by a world's
engine (one stage, no process), streams text, samples with a seed and stops at its
end-of-sequence token."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

from mesh.messages import ClientKind
from tests.test_gen_stage import answers, dispatch, entry, run_until

DOC = Path(__file__).resolve().parent.parent / "docs" / "models.md"


@pytest.fixture
def charlm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    text = DOC.read_text()
    found = re.search(r"<!-- models-doc: charlm -->\n```python\n(.*?)```", text, re.S)
    assert found, "docs/models.md lost its generative example"
    package = tmp_path / "mymodels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "charlm.py").write_text(found.group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mymodels.charlm:build"
    for name in [m for m in sys.modules if m.startswith("mymodels")]:
        del sys.modules[name]


def test_the_documented_generative_model_serves_streams(charlm: str) -> None:
    stage, sent = entry({"name": "charlm", "model": charlm})
    stage.accept(dispatch(1, "hello world", max_tokens=40, temperature=0.7, seed=3))
    stage.accept(dispatch(2, "hello world", max_tokens=40, temperature=0.7, seed=3))
    stage.accept(dispatch(3, "hello world", max_tokens=40))
    run_until(stage, lambda: stage.idle)
    replies = answers(sent)

    def text(rid: int) -> tuple[str, dict[str, Any]]:
        chunks = [r for r in replies if r["rid"] == rid and r["kind"] == ClientKind.CHUNK]
        return "".join(c["outputs"]["text"] for c in chunks), chunks[-1]["outputs"]

    (first, last), (second, _), (greedy, greedy_last) = text(1), text(2), text(3)
    assert first == second  # the same seed, the same text
    assert last["finish_reason"] in ("length", "stop")
    assert greedy_last["completion_tokens"] <= 40 and "\n" not in greedy
    assert [r["kind"] for r in replies].count(ClientKind.END) == 3
