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
from worker.generative import GenerativeHandler, StepBatch
from worker.kv_cache import KvLayout
from worker.tokenizers import CharTokenizer

VOCAB = ["\n", *[chr(c) for c in range(32, 127)]]
STOI = {ch: i for i, ch in enumerate(VOCAB)}
MAX_PROMPT_CHARS = 512
MAX_TOKENS_LIMIT = 256
CONTEXT = MAX_PROMPT_CHARS + MAX_TOKENS_LIMIT  # positions: the longest prompt, then its answer


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

    def step(self, x: torch.Tensor, batch: StepBatch, layer: int) -> torch.Tensor:
        """The block over a packed batch ``[tokens, dim]``, attending through the KV cache."""
        n, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=1)
        shape = (n, self.heads, c // self.heads)
        att = batch.attend(layer, q.view(shape), k.view(shape), v.view(shape))
        x = x + self.proj(att.reshape(n, c))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


def build_model(layers: int = 4, dim: int = 128, heads: int = 4, block: int = CONTEXT,
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


class TinyGPTHandler(GenerativeHandler):
    """tinygpt on the generative engine: one stage's slice of the Sequential, a step at a
    time over a packed batch (worker.generative)."""

    default_max_tokens = 16
    max_tokens_limit = MAX_TOKENS_LIMIT

    def __init__(self, **model_kwargs: Any) -> None:
        self.model = build_model(**model_kwargs)
        self.device = "cpu"
        self.tokenizer = CharTokenizer(VOCAB, name="printable ASCII")
        embed = self.model[0]
        assert isinstance(embed, Embed)
        self.max_context = embed.block
        first = next(m for m in self.model if isinstance(m, Block))
        self.heads = first.heads
        self.head_dim = first.qkv.in_features // first.heads

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

    def kv_layout(self) -> KvLayout:
        layers = sum(1 for m in self.model if isinstance(m, Block))
        return KvLayout(layers=layers, heads=self.heads, head_dim=self.head_dim)

    def input_spec(self) -> dict[str, Any]:
        return {"prompt": {"dtype": "str", "shape": [], "example": "hello",
                           "max_chars": MAX_PROMPT_CHARS}}

    def output_spec(self) -> dict[str, Any]:
        return {"text": {"dtype": "str", "shape": []}}  # one character a chunk; all, in infer

    def prompt_ids(self, inputs: dict[str, Any]) -> list[int]:
        ids = super().prompt_ids(inputs)
        if len(ids) > MAX_PROMPT_CHARS:
            raise BadRequest(f"prompt must have 1..{MAX_PROMPT_CHARS} characters")
        return ids

    def step(self, batch: StepBatch) -> torch.Tensor:
        with torch.inference_mode():
            x = batch.hidden
            layer = 0
            for child in self.model:
                if isinstance(child, Embed):
                    x = child.tok(batch.tokens) + child.pos(batch.positions)
                elif isinstance(child, Block):
                    x = child.step(x, batch, layer)
                    layer += 1
                else:
                    return child(x[batch.last_rows])
            return x


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
