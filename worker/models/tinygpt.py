"""The built-in ``tinygpt`` demo: a small character-level transformer with greedy decoding.

Inputs ``{"prompt": str}`` (printable ASCII and newlines) plus ``max_tokens`` in the request's
params; a stream yields one chunk ``{"text": str}`` per generated character, and a plain
``infer`` answers ``{"text": str}`` with the whole continuation. Weights are seeded, so every
worker computes the same function and greedy decoding gives the same tokens everywhere: a
stream that moves to another world continues exactly.

The model is an ``nn.Sequential`` (embedding, transformer blocks, head), so it splits into
pipeline stages like any Sequential; the decode loop runs inside the world, with stage 0
extending the sequence and the last stage picking each token.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mesh.errors import BadRequest
from worker.handler import Handler, Request

VOCAB = ["\n", *[chr(c) for c in range(32, 127)]]
STOI = {ch: i for i, ch in enumerate(VOCAB)}
MAX_PROMPT_CHARS = 512
MAX_TOKENS_LIMIT = 256


class Embed(nn.Module):
    def __init__(self, vocab: int, block: int, dim: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(block, dim)
        self.block = block

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids[:, -self.block:]
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.tok(ids) + self.pos(pos)[None]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        shape = (b, t, self.heads, c // self.heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


def build_model(layers: int = 4, dim: int = 128, heads: int = 4, block: int = 256,
                seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(Embed(len(VOCAB), block, dim),
                              *[Block(dim, heads) for _ in range(layers)],
                              Head(dim, len(VOCAB)))
        # Larger than default init, so greedy decoding wanders instead of repeating one char.
        for p in model.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=1.5 / math.sqrt(p.shape[-1]))
    return model.eval()


def encode(text: str) -> list[int]:
    bad = sorted({ch for ch in text if ch not in STOI})
    if bad:
        raise BadRequest(f"prompt has characters outside printable ASCII: {bad[:5]!r}")
    return [STOI[ch] for ch in text]


class TinyGPTHandler(Handler):
    streaming = True

    def __init__(self, **model_kwargs: Any) -> None:
        self.model = build_model(**model_kwargs)
        self.device = "cpu"

    def setup(self, *, checkpoint: str, device: str, stage: int = 0, stages: int = 1,
              split_points: list[int] | None = None) -> None:
        from worker.stages import load_stage_state, stage_slice

        self.stage, self.stages = stage, stages
        if stages > 1:
            self.model, indices = stage_slice(self.model, stage, stages, split_points)
            if checkpoint:
                load_stage_state(self.model, checkpoint, indices)
        elif checkpoint:
            self.model.load_state_dict(torch.load(checkpoint, map_location="cpu",
                                                  weights_only=True))
        self.device = device
        self.model.to(device).eval()

    def input_spec(self) -> dict[str, Any]:
        return {"prompt": {"dtype": "str", "shape": [], "example": "hello",
                           "max_chars": MAX_PROMPT_CHARS}}

    def output_spec(self) -> dict[str, Any]:
        return {"text": {"dtype": "str", "shape": []}}  # one character a chunk; all, in infer

    def param_spec(self) -> dict[str, Any]:
        return {"max_tokens": {"type": "int", "min": 1, "max": MAX_TOKENS_LIMIT, "default": 16},
                "skip": {"type": "int", "min": 0, "max": "max_tokens", "default": 0}}

    def validate(self, inputs: dict[str, Any], params: dict[str, Any], kind: str = "infer") -> int:
        if set(inputs) != {"prompt"} or not isinstance(inputs["prompt"], str):
            raise BadRequest("inputs must be exactly {'prompt': str}")
        prompt = inputs["prompt"]
        if not prompt or len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest(f"prompt must have 1..{MAX_PROMPT_CHARS} characters")
        encode(prompt)
        max_tokens = params.get("max_tokens", 16)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) \
                or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
            raise BadRequest(f"max_tokens must be an integer in 1..{MAX_TOKENS_LIMIT}")
        skip = params.get("skip", 0)
        if isinstance(skip, bool) or not isinstance(skip, int) or not 0 <= skip <= max_tokens:
            raise BadRequest("skip must be an integer in 0..max_tokens")
        return 1

    def forward(self, tensors: dict[str, Any]) -> dict[str, Any]:
        with torch.inference_mode():
            return {"x": self.model(tensors["x"])}

    def gen_start(self, request: Request) -> dict[str, Any]:
        ids = torch.tensor([encode(request.inputs["prompt"])], dtype=torch.long,
                           device=self.device)
        return {"x": ids}

    def gen_pick(self, tensors: dict[str, Any]) -> list[int]:
        logits = tensors["x"][:, -1, :]
        return [int(i) for i in torch.argmax(logits, dim=-1).tolist()]

    def gen_chunk(self, token: int) -> dict[str, Any]:
        return {"text": VOCAB[token]}

    def gen_extend(self, tensors: dict[str, Any], tokens: list[int]) -> dict[str, Any]:
        ids = tensors["x"]
        nxt = torch.tensor(tokens, dtype=torch.long, device=ids.device)[:, None]
        return {"x": torch.cat([ids, nxt], dim=1)}


def build(**model_kwargs: Any) -> TinyGPTHandler:
    return TinyGPTHandler(**model_kwargs)


def generate(prompt: str, max_tokens: int, **model_kwargs: Any) -> str:
    """Reference greedy decoding in one process (what every world must reproduce)."""
    model = build_model(**model_kwargs)
    ids = torch.tensor([encode(prompt)], dtype=torch.long)
    out = []
    with torch.inference_mode():
        for _ in range(max_tokens):
            token = int(torch.argmax(model(ids)[:, -1, :], dim=-1))
            out.append(VOCAB[token])
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return "".join(out)
