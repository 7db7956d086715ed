"""The ``gpt2`` demo (worker/models/gpt2.py): Hugging Face-layout checkpoints in and out, split
into stages, a tokenizer file, and the end-of-sequence token ending a stream early."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mesh.messages import ClientKind
from tests.test_gen_stage import answers, dispatch, entry, run_until
from worker.models import gpt2

SMALL = {"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 128}


def stage_logits(path: str, ids: list[int], stages: int) -> torch.Tensor:
    """The last position's logits, the model loaded from ``path`` in ``stages`` stages."""
    x: Any = torch.tensor(ids)
    for stage in range(stages):
        h = gpt2.build(**SMALL, seed=99)  # a different seed: every weight must come from disk
        h.setup(checkpoint=path, device="cpu", stage=stage, stages=stages)
        assert h.model is not None
        for child in h.model:
            if isinstance(child, gpt2.Embed):
                x = child(x, torch.arange(len(ids)))
            elif isinstance(child, gpt2.Block):
                x = gpt2._full_block(child, x)
            else:
                x = child(x[-1:])
    return x


def test_seeded_weights_round_trip_through_a_safetensors_file_whole_and_in_stages(
        tmp_path: Path) -> None:
    model = gpt2.build_model({**gpt2.DEFAULTS, **SMALL}, seed=3)
    path = str(tmp_path / "model.safetensors")
    gpt2.save_safetensors(model, path)
    ids = list(b"round trip")
    with torch.inference_mode():
        want = gpt2.generate(model, ids, 1)
        for stages in (1, 2, 3):
            assert int(stage_logits(path, ids, stages).argmax()) == want[0]
    assert gpt2.generate(model, ids, 12) != [want[0]] * 12  # the seeded model wanders


def test_a_checkpoint_written_by_transformers_gives_its_logits(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=257,
                                     n_positions=128)
    reference = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in reference.parameters():  # wider weights: logits far apart, a fair test
            p.mul_(20.0)
    reference.save_pretrained(tmp_path)
    ids = list(b"Hugging Face")
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0, -1]
    # The sizes come from the config.json beside the checkpoint (these are not the defaults).
    got = stage_logits(str(tmp_path / "model.safetensors"), ids, 2)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_a_gpt2_world_serves_utf8_text_and_ends_streams_on_the_end_of_sequence_token(
        tmp_path: Path) -> None:
    model = gpt2.build_model({**gpt2.DEFAULTS, **SMALL}, seed=5)
    with torch.no_grad():  # a head that prefers the end-of-sequence token more and more
        head = model[-1]
        head.lm_head.weight = torch.nn.Parameter(head.lm_head.weight.clone())
        head.ln_f.weight.mul_(0.01)
        head.ln_f.bias.fill_(1.0)
        head.lm_head.weight[256] = 0.5
    path = tmp_path / "model.safetensors"
    gpt2.save_safetensors(model, str(path))
    (tmp_path / "config.json").write_text(json.dumps({**gpt2.DEFAULTS, **SMALL}))
    deployment = {"name": "gpt2", "model": "worker.models.gpt2:build", "checkpoint": str(path)}
    stage, sent = entry(deployment)
    stage.accept(dispatch(1, "é ü", max_tokens=50))
    stage.accept(dispatch(2, "no end", max_tokens=20, ignore_eos=True))
    run_until(stage, lambda: stage.idle)
    replies = answers(sent)
    first = [r for r in replies if r["rid"] == 1 and r["kind"] == ClientKind.CHUNK]
    assert first[-1]["outputs"]["finish_reason"] == "stop"
    assert first[-1]["tokens"][-1] == 256 and first[-1]["outputs"]["completion_tokens"] < 50
    second = [r for r in replies if r["rid"] == 2 and r["kind"] == ClientKind.CHUNK]
    assert second[-1]["outputs"]["finish_reason"] == "length"
    assert second[-1]["outputs"]["completion_tokens"] == 20
    # Every chunk's text is whole UTF-8 (a str), and its tokens are the bytes of its text.
    for chunk in second:
        text, tokens = chunk["outputs"]["text"], chunk["tokens"]
        assert bytes(t for t in tokens if t < 256).decode("utf-8", "replace") == text


def test_a_tokenizer_file_is_used_for_prompts_and_text(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz ")}
    vocab["<|endoftext|>"] = len(vocab)
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    handler = gpt2.build(tokenizer=str(path), **SMALL)
    handler.setup(checkpoint="", device="cpu")
    assert handler.tokenizer.encode("ab c") == [0, 1, 26, 2]
    assert handler.tokenizer.eos_token_id == 27
    assert handler.tokenizer.token_bytes(1) == b"b"


def test_unknown_options_and_a_wrong_checkpoint_fail_the_load_with_the_reason() -> None:
    from worker.loader_errors import LoadError

    with pytest.raises(LoadError, match="unknown gpt2 option"):
        gpt2.build(layers=3)
    handler = gpt2.build()
    with pytest.raises(LoadError, match=r"reads a Hugging Face model\.safetensors"):
        handler.setup(checkpoint="weights.pt", device="cpu")
