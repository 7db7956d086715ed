"""Unit tests for worker/gen_scheduler.py: iteration-level scheduling on hand-made sequences,
with a fake clock and the last stage played by the test (no model, no process)."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.testing.clock import FakeClock
from worker.gen_scheduler import Plan, Scheduler, Seq
from worker.sampling import Resume, SamplingParams

BLOCK = 4


def seq(sid: int, prompt: int, *, max_tokens: int = 8, deadline_s: float = 1e9) -> Seq:
    return Seq(sid, (sid, f"c{sid}"), "stream", prompt, list(range(prompt)),
               SamplingParams(max_tokens=max_tokens), Resume(), 0.0, deadline_s)


def make(*, max_seqs: int = 8, max_batch_tokens: int = 64, blocks: int = 100,
         stages: int = 1) -> Scheduler:
    return Scheduler(max_seqs=max_seqs, max_batch_tokens=max_batch_tokens, total_blocks=blocks,
                     stages=stages, block_tokens=BLOCK, clock=FakeClock())


def back(s: Scheduler, plan: Plan, token: int = 7, finished: tuple[int, ...] = ()) -> list[Seq]:
    """The last stage's answer: every sampling sequence gets ``token``."""
    sampled = {c.seq.sid: (token, c.seq.sid in finished) for c in plan.chunks if c.sample}
    return s.returned(plan.step, sampled)


def chunks_of(plan: Plan) -> list[tuple[int, int, int, bool]]:
    return [(c.seq.sid, c.start, c.n, c.sample) for c in plan.chunks]


def test_a_new_sequence_is_prefilled_then_decodes_one_token_a_step() -> None:
    s = make()
    a = seq(1, 5)
    s.add(a)
    plan = s.plan()
    assert plan is not None and chunks_of(plan) == [(1, 0, 5, True)]
    assert [j.sid for j in plan.joins] == [1]
    assert s.plan() is None  # its only sequence is in flight
    back(s, plan, token=42)
    assert a.tokens[-1] == 42 and a.generated == 1 and a.computed == 5
    plan = s.plan()
    assert plan is not None and chunks_of(plan) == [(1, 5, 1, True)] and plan.joins == []


def test_running_decodes_go_first_and_a_long_prompt_is_prefilled_in_chunks_beside_them(
        ) -> None:
    s = make(max_batch_tokens=10)
    for sid in (1, 2, 3):
        s.add(seq(sid, 2))
    first = s.plan()
    assert first is not None and [c[2] for c in chunks_of(first)] == [2, 2, 2]
    back(s, first)
    s.add(seq(9, 30))  # a long prompt arrives
    sizes = []
    for _ in range(4):
        plan = s.plan()
        assert plan is not None
        got = chunks_of(plan)
        # The three decodes are always there, first; the prompt takes what is left.
        assert [c[0] for c in got[:3]] == [1, 2, 3] and all(c[2] == 1 for c in got[:3])
        assert plan.tokens <= 10
        sizes.append(got[3][2] if len(got) > 3 else 0)
        back(s, plan)
    assert sizes == [7, 7, 7, 7]  # 30 tokens in chunks of 7 ...
    plan = s.plan()
    assert plan is not None and chunks_of(plan)[3] == (9, 28, 2, True)  # ... the last samples


def test_no_more_than_max_seqs_run_and_the_rest_wait_in_order() -> None:
    s = make(max_seqs=2)
    for sid in (1, 2, 3):
        s.add(seq(sid, 3))
    plan = s.plan()
    assert plan is not None and [c[0] for c in chunks_of(plan)] == [1, 2]
    assert [q.sid for q in s.waiting] == [3]
    back(s, plan, finished=(1,))
    plan = s.plan()
    assert plan is not None and [c[0] for c in chunks_of(plan)] == [2, 3]


def test_a_two_stage_world_keeps_two_micro_batches_in_flight_with_half_the_decodes_each(
        ) -> None:
    s = make(stages=2)
    for sid in range(1, 9):
        s.add(seq(sid, 2))
    a = s.plan()
    assert a is not None and len(a.chunks) == 8  # all prefills fit the first one
    assert s.plan() is None  # nothing else to run
    back(s, a)
    a = s.plan()
    b = s.plan()
    assert a is not None and b is not None and s.plan() is None  # two in flight: full
    assert [c[0] for c in chunks_of(a)] == [1, 2, 3, 4]
    assert [c[0] for c in chunks_of(b)] == [5, 6, 7, 8]
    with pytest.raises(ValueError):
        s.returned(b.step, {})  # answers come back in order
    back(s, a)
    a2 = s.plan()
    assert a2 is not None and [c[0] for c in chunks_of(a2)] == [1, 2, 3, 4]


