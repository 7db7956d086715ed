"""The handler interface of generative models, and the packed batch the engine hands them.

A generative model subclasses ``GenerativeHandler``. The engine (worker.gen_stage) owns the
sequences, their KV cache and the sampling; the handler only computes. Each iteration it gets
one ``StepBatch``: a micro-batch of sequences packed along one token axis, each contributing
a chunk of consecutive positions (one token when it decodes, a slice of its prompt when it
prefills), and returns

* on every stage but the last: hidden states ``[tokens, hidden]`` for the next stage;
* on the last stage: logits ``[batch.sample_rows.numel(), vocab]``, one row for each sequence
  that samples this step (``batch.last_rows`` picks them out of the packed axis).

Stage 0 reads ``batch.tokens`` (token ids ``[tokens]``), later stages ``batch.hidden``; every
stage has ``batch.positions`` ``[tokens]``. Attention goes through ``batch.attend(layer, q, k,
v)`` (``q`` ``[tokens, heads, head_dim]``, ``k``/``v`` ``[tokens, kv_heads, head_dim]``): it
appends this chunk's keys and values to each sequence's cache and attends causally over
everything the sequence holds. ``layer`` counts this stage's attention layers from 0, up to
``kv_layout().layers``.

Linear layers see the whole packed batch at once (Orca's selective batching); attention runs
per sequence. A complete example is ``worker/models/gpt2.py``; docs/models.md walks through
it. The hooks, and where they run:

    tokenizer                               the model's (worker.tokenizers.Tokenizer)
    max_context                             positions a sequence may reach (prompt + output)
    kv_layout() -> KvLayout                 every stage: what one token's KV takes here
    step(batch) -> tensor                   every stage: this stage's part of the model
    prompt_ids(inputs) -> [int]             stage 0: the request's prompt as token ids
    chat_prompt(messages) -> str            the HTTP gateway's chat completions

A handler is shared by every world of its worker that serves the deployment: it must keep no
per-sequence state (the engine keeps that per world).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mesh.errors import BadRequest
from worker.handler import Handler
from worker.kv_cache import KvLayout, SeqKv
from worker.sampling import Resume, SamplingParams, parse
from worker.tokenizers import Tokenizer

MAX_PROMPT_CHARS = 1 << 20


@dataclass(frozen=True, slots=True)
class GenRequest:
    """A generative request as stage 0 admits it."""

    prompt: list[int]
    params: SamplingParams
    resume: Resume


class GenerativeHandler(Handler):
    streaming = True
    generative = True
    # Subclasses set these (in the constructor or in setup).
    tokenizer: Tokenizer
    device: str = "cpu"
    max_context: int = 1024
    default_max_tokens = 16
    max_tokens_limit = 4096

    def kv_layout(self) -> KvLayout:
        raise NotImplementedError

    def step(self, batch: StepBatch) -> Any:
        raise NotImplementedError

    # -- requests (stage 0) ---------------------------------------------------------------

    def prompt_ids(self, inputs: dict[str, Any]) -> list[int]:
        """The prompt of ``{"prompt": str}``, or of a chat ``{"messages": [{"role",
        "content"}, ...]}`` through ``chat_prompt``; override for other inputs."""
        if set(inputs) == {"messages"}:
            prompt = self.chat_prompt(chat_messages(inputs["messages"]))
        elif set(inputs) != {"prompt"} or not isinstance(inputs["prompt"], str):
            raise BadRequest("inputs must be exactly {'prompt': str} or {'messages': [...]}")
        else:
            prompt = inputs["prompt"]
        if not prompt:
            raise BadRequest("prompt must not be empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest(f"prompt has {len(prompt)} characters, the limit is "
                             f"{MAX_PROMPT_CHARS}")
        return self.tokenizer.encode(prompt)

    def parse_request(self, inputs: dict[str, Any], params: dict[str, Any]) -> GenRequest:
        prompt = self.prompt_ids(inputs)
        sampling, resume = parse(params, vocab_size=self.tokenizer.vocab_size,
                                 max_tokens_limit=self.max_tokens_limit,
                                 default_max_tokens=self.default_max_tokens)
        if not prompt:
            raise BadRequest("the prompt encodes to no tokens")
        total = len(prompt) + sampling.max_tokens
        if total > self.max_context:
            raise BadRequest(f"prompt ({len(prompt)} tokens) + max_tokens "
                             f"({sampling.max_tokens}) = {total} exceeds the model's context "
                             f"of {self.max_context} tokens")
        return GenRequest(prompt, sampling, resume)

    def validate(self, inputs: dict[str, Any], params: dict[str, Any], kind: str = "infer") -> int:
        if kind not in ("infer", "stream"):
            raise BadRequest(f"this model answers 'infer' and 'stream' requests, not {kind!r}")
        self.parse_request(inputs, params)
        return 1

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt of a chat (``[{"role", "content"}, ...]``): by default one line per
        message, ``role: content``, then ``assistant:`` for the answer."""
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join([*lines, "assistant:"])

    # -- description ----------------------------------------------------------------------

    def input_spec(self) -> dict[str, Any]:
        return {"prompt": {"dtype": "str", "shape": [], "example": "hello"}}

    def output_spec(self) -> dict[str, Any]:
        return {"text": {"dtype": "str", "shape": []}}

    def param_spec(self) -> dict[str, Any]:
        return {
            "max_tokens": {"type": "int", "min": 1, "max": self.max_tokens_limit,
                           "default": self.default_max_tokens},
            "temperature": {"type": "float", "min": 0.0, "default": 0.0},
            "top_p": {"type": "float", "min": 0.0, "max": 1.0, "default": 1.0},
            "top_k": {"type": "int", "min": 0, "default": 0},
            "seed": {"type": "int", "min": 0},
            "stop": {"type": "list[str]"},
            "stop_token_ids": {"type": "list[int]"},
            "ignore_eos": {"type": "bool", "default": False},
            "resume": {"type": "map"},
        }

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["generative"] = True
        out["max_context"] = self.max_context
        out["vocab_size"] = self.tokenizer.vocab_size
        return out


