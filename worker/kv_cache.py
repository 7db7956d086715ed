"""The KV cache of one stage of one world: keys and values of every sequence it decodes.

Owned by the world membership, not the handler: a worker shares a stage's weights between
the worlds it belongs to, but each world decodes its own sequences. Each sequence holds one
pair of tensors ``[layers, kv_heads, capacity, head_dim]``, contiguous and grown a block of
``block_tokens`` positions at a time; memory is accounted in those blocks against the stage's
budget (``kv_cache_mb``), so a paged layout can replace the storage later without changing
who decides what fits. Rank 0's scheduler (worker.gen_scheduler) keeps the whole world under
the smallest stage's budget, so ``reserve`` here never has to refuse: if it must, the world's
stages disagree, which is a bug, not a load.

Why not pages? On a CPU, attention gathered from a block table in pure torch costs several
times a contiguous sequence's (docs/benchmarks.md); contiguous tensors grown by copying cost
one copy per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BLOCK_TOKENS = 16
MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class KvLayout:
    """What one stage keeps per token: ``layers`` of keys and values of ``heads`` x
    ``head_dim`` elements of ``dtype`` (a torch dtype name, e.g. "float32")."""

    layers: int
    heads: int
    head_dim: int
    dtype: str = "float32"

    @property
    def bytes_per_token(self) -> int:
        import torch

        size = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return 2 * self.layers * self.heads * self.head_dim * size


def blocks_for(tokens: int, block_tokens: int = BLOCK_TOKENS) -> int:
    return -(-tokens // block_tokens)


def budget_blocks(budget_bytes: int, bytes_per_token: int,
                  block_tokens: int = BLOCK_TOKENS) -> int:
    """Blocks of ``block_tokens`` positions that fit in ``budget_bytes``."""
    if bytes_per_token <= 0:
        return 1 << 40  # a stage that keeps nothing per token never limits the world
    return budget_bytes // (bytes_per_token * block_tokens)


class KvFull(RuntimeError):
    """A stage was asked to hold more than its budget (the world's stages disagree)."""


class SeqKv:
    """One sequence's keys and values on this stage, ``length`` positions written: per layer,
    a ``[1, kv_heads, capacity, head_dim]`` view (``k[layer]``) of one tensor per sequence,
    held in a list so attention reaches a layer's cache without indexing a tensor (and 4-d,
    the shape torch's fused CPU attention takes; 3-d inputs fall back to a slower path)."""

    __slots__ = ("capacity", "k", "keys", "length", "v", "values")

    def __init__(self, keys: Any, values: Any) -> None:
        self.keys = keys  # [layers, kv_heads, capacity, head_dim]
        self.values = values
        self.k = list(keys.unsqueeze(1).unbind(0))
        self.v = list(values.unsqueeze(1).unbind(0))
        self.capacity = int(keys.shape[2])
        self.length = 0


class KvCache:
    def __init__(self, layout: KvLayout, *, budget_bytes: int, device: Any,
                 block_tokens: int = BLOCK_TOKENS) -> None:
        import torch

        self._torch = torch
        self.layout = layout
        self.device = device
        self.block_tokens = block_tokens
        self.bytes_per_block = layout.bytes_per_token * block_tokens
        self.total_blocks = budget_blocks(budget_bytes, layout.bytes_per_token, block_tokens)
        self.budget_bytes = budget_bytes
        self.used_blocks = 0
        self._dtype = getattr(torch, layout.dtype)
        self._seqs: dict[int, SeqKv] = {}

    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, sid: int) -> bool:
        return sid in self._seqs

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * self.bytes_per_block

    def get(self, sid: int) -> SeqKv:
        return self._seqs[sid]

    def reserve(self, sid: int, tokens: int) -> SeqKv:
        """The sequence's storage, grown (by whole blocks) to hold ``tokens`` positions."""
        kv = self._seqs.get(sid)
        have = kv.capacity if kv is not None else 0
        if tokens <= have and kv is not None:
            return kv
        blocks = blocks_for(tokens, self.block_tokens)
        extra = blocks - have // self.block_tokens
        if self.used_blocks + extra > self.total_blocks:
            free = self.total_blocks - self.used_blocks
            raise KvFull(f"sequence {sid} needs {extra} more KV blocks, {free} of "
                         f"{self.total_blocks} are free")
        layout = self.layout
        shape = (layout.layers, layout.heads, blocks * self.block_tokens, layout.head_dim)
        k = self._torch.empty(shape, dtype=self._dtype, device=self.device)
        v = self._torch.empty(shape, dtype=self._dtype, device=self.device)
        grown = SeqKv(k, v)
        if kv is not None and kv.length:
            n = kv.length
            k[:, :, :n].copy_(kv.keys[:, :, :n])
            v[:, :, :n].copy_(kv.values[:, :, :n])
            grown.length = n
        self._seqs[sid] = grown
        self.used_blocks += extra
        return grown

    def free(self, sid: int) -> None:
        """Drop a sequence's keys and values (idempotent)."""
        kv = self._seqs.pop(sid, None)
        if kv is not None:
            self.used_blocks -= kv.capacity // self.block_tokens

    def clear(self) -> None:
        self._seqs.clear()
        self.used_blocks = 0