def test_when_kv_runs_out_the_latest_admitted_sequence_is_preempted_and_recomputed() -> None:
    s = make(blocks=4)  # 16 positions in all
    s.add(seq(1, 4, max_tokens=8))
    s.add(seq(2, 4, max_tokens=8))
    plan = s.plan()
    assert plan is not None and s.used_blocks == 2
    back(s, plan, token=50)
    plan = s.plan()  # both decode into a second block each
    assert plan is not None and s.used_blocks == 4
    back(s, plan, token=51)
    for _ in range(3):  # 6 positions each; the 8th needs a third block
        plan = s.plan()
        assert plan is not None
        back(s, plan, token=52)
    assert s.preemptions == 0
    # Sequence 1 needs a third block: sequence 2 (admitted later) gives its two back.
    plan = s.plan()
    assert plan is not None and [c[0] for c in chunks_of(plan)] == [1]
    assert plan.preempts == [2] and s.preemptions == 1
    victim = s.waiting[0]
    assert victim.sid == 2 and victim.computed == 0 and victim.blocks == 0
    assert victim.tokens == [0, 1, 2, 3, 50, 51, 52, 52, 52]  # prompt + what it generated
    back(s, plan, finished=(1,))
    plan = s.plan()  # it comes back, prefilled anew with every token it has
    assert plan is not None and chunks_of(plan) == [(2, 0, 9, True)] and plan.joins == []
    assert s.used_blocks == 3


def test_a_new_sequence_never_preempts_and_leaves_room_for_the_running_ones_to_grow() -> None:
    s = make(blocks=4)
    s.add(seq(1, 4))
    plan = s.plan()
    assert plan is not None
    back(s, plan)
    s.add(seq(2, 12))  # needs 3 blocks; sequence 1 takes its second, 2 stay free ...
    plan = s.plan()
    assert plan is not None
    # ... of which one is kept for sequence 1 to grow into: what fits, and no sample yet.
    assert chunks_of(plan) == [(1, 4, 1, True), (2, 0, 4, False)]
    assert s.preemptions == 0 and s.used_blocks == 3


def test_a_cancelled_sequence_frees_its_kv_at_once_or_when_its_micro_batch_returns() -> None:
    s = make(stages=2)
    s.add(seq(1, 3))
    s.add(seq(2, 3))
    plan = s.plan()
    assert plan is not None
    back(s, plan)
    a = s.plan()
    b = s.plan()
    assert a is not None and b is not None
    idle, busy = a.chunks[0].seq, b.chunks[0].seq
    back(s, a)  # sequence ``idle`` is not in flight any more
    s.end(idle, "cancelled")
    s.end(busy, "cancelled")  # in flight: its blocks wait for its micro-batch
    assert idle.blocks == 0 and busy.blocks > 0
    nxt = s.plan()
    assert nxt is not None and nxt.chunks == [] and nxt.frees == [idle.sid]
    assert back(s, b) == []  # ended here, not by the last stage
    nxt2 = s.plan()
    assert nxt2 is not None and nxt2.frees == [busy.sid] and s.used_blocks == 0


def test_a_sequence_past_its_deadline_is_ended_and_reported_once() -> None:
    s = make()
    s.add(seq(1, 3, deadline_s=5.0))
    s.add(seq(2, 3, deadline_s=50.0))
    assert [q.sid for q in s.expire(10.0)] == [1]
    assert s.expire(10.0) == []
    plan = s.plan()
    assert plan is not None and [c[0] for c in chunks_of(plan)] == [2]


def test_sequences_a_later_stage_failed_end_with_their_micro_batch() -> None:
    s = make()
    s.add(seq(1, 3))
    s.add(seq(2, 3))
    plan = s.plan()
    assert plan is not None
    ended = s.returned(plan.step, {1: (5, False)}, failed=(2,))
    assert [q.sid for q in ended] == [2] and s.used_blocks == 1
    assert [q.sid for q in s.running] == [1]


def test_a_resumed_stream_is_prefilled_with_its_delivered_tokens_and_generates_on() -> None:
    s = make()
    resumed = Seq(1, (1, "c"), "stream", 3, [0, 1, 2, 60, 61], SamplingParams(max_tokens=8),
                  Resume((60, 61), 2), 0.0, 1e9, generated=2)
    s.add(resumed)
    plan = s.plan()
    assert plan is not None and chunks_of(plan) == [(1, 0, 5, True)]
    back(s, plan, token=62)
    assert resumed.generated == 3 and resumed.tokens[-1] == 62


def _drive(s: Scheduler, steps: int) -> list[Any]:
    ended: list[Any] = []
    for _ in range(steps):
        plan = s.plan()
        if plan is None:
            break
        ended += back(s, plan, finished=tuple(c.seq.sid for c in plan.chunks
                                               if c.seq.generated >= 3))
    return ended


def test_under_a_tight_budget_every_sequence_still_finishes() -> None:
    s = make(blocks=6, max_batch_tokens=16)
    for sid in range(1, 11):
        s.add(seq(sid, 6))
    ended = _drive(s, 500)
    assert sorted(q.sid for q in ended) == list(range(1, 11))
    assert s.used_blocks == 0 and not s.running and not s.waiting