MAX_MESSAGES = 1024


def chat_messages(value: Any) -> list[dict[str, str]]:
    """A chat's messages, checked: ``role`` and ``content`` strings (a content given as a list
    of ``{"type": "text", "text": ...}`` parts is joined)."""
    if not isinstance(value, list) or not 0 < len(value) <= MAX_MESSAGES:
        raise BadRequest(f"messages must be a list of 1..{MAX_MESSAGES} messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be a map with a 'role' string")
        content = message.get("content", "")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise BadRequest(f"messages[{i}].content parts must be text parts")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        out.append({"role": message["role"], "content": content})
    return out


@dataclass(frozen=True, slots=True)
class SeqSlice:
    """One sequence's chunk in a packed batch: rows ``start .. start + n`` of the token axis,
    positions ``pos .. pos + n``, and its cache on this stage."""

    sid: int
    start: int
    n: int
    pos: int
    kv: SeqKv


class StepBatch:
    """One micro-batch as a stage's handler sees it."""

    __slots__ = ("_sdpa", "_torch", "hidden", "last_rows", "positions", "seqs", "tokens")

    def __init__(self, *, seqs: list[SeqSlice], positions: Any, last_rows: Any,
                 tokens: Any = None, hidden: Any = None) -> None:
        import torch

        self._torch = torch
        self._sdpa = torch.nn.functional.scaled_dot_product_attention
        self.seqs = seqs
        self.positions = positions
        self.last_rows = last_rows
        self.tokens = tokens
        self.hidden = hidden

    def attend(self, layer: int, q: Any, k: Any, v: Any) -> Any:
        """Append ``k``/``v`` to each sequence's cache at its positions and attend causally;
        returns ``[tokens, heads, head_dim]``.

        One sequence at a time (their lengths differ), so the cost per sequence is a handful
        of tensor calls: the batch is transposed once to ``[heads, tokens, head_dim]`` and
        each sequence takes views of it, writes its new keys and values with one copy each,
        and attends over a view of its cache; the outputs are joined in one call."""
        torch = self._torch
        sdpa = self._sdpa
        qt = q.transpose(0, 1).unsqueeze(0)  # [1, heads, tokens, head_dim]
        kt = k.transpose(0, 1).unsqueeze(0)
        vt = v.transpose(0, 1).unsqueeze(0)
        gqa = q.shape[1] != k.shape[1]
        outs = []
        for s in self.seqs:
            a, b, pos, end = s.start, s.start + s.n, s.pos, s.pos + s.n
            kv = s.kv
            kl = kv.k[layer]
            vl = kv.v[layer]
            kl[:, :, pos:end] = kt[:, :, a:b]
            vl[:, :, pos:end] = vt[:, :, a:b]
            if end > kv.length:
                kv.length = end
            if s.n == 1:
                outs.append(sdpa(qt[:, :, a:b], kl[:, :, :end], vl[:, :, :end], enable_gqa=gqa))
            elif pos == 0:
                outs.append(sdpa(qt[:, :, a:b], kl[:, :, :end], vl[:, :, :end], is_causal=True,
                                 enable_gqa=gqa))
            else:
                rows = torch.arange(pos, end, device=q.device)[:, None]
                cols = torch.arange(end, device=q.device)[None, :]
                outs.append(sdpa(qt[:, :, a:b], kl[:, :, :end], vl[:, :, :end],
                                 attn_mask=cols <= rows, enable_gqa=gqa))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return out[0].transpose(0, 1)
