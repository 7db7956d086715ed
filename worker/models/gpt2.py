"""The ``gpt2`` demo: the GPT-2 architecture in pure torch, on the generative engine.

With no ``checkpoint`` the weights are seeded (every worker computes the same function, no
download); with one, they come from a Hugging Face-layout ``model.safetensors`` (GPT-2's
tensor names, with or without the ``transformer.`` prefix; each stage reads only its own
tensors), and the sizes from the ``config.json`` beside it when there is one. Text goes
through a byte-level tokenizer by default (any UTF-8 in, token 256 ends the sequence), or a
``tokenizers`` JSON file given as the ``tokenizer`` factory option (``tokenizer.json`` of the
same model).

    [[deployments]]
    name = "gpt2"
    model = "worker.models.gpt2:build"
    stages = 2
    checkpoint = "models/gpt2/model.safetensors"          # optional
    factory_kwargs = { tokenizer = "models/gpt2/tokenizer.json" }

This module is also the worked example of docs/models.md: a generative handler is a model
whose every layer can run over a packed batch of token rows (``StepBatch``), with attention
through ``batch.attend``, plus a tokenizer and the size of its KV per token.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.generative import GenerativeHandler, StepBatch
from worker.kv_cache import KvLayout
from worker.loader_errors import LoadError
from worker.tokenizers import ByteTokenizer, JsonTokenizer, Tokenizer

DEFAULTS = {"n_layer": 4, "n_head": 4, "n_embd": 256, "n_positions": 1024, "vocab_size": 257,
            "layer_norm_epsilon": 1e-5}


class Embed(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg["vocab_size"], cfg["n_embd"])
        self.wpe = nn.Embedding(cfg["n_positions"], cfg["n_embd"])

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.wte(tokens) + self.wpe(positions)


class Attention(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        dim = cfg["n_embd"]
        self.heads = cfg["n_head"]
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, batch: StepBatch, layer: int) -> torch.Tensor:
        n, dim = x.shape
        q, k, v = self.c_attn(x).split(dim, dim=1)
        shape = (n, self.heads, dim // self.heads)
        out = batch.attend(layer, q.view(shape), k.view(shape), v.view(shape))
        return self.c_proj(out.reshape(n, dim))


class Block(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        dim, eps = cfg["n_embd"], cfg["layer_norm_epsilon"]
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(dim, 4 * dim))
        self.mlp.add_module("act", nn.GELU(approximate="tanh"))
        self.mlp.add_module("c_proj", nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, batch: StepBatch, layer: int) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), batch, layer)
        return x + self.mlp(self.ln_2(x))


class Head(nn.Module):
    def __init__(self, cfg: dict[str, Any], wte: nn.Embedding) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg["n_embd"], eps=cfg["layer_norm_epsilon"])
        self.lm_head = nn.Linear(cfg["n_embd"], cfg["vocab_size"], bias=False)
        self.lm_head.weight = wte.weight  # tied, as in GPT-2 (a checkpoint may untie them)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


def build_model(cfg: dict[str, Any], seed: int = 0) -> nn.Sequential:
    """Embed, the blocks, Head: a Sequential, so it splits into stages along its children."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        embed = Embed(cfg)
        model = nn.Sequential(embed, *[Block(cfg) for _ in range(cfg["n_layer"])],
                              Head(cfg, embed.wte))
        for name, p in model.named_parameters():
            if p.dim() == 2:
                # Wider than GPT-2's 0.02, so greedy decoding wanders instead of repeating.
                nn.init.normal_(p, std=1.5 / math.sqrt(p.shape[-1]))
            elif name.endswith("bias"):
                nn.init.zeros_(p)
    return model.eval()


def hf_names(model: nn.Sequential) -> dict[str, str]:
    """Every tensor of ``model`` (a whole model or one stage's slice, with the original child
    indices as names) and the GPT-2 checkpoint key it is read from."""
    out: dict[str, str] = {}
    for index, child in model.named_children():
        if isinstance(child, Embed):
            out[f"{index}.wte.weight"] = "wte.weight"
            out[f"{index}.wpe.weight"] = "wpe.weight"
        elif isinstance(child, Block):
            layer = int(index) - 1
            for name, _ in child.named_parameters():
                out[f"{index}.{name}"] = f"h.{layer}.{name}"
        elif isinstance(child, Head):
            out[f"{index}.ln_f.weight"] = "ln_f.weight"
            out[f"{index}.ln_f.bias"] = "ln_f.bias"
            out[f"{index}.lm_head.weight"] = "lm_head.weight"
    return out


