"""Iteration-level scheduling of one world's sequences, at rank 0 (no threads, no I/O).

Every iteration ``plan`` forms one micro-batch: for each sequence it picks, the next chunk of
its tokens to run through the model. Within ``max_batch_tokens`` tokens, in this order:

1. running sequences that decode (one token each), oldest admitted first; a world of S stages
   keeps S micro-batches in flight, so each takes about a 1/S share of the running sequences
   and the pipeline never waits for the one ahead of it;
2. the next chunk of a prefill under way (chunked prefill: a long prompt never stalls the
   running decodes, it shares what the budget leaves them);
3. new sequences from the waiting line, while fewer than ``max_seqs`` run.

A sequence is in at most one micro-batch at a time (its next input is the token the last one
produces). KV memory is counted in blocks against the world's budget (the smallest stage's:
worker.kv_cache). When a running sequence needs a block and none is free, the most recently
admitted sequence not in flight is preempted: its KV is dropped on every stage and it waits
again, at the head of the line, to be prefilled anew with its prompt and the tokens it has
generated (recompute; nothing it sent is sent again). New sequences never preempt.

A sequence ends when the last stage says it finished, when it is cancelled or passes its
deadline, or when its computation failed; its blocks are freed at once here, and the later
stages are told in the next micro-batch (``Plan.frees``), or in one of its own if nothing else
is due. The plan's sequences come back through ``returned`` with the tokens the last stage
sampled.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from worker.kv_cache import BLOCK_TOKENS, blocks_for
from worker.sampling import Resume, SamplingParams


@dataclass(eq=False)
class Seq:
    """One sequence of a world: a generative request from admission to its end."""

    sid: int
    token: Any  # what rank 0 needs to answer it: (controller request id, client id)
    kind: str  # "stream" or "infer"
    prompt_len: int
    tokens: list[int]  # prompt, then every generated token (resumed ones included)
    params: SamplingParams
    resume: Resume
    arrived_s: float
    deadline_s: float
    generated: int = 0  # generated tokens, resumed ones included
    computed: int = 0  # leading tokens whose KV every stage holds
    blocks: int = 0  # KV blocks held (in the world budget)
    admitted: int = -1  # admission order, -1 while waiting
    in_flight: bool = False
    joined: bool = False  # the later stages know it (its sampling and reply details)
    ended: str = ""  # why it ended, once it has

    @property
    def remaining(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return len(self.tokens) - self.computed


@dataclass(frozen=True, slots=True)
class Chunk:
    seq: Seq
    start: int  # position of the chunk's first token
    n: int
    sample: bool  # the chunk ends the known tokens: the last stage picks the next one


@dataclass(slots=True)
class Plan:
    step: int
    chunks: list[Chunk] = field(default_factory=list)
    joins: list[Seq] = field(default_factory=list)  # new to the later stages
    frees: list[int] = field(default_factory=list)  # ended: later stages drop KV and state
    preempts: list[int] = field(default_factory=list)  # later stages drop KV, keep state

    @property
    def tokens(self) -> int:
        return sum(c.n for c in self.chunks)


class Scheduler:
    def __init__(self, *, max_seqs: int, max_batch_tokens: int, total_blocks: int,
                 stages: int = 1, block_tokens: int = BLOCK_TOKENS,
                 clock: Callable[[], float]) -> None:
        self.max_seqs = max_seqs
        self.max_batch_tokens = max_batch_tokens
        self.total_blocks = total_blocks
        self.block_tokens = block_tokens
        self.stages = stages
        self._clock = clock
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []  # admission order
        self.in_flight: deque[Plan] = deque()
        self.used_blocks = 0
        self.preemptions = 0
        self._steps = itertools.count()
        self._admissions = itertools.count()
        self._frees: list[int] = []
        self._preempts: list[int] = []

    # -- what is held ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def seqs(self) -> Iterator[Seq]:
        yield from self.running
        yield from self.waiting

    @property
    def capacity_tokens(self) -> int:
        """The most positions one sequence can ever hold in this world."""
        return self.total_blocks * self.block_tokens

    @property
    def busy(self) -> bool:
        """Something to run, in flight, or to tell the later stages."""
        return bool(self.waiting or self.running or self.in_flight or self._frees
                    or self._preempts)

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    # -- planning -------------------------------------------------------------------------

    def can_plan(self) -> bool:
        return len(self.in_flight) < self.stages

    def plan(self) -> Plan | None:
        """The next micro-batch, or None when nothing can run now (every schedulable
        sequence is in flight, or the pipeline is full)."""
        if not self.can_plan():
            return None
        plan = Plan(next(self._steps))
        budget = self.max_batch_tokens
        share = -(-len(self.running) // self.stages) if self.running else 0
        decodes = 0
        for seq in list(self.running):
            if budget <= 0 or decodes >= share:
                break
            if seq.in_flight or seq.ended or seq.remaining != 1 or seq.admitted < 0:
                continue
            if self._make_room(seq, seq.computed + 1):
                plan.chunks.append(Chunk(seq, seq.computed, 1, True))
                seq.in_flight = True
                budget -= 1
                decodes += 1
        for seq in self.running:
            if budget <= 0:
                break
            if seq.in_flight or seq.ended or seq.remaining <= 1:
                continue
            n = self._fit(seq, min(seq.remaining, budget))
            if n > 0:
                plan.chunks.append(Chunk(seq, seq.computed, n, seq.computed + n == len(seq.tokens)))
                seq.in_flight = True
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            # A block of headroom for each running sequence, so admitting this one does not
            # force a preemption at their next block.
            n = self._fit(seq, min(seq.remaining, budget), keep_free=len(self.running))
            if n <= 0:
                break
            self.waiting.popleft()
            seq.admitted = next(self._admissions)
            self.running.append(seq)
            if not seq.joined:
                seq.joined = True
                plan.joins.append(seq)
            plan.chunks.append(Chunk(seq, seq.computed, n, seq.computed + n == len(seq.tokens)))
            seq.in_flight = True
            budget -= n
        plan.frees, self._frees = self._frees, []
        plan.preempts, self._preempts = self._preempts, []
        if not plan.chunks and not plan.frees and not plan.preempts:
            return None
        self.in_flight.append(plan)
        return plan

    def _fit(self, seq: Seq, want: int, keep_free: int = 0) -> int:
        """How many of ``want`` more tokens of ``seq`` fit in the free blocks, leaving
        ``keep_free`` of them (reserved)."""
        have = seq.blocks * self.block_tokens - seq.computed
        if want <= have:
            return want
        free = max(0, self.total_blocks - self.used_blocks - keep_free)
        can = min(want, have + free * self.block_tokens)
        if can <= 0:
            return 0
        self._grow(seq, seq.computed + can)
        return can

    def _make_room(self, seq: Seq, tokens: int) -> bool:
        """Reserve blocks for ``seq`` to hold ``tokens`` positions, preempting the latest
        admitted sequences not in flight if need be; False when even that is not enough."""
        need = blocks_for(tokens, self.block_tokens) - seq.blocks
        while need > self.total_blocks - self.used_blocks:
            victim = next((s for s in reversed(self.running)
                           if s is not seq and not s.in_flight and not s.ended), None)
            if victim is None:
                return False
            self._preempt(victim)
        self._grow(seq, tokens)
        return True

    def _grow(self, seq: Seq, tokens: int) -> None:
        blocks = blocks_for(tokens, self.block_tokens)
        if blocks > seq.blocks:
            self.used_blocks += blocks - seq.blocks
            seq.blocks = blocks

    def _preempt(self, seq: Seq) -> None:
        self.running.remove(seq)
        self.used_blocks -= seq.blocks
        seq.blocks = 0
        seq.computed = 0
        seq.admitted = -1
        self.waiting.appendleft(seq)
        self._preempts.append(seq.sid)
        self.preemptions += 1

    # -- results --------------------------------------------------------------------------

    def returned(self, step: int, sampled: dict[int, tuple[int, bool]],
                 failed: tuple[int, ...] | list[int] = ()) -> list[Seq]:
        """The last stage's answer to micro-batch ``step``: for each sequence that sampled,
        ``(token, finished)``; ``failed``: sequences a later stage failed (and answered).
        Returns the sequences that ended with it (answered by a later stage)."""
        if not self.in_flight or self.in_flight[0].step != step:
            expected = self.in_flight[0].step if self.in_flight else None
            raise ValueError(f"tokens for micro-batch {step}, expected {expected}")
        plan = self.in_flight.popleft()
        ended: list[Seq] = []
        for chunk in plan.chunks:
            seq = chunk.seq
            seq.in_flight = False
            if seq.ended:
                self._release(seq)  # ended while in flight: its KV goes now
                continue
            if seq.sid in failed:
                seq.ended = "failed"
                self._release(seq)
                ended.append(seq)
                continue
            seq.computed = chunk.start + chunk.n
            if not chunk.sample:
                continue
            token, finished = sampled.get(seq.sid, (-1, True))
            if finished:
                seq.ended = "finished"
                self._release(seq)
                ended.append(seq)
                continue
            seq.tokens.append(token)
            seq.generated += 1
        return ended

    def end(self, seq: Seq, why: str) -> None:
        """End a sequence now (cancelled, past its deadline, failed); its KV is freed at once
        or, while it is in flight, when its micro-batch comes back."""
        if seq.ended:
            return
        seq.ended = why
        if seq.in_flight:
            return
        if seq in self.running:
            self._release(seq)
        else:
            self._forget_waiting(seq)

    def _forget_waiting(self, seq: Seq) -> None:
        try:
            self.waiting.remove(seq)
        except ValueError:
            return
        if seq.joined:
            self._frees.append(seq.sid)  # a preempted sequence: the last stage holds its state

    def _release(self, seq: Seq) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.used_blocks -= seq.blocks
        seq.blocks = 0
        if seq.joined:
            self._frees.append(seq.sid)

    def expire(self, now_s: float) -> list[Seq]:
        """Sequences past their deadline, ended here (the caller answers them)."""
        late = [s for s in self.seqs() if not s.ended and s.deadline_s <= now_s]
        for seq in late:
            self.end(seq, "deadline")
        return late

    def abandon(self) -> list[Seq]:
        """Every sequence not ended, ended (the world is closing)."""
        left = [s for s in self.seqs() if not s.ended]
        for seq in left:
            seq.ended = "closed"
        self.waiting.clear()
        self.running.clear()
        self.in_flight.clear()
        self.used_blocks = 0
        self._frees.clear()
        self._preempts.clear()
        return left
