"""Unit tests for worker/sampling.py and worker/text_out.py: request parameters, the seeded
sampler, and what a stream's client sees (UTF-8, stop strings, stop tokens, resume)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mesh.errors import BadRequest
from worker.sampling import SAMPLING_KEYS, Resume, SamplingParams, parse, sample
from worker.text_out import LENGTH, STOP, TextOut
from worker.tokenizers import ByteTokenizer, CharTokenizer

VOCAB = 50


def parsed(**params: Any) -> tuple[SamplingParams, Resume]:
    return parse(params, vocab_size=VOCAB, max_tokens_limit=256)


@pytest.mark.parametrize(("params", "message"), [
    ({"max_tokens": 0}, "max_tokens must be an integer in 1..256, got 0"),
    ({"max_tokens": 300}, "max_tokens must be an integer in 1..256"),
    ({"max_tokens": 2.0}, "max_tokens must be an integer"),
    ({"max_tokens": True}, "max_tokens must be an integer"),
    ({"temperature": -0.1}, "temperature must lie in [0, 100]"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"top_p": 0.0}, "top_p must lie in (0, 1]"),
    ({"top_p": 1.5}, "top_p must lie in (0, 1]"),
    ({"top_k": -1}, "top_k must be an integer in 0..1000000"),
    ({"seed": -3}, "seed must be an integer in 0.."),
    ({"stop": ["ok", ""]}, "stop must be a string or a list of at most 8"),
    ({"stop": ["x"] * 9}, "stop must be a string or a list of at most 8"),
    ({"stop_token_ids": [VOCAB]}, "stop_token_ids must be a list"),
    ({"ignore_eos": 1}, "ignore_eos must be true or false"),
    ({"resume": {"tokens": [1, 2], "chunks": 3}}, "resume.chunks must be an integer"),
    ({"resume": {"tokens": [99]}}, "resume.tokens must be fewer than max_tokens"),
    ({"resume": [1, 2]}, "resume must be a map"),
    ({"skip": 3}, "unknown parameter 'skip'"),
])
def test_bad_sampling_parameters_are_refused_naming_the_limit(params: dict[str, Any],
                                                               message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parsed(**params)
    assert message in str(caught.value)


def test_good_parameters_parse_and_a_single_stop_string_is_a_list_of_one() -> None:
    p, resume = parsed(max_tokens=20, temperature=0.7, top_p=0.9, top_k=5, seed=3, stop="\n",
                       resume={"tokens": [1, 2], "chunks": 1})
    assert p == SamplingParams(20, 0.7, 0.9, 5, 3, ("\n",), (), False)
    assert resume == Resume((1, 2), 1)
    assert SamplingParams.from_wire(p.to_wire()) == p
    assert set(SAMPLING_KEYS) >= {"max_tokens", "temperature", "top_p", "seed", "stop"}


def test_greedy_rows_take_the_argmax_and_seeded_rows_repeat_whatever_shares_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB)
    greedy = SamplingParams(temperature=0.0)
    seeded = SamplingParams(temperature=1.0, seed=11)
    alone = [sample(logits[i:i + 1], [seeded], [5])[0] for i in range(4)]
    together = sample(logits, [seeded] * 4, [5] * 4)
    assert together == alone
    mixed = sample(logits, [greedy, seeded, greedy, seeded], [5] * 4)
    assert mixed[0] == int(logits[0].argmax()) and mixed[2] == int(logits[2].argmax())
    assert mixed[1] == alone[1] and mixed[3] == alone[3]
    # Another position or another seed draws anew (almost surely, over 20 positions).
    draws = {tuple(sample(logits, [seeded] * 4, [n] * 4)) for n in range(20)}
    assert len(draws) > 1


def test_top_k_and_top_p_keep_only_the_likeliest_tokens() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 3] = 5.0
    logits[0, 4] = 4.9
    top2 = SamplingParams(temperature=5.0, top_k=2, seed=1)
    assert {sample(logits, [top2], [n])[0] for n in range(200)} == {3, 4}
    nucleus = SamplingParams(temperature=1.0, top_p=0.3, seed=1)
    assert {sample(logits, [nucleus], [n])[0] for n in range(200)} == {3}


def out_of(tokenizer: Any, **params: Any) -> TextOut:
    p, _ = parse(params, vocab_size=tokenizer.vocab_size, max_tokens_limit=256)
    return TextOut(p, tokenizer.token_bytes, tokenizer.eos_token_id)


def test_a_character_split_over_byte_tokens_is_held_until_it_is_whole() -> None:
    tok = ByteTokenizer()
    out = out_of(tok, max_tokens=10)
    ids = tok.encode("é!")  # two bytes, then one
    first, second, third = (out.push(t) for t in ids)
    assert (first.text, first.tokens) == ("", ())
    assert (second.text, second.tokens) == ("é", tuple(ids[:2]))  # both tokens, one char
    assert (third.text, third.tokens) == ("!", (ids[2],))


def test_a_stop_string_over_several_tokens_ends_the_text_before_it() -> None:
    tok = CharTokenizer(list("abcXYZ"))
    out = out_of(tok, max_tokens=20, stop=["XYZ"])
    shown = [out.push(t) for t in tok.encode("abXYa")[:4]]
    assert [e.text for e in shown] == ["a", "b", "", ""]  # "X", "XY" might start the stop
    end = out.push(tok.encode("Z")[0])
    assert end.finish == STOP and end.text == "" and out.text.endswith("XYZ")
    assert end.tokens == tuple(tok.encode("XYZ"))  # every token is delivered once


def test_held_text_that_turns_out_not_to_stop_is_released_with_its_tokens() -> None:
    tok = CharTokenizer(list("abcXYZ"))
    out = out_of(tok, max_tokens=20, stop=["XYZ"])
    assert out.push(tok.encode("X")[0]).text == ""
    later = out.push(tok.encode("a")[0])
    assert later.text == "Xa" and later.tokens == tuple(tok.encode("Xa"))


def test_the_end_of_sequence_token_and_stop_tokens_end_the_stream_unshown() -> None:
    tok = ByteTokenizer()
    out = out_of(tok, max_tokens=10)
    out.push(tok.encode("h")[0])
    end = out.push(256)
    assert end.finish == STOP and end.text == "" and end.tokens == (256,)
    ignoring = out_of(tok, max_tokens=3, ignore_eos=True)
    assert ignoring.push(256).finish == ""
    stop_id = out_of(tok, max_tokens=10, stop_token_ids=[ord("!")])
    assert stop_id.push(ord("!")).finish == STOP


def test_max_tokens_ends_with_length_and_flushes_what_was_held() -> None:
    tok = CharTokenizer(list("abcXYZ"))
    out = out_of(tok, max_tokens=2, stop=["XYZ"])
    out.push(tok.encode("a")[0])
    end = out.push(tok.encode("X")[0])
    assert end.finish == LENGTH and end.text == "X"
    with pytest.raises(RuntimeError):
        out.push(0)


def test_replaying_delivered_tokens_continues_exactly_where_the_first_run_was() -> None:
    tok = CharTokenizer(list("abcXYZ"))
    ids = tok.encode("abXacXYb")
    whole = out_of(tok, max_tokens=20, stop=["XYZ"])
    emits = [whole.push(t) for t in ids]
    # Cut after the third chunk that carried tokens, as a stream cut by a failure would be.
    carrying = [i for i, e in enumerate(emits) if e.tokens]
    cut = carrying[2] + 1
    delivered = [t for e in emits[:cut] for t in e.tokens]
    resumed = out_of(tok, max_tokens=20, stop=["XYZ"])
    resumed.replay(delivered)
    rest = [resumed.push(t) for t in ids[len(delivered):]]
    assert [(e.text, e.tokens) for e in rest] == [(e.text, e.tokens) for e in emits[cut:]]