# GPT-2 stores these as Conv1D, [in, out]: transposed against nn.Linear's [out, in].
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_safetensors(model: nn.Sequential, path: str) -> None:
    """Load this model's (or stage's) tensors from a GPT-2 ``model.safetensors``."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        prefix = "transformer." if any(k.startswith("transformer.") for k in keys) else ""
        params = dict(model.named_parameters(remove_duplicate=False))
        missing = []
        for ours, theirs in hf_names(model).items():
            key = prefix + theirs
            if theirs == "lm_head.weight":
                key = "lm_head.weight" if "lm_head.weight" in keys else prefix + "wte.weight"
            if key not in keys:
                missing.append(key)
                continue
            tensor = f.get_tensor(key)
            if theirs.endswith(_CONV1D):
                tensor = tensor.t()
            target = params[ours]
            if tuple(tensor.shape) != tuple(target.shape):
                raise LoadError(f"{key}: shape {list(tensor.shape)} does not fit "
                                f"{list(target.shape)}")
            with torch.no_grad():
                if theirs == "lm_head.weight":
                    # The head's own copy (it may be tied to wte, which another stage holds).
                    head = dict(model.named_modules())[ours.rsplit(".", 1)[0]]
                    assert isinstance(head, nn.Linear)
                    head.weight = nn.Parameter(tensor.clone(), requires_grad=False)
                else:
                    target.copy_(tensor)
        if missing:
            raise LoadError(f"{path} lacks {len(missing)} tensor(s) of this stage, e.g. "
                            f"{missing[:3]}")


def save_safetensors(model: nn.Sequential, path: str) -> None:
    """Write a whole model in GPT-2's layout (what a checkpoint from the hub looks like)."""
    from safetensors.torch import save_file

    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = {}
    for ours, theirs in hf_names(model).items():
        t = params[ours].detach()
        tensors[theirs] = (t.t() if theirs.endswith(_CONV1D) else t).contiguous().clone()
    save_file(tensors, path)


def read_config(checkpoint: str, overrides: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(DEFAULTS)
    if checkpoint:
        config = Path(checkpoint).with_name("config.json")
        if config.is_file():
            raw = json.loads(config.read_text())
            cfg.update({k: raw[k] for k in DEFAULTS if k in raw})
    cfg.update(overrides)
    return cfg


class GPT2Handler(GenerativeHandler):
    default_max_tokens = 16
    max_tokens_limit = 1024

    def __init__(self, *, tokenizer: str = "", seed: int = 0, **sizes: Any) -> None:
        unknown = set(sizes) - set(DEFAULTS)
        if unknown:
            raise LoadError(f"unknown gpt2 option(s) {sorted(unknown)}; known: tokenizer, "
                            f"seed, {', '.join(DEFAULTS)}")
        self._sizes = sizes
        self._seed = seed
        self._tokenizer_path = tokenizer
        self.device = "cpu"
        self.model: nn.Sequential | None = None
        self.tokenizer: Tokenizer = ByteTokenizer()

    def setup(self, *, checkpoint: str, device: str, stage: int = 0, stages: int = 1,
              split_points: list[int] | None = None) -> None:
        from worker.stages import stage_slice

        cfg = read_config(checkpoint, self._sizes)
        self.cfg = cfg
        if self._tokenizer_path:
            self.tokenizer = JsonTokenizer(self._tokenizer_path)
        if self.tokenizer.vocab_size > cfg["vocab_size"]:
            raise LoadError(f"the tokenizer has {self.tokenizer.vocab_size} tokens, the model "
                            f"{cfg['vocab_size']}")
        self.max_context = cfg["n_positions"]
        self.max_tokens_limit = min(self.max_tokens_limit, cfg["n_positions"] - 1)
        model = build_model(cfg, self._seed)
        self.stage, self.stages = stage, stages
        if stages > 1:
            model, _ = stage_slice(model, stage, stages, split_points)
        if checkpoint:
            if not checkpoint.endswith(".safetensors"):
                raise LoadError("the gpt2 demo reads a Hugging Face model.safetensors, got "
                                f"{checkpoint!r}")
            load_safetensors(model, checkpoint)
        self.model = model.to(device).eval()
        self.device = device

    def kv_layout(self) -> KvLayout:
        assert self.model is not None
        layers = sum(1 for m in self.model if isinstance(m, Block))
        heads = self.cfg["n_head"]
        return KvLayout(layers=layers, heads=heads, head_dim=self.cfg["n_embd"] // heads,
                        dtype=str(next(self.model.parameters()).dtype).removeprefix("torch."))

    def step(self, batch: StepBatch) -> torch.Tensor:
        assert self.model is not None
        with torch.inference_mode():
            x = batch.hidden
            layer = 0
            for child in self.model:
                if isinstance(child, Embed):
                    x = child(batch.tokens, batch.positions)
                elif isinstance(child, Block):
                    x = child(x, batch, layer)
                    layer += 1
                else:
                    return child(x[batch.last_rows])
            return x


def build(**options: Any) -> GPT2Handler:
    return GPT2Handler(**options)


def generate(model: nn.Sequential, ids: list[int], max_tokens: int) -> list[int]:
    """Reference greedy decoding by full recomputation, no cache (what a world must match)."""
    out: list[int] = []
    seq = list(ids)
    embed, *blocks, head = list(model)
    with torch.inference_mode():
        for _ in range(max_tokens):
            t = torch.tensor(seq)
            x = embed(t, torch.arange(len(seq)))
            for block in blocks:
                assert isinstance(block, Block)
                x = _full_block(block, x)
            token = int(head(x[-1:]).argmax(-1))
            out.append(token)
            seq.append(token)
    return out


def _full_block(block: Block, x: torch.Tensor) -> torch.Tensor:
    n, dim = x.shape
    heads = block.attn.heads
    h = block.ln_1(x)
    q, k, v = block.attn.c_attn(h).split(dim, dim=1)
    q, k, v = (z.view(n, heads, dim // heads).transpose(0, 1) for z in (q, k, v))
    att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + block.attn.c_proj(att.transpose(0, 1).reshape(n, dim))
    return x + block.mlp(block.ln_2(x))


