"""The built-in ``mlp`` demo: float32 [B, 64] -> float32 [B, 10], deterministic weights.

Wide enough (hidden 3072, 19M parameters) that a forward pass costs milliseconds on a CPU, so
batching and pipelining have something to win; built as an ``nn.Sequential`` so it splits into
stages along its children.
"""

from __future__ import annotations

import torch
from torch import nn

IN_FEATURES = 64
OUT_FEATURES = 10


def build(hidden: int = 3072, layers: int = 3, seed: int = 0) -> nn.Sequential:
    """Same seed, same weights, in every process (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mods: list[nn.Module] = [nn.Linear(IN_FEATURES, hidden), nn.ReLU()]
        for _ in range(layers - 1):
            mods += [nn.Linear(hidden, hidden), nn.ReLU()]
        mods.append(nn.Linear(hidden, OUT_FEATURES))
        return nn.Sequential(*mods).eval()
