"""Sampling parameters of a generative request, and the sampler that honours them.

``parse`` turns a request's ``params`` into a ``SamplingParams`` once, at stage 0, where every
bad value is a ``BadRequest`` naming the limit it broke; the record then travels down the
world with its sequence and the last stage samples with it (``sample``).

Sampling is reproducible by construction: the token at position ``n`` of a sequence (its n-th
generated token, counted from 0) is drawn from a generator seeded by ``(seed, n)`` alone. So a
seed gives the same text every time, whatever else shares the batch, and a stream resumed on
another world after ``n`` delivered tokens draws token ``n`` exactly as the first world would
have (``Resume``). A request that samples without a seed gets a random one at admission.
Temperature 0 is greedy (argmax), as in OpenAI's and vLLM's APIs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mesh.errors import BadRequest

# Keys a generative request's ``params`` may hold; any other is refused by name.
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                 "stop_token_ids", "ignore_eos", "resume")
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 128
MAX_STOP_TOKEN_IDS = 64
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63 - 1
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0: no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the text ends before the first of these
    stop_token_ids: tuple[int, ...] = ()  # the stream ends on one of these (not shown)
    ignore_eos: bool = False  # keep generating past the end-of-sequence token

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_wire(self) -> list[Any]:
        return [self.max_tokens, self.temperature, self.top_p, self.top_k, self.seed,
                list(self.stop), list(self.stop_token_ids), self.ignore_eos]

    @classmethod
    def from_wire(cls, wire: list[Any]) -> SamplingParams:
        max_tokens, temperature, top_p, top_k, seed, stop, stop_ids, ignore_eos = wire
        return cls(int(max_tokens), float(temperature), float(top_p), int(top_k),
                   None if seed is None else int(seed), tuple(str(s) for s in stop),
                   tuple(int(t) for t in stop_ids), bool(ignore_eos))


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a re-sent stream continues: the tokens its client already has (they are
    prefilled after the prompt, not generated again) and the chunks they came in."""

    tokens: tuple[int, ...] = ()
    chunks: int = 0


def _int(params: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"{key} must be an integer in {lo}..{hi}, got {_show(value)}")
    return value


def _float(params: dict[str, Any], key: str, default: float) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value):
        raise BadRequest(f"{key} must be a finite number, got {_show(value)}")
    return float(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def parse(params: dict[str, Any], *, vocab_size: int, max_tokens_limit: int,
          default_max_tokens: int = 16) -> tuple[SamplingParams, Resume]:
    """A request's sampling parameters and resume point, checked; BadRequest names the key
    and its limit."""
    unknown = sorted(str(k) for k in params if k not in SAMPLING_KEYS)
    if unknown:
        raise BadRequest(f"unknown parameter {_show(unknown[0])}; this model reads "
                         f"{', '.join(SAMPLING_KEYS)}")
    max_tokens = _int(params, "max_tokens", default_max_tokens, 1, max_tokens_limit)
    temperature = _float(params, "temperature", 0.0)
    if not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise BadRequest(f"temperature must lie in [0, {MAX_TEMPERATURE:g}] (0: greedy), got "
                         f"{temperature:g}")
    top_p = _float(params, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"top_p must lie in (0, 1], got {top_p:g}")
    top_k = _int(params, "top_k", 0, 0, 1_000_000)
    seed = params.get("seed")
    if seed is not None:
        seed = _int(params, "seed", 0, 0, MAX_SEED)
    stop = params.get("stop", ())
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list | tuple) or len(stop) > MAX_STOP_STRINGS or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise BadRequest(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} "
                         f"non-empty strings of at most {MAX_STOP_CHARS} characters")
    stop_ids = params.get("stop_token_ids", ())
    if not isinstance(stop_ids, list | tuple) or len(stop_ids) > MAX_STOP_TOKEN_IDS or not all(
            type(t) is int and 0 <= t < vocab_size for t in stop_ids):
        raise BadRequest(f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token "
                         f"ids in 0..{vocab_size - 1}")
    ignore_eos = params.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest("ignore_eos must be true or false")
    resume = _resume(params.get("resume"), vocab_size, max_tokens)
    return (SamplingParams(max_tokens, temperature, top_p, top_k, seed, tuple(stop),
                           tuple(stop_ids), ignore_eos), resume)


def _resume(value: Any, vocab_size: int, max_tokens: int) -> Resume:
    if value is None:
        return Resume()
    if not isinstance(value, dict) or set(value) - {"tokens", "chunks"}:
        raise BadRequest("resume must be a map {tokens: [token ids], chunks: int}")
    tokens = value.get("tokens", [])
    chunks = value.get("chunks", 0)
    if not isinstance(tokens, list | tuple) or len(tokens) >= max_tokens or not all(
            type(t) is int and 0 <= t < vocab_size for t in tokens):
        raise BadRequest(f"resume.tokens must be fewer than max_tokens ({max_tokens}) token "
                         f"ids in 0..{vocab_size - 1}")
    if type(chunks) is not int or not 0 <= chunks <= len(tokens):
        raise BadRequest("resume.chunks must be an integer in 0..len(resume.tokens)")
    return Resume(tuple(tokens), chunks)


def mix_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed for one position of a seeded sequence (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & MAX_SEED


def sample(logits: Any, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """One token per row of ``logits`` [rows, vocab]: greedy rows by one argmax, the others
    each from its own seeded draw (``positions``: each row's generated-token index)."""
    import torch

    rows = len(params)
    out = [0] * rows
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if len(greedy) == rows:
        return [int(t) for t in torch.argmax(logits, dim=-1).tolist()]
    if greedy:
        picked = torch.argmax(logits[greedy], dim=-1).tolist()
        for i, t in zip(greedy, picked, strict=True):
            out[i] = int(t)
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = _draw(logits[i].float(), p, positions[i], torch)
    return out


def _draw(row: Any, p: SamplingParams, position: int, torch: Any) -> int:
    row = row / p.temperature
    if 0 < p.top_k < row.shape[-1]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, -math.inf)
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= p.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    generator = torch.Generator().manual_seed(mix_seed(p.seed or 0, position))
    return int(torch.multinomial(probs, 1, generator=generator))
