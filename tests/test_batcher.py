"""Unit tests for worker/batcher.py: the dynamic batching policy, driven by a fake clock."""

from __future__ import annotations

import msgpack
import pytest

from mesh.testing.clock import FakeClock
from worker.batcher import Batcher, Item
from worker.comm import HEADER_BYTES
from worker.stage_loop import micro_batches

DELAY_MS = 10.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, *, max_batch_size: int = 32, delay_ms: float = DELAY_MS) -> Batcher:
    return Batcher(max_batch_size=max_batch_size, max_batch_delay_ms=delay_ms, clock=clock)


def add(b: Batcher, clock: FakeClock, token: str, *, rows: int = 1,
        timeout_s: float = 60.0) -> Item:
    item = Item(token=token, rows=rows, arrived_s=clock(), deadline_s=clock() + timeout_s)
    b.add(item)
    return item


def tokens(items: list[Item]) -> list[str]:
    return [i.token for i in items]


def settle_target(b: Batcher, clock: FakeClock, n: int) -> None:
    """Serve one burst of ``n`` rows so the batcher expects that concurrency next time."""
    for i in range(n):
        add(b, clock, f"burst-{i}")
    batch, _ = b.take()
    assert len(batch) == n


# -- readiness --------------------------------------------------------------------------------


def test_an_empty_batcher_has_nothing_to_wait_for_and_nothing_to_take(clock: FakeClock) -> None:
    b = make(clock)
    assert b.wait_s() is None
    assert b.take() == ([], [])
    assert b.take(force=True) == ([], [])


def test_a_lone_request_is_ready_at_once_without_the_batch_delay(clock: FakeClock) -> None:
    b = make(clock, delay_ms=5000.0)
    add(b, clock, "only")
    assert b.wait_s() == 0.0
    batch, expired = b.take()
    assert tokens(batch) == ["only"]
    assert expired == []
    assert len(b) == 0 and b.rows == 0


def test_requests_that_arrive_while_computing_go_together_into_the_next_batch(
    clock: FakeClock,
) -> None:
    b = make(clock)
    add(b, clock, "first")
    assert tokens(b.take()[0]) == ["first"]
    # The compute thread is busy with "first"; these arrive meanwhile.
    for t in ("b", "c", "d"):
        add(b, clock, t)
    assert len(b) == 3 and b.rows == 3
    batch, _ = b.take()
    assert tokens(batch) == ["b", "c", "d"]


def test_after_a_burst_a_smaller_queue_waits_for_the_batch_delay_at_most(clock: FakeClock) -> None:
    b = make(clock)
    settle_target(b, clock, 4)
    add(b, clock, "straggler")
    assert b.wait_s() == pytest.approx(DELAY_MS / 1000.0)
    assert b.take() == ([], [])

    clock.advance(0.004)
    assert b.wait_s() == pytest.approx(0.006)
    assert b.take() == ([], [])

    clock.advance(0.006)
    assert b.wait_s() == 0.0
    assert tokens(b.take()[0]) == ["straggler"]


def test_a_burst_as_large_as_the_last_one_is_ready_without_waiting(clock: FakeClock) -> None:
    b = make(clock)
    settle_target(b, clock, 4)
    for i in range(4):
        add(b, clock, f"again-{i}")
    assert b.wait_s() == 0.0
    assert len(b.take()[0]) == 4


def test_a_batch_released_by_the_delay_lowers_the_expected_concurrency(clock: FakeClock) -> None:
    b = make(clock)
    settle_target(b, clock, 4)
    add(b, clock, "slow-1")
    clock.advance(DELAY_MS / 1000.0)
    assert tokens(b.take()[0]) == ["slow-1"]
    # The load dropped to one caller: the next lone request is no longer held back.
    add(b, clock, "slow-2")
    assert b.wait_s() == 0.0


def test_a_full_batch_is_ready_however_much_concurrency_was_seen(clock: FakeClock) -> None:
    b = make(clock, max_batch_size=4)
    settle_target(b, clock, 4)
    add(b, clock, "big", rows=4)
    assert b.wait_s() == 0.0


def test_force_takes_a_batch_before_it_is_ready(clock: FakeClock) -> None:
    b = make(clock)
    settle_target(b, clock, 4)
    add(b, clock, "early")
    assert b.take() == ([], [])
    assert tokens(b.take(force=True)[0]) == ["early"]


# -- batch size -------------------------------------------------------------------------------


def test_batches_never_exceed_max_batch_size_rows_and_keep_arrival_order(
    clock: FakeClock,
) -> None:
    b = make(clock, max_batch_size=3)
    sizes = {"a": 1, "b": 2, "c": 1, "d": 1, "e": 2, "f": 3, "g": 1, "h": 1}
    for t, rows in sizes.items():
        add(b, clock, t, rows=rows)
    served: list[str] = []
    for _ in range(20):
        if not len(b):
            break
        batch, expired = b.take()
        if not batch:
            clock.advance(DELAY_MS / 1000.0)
            continue
        assert expired == []
        assert sum(i.rows for i in batch) <= 3, tokens(batch)
        served += tokens(batch)
    assert served == list(sizes)


def test_a_request_larger_than_max_batch_size_is_served_alone(clock: FakeClock) -> None:
    b = make(clock, max_batch_size=4)
    add(b, clock, "huge", rows=9)
    add(b, clock, "small")
    assert tokens(b.take()[0]) == ["huge"]
    assert tokens(b.take(force=True)[0]) == ["small"]


# -- deadlines --------------------------------------------------------------------------------


def test_a_request_whose_deadline_passed_while_queued_is_returned_expired_and_never_batched(
    clock: FakeClock,
) -> None:
    b = make(clock)
    add(b, clock, "expires", timeout_s=5.0)
    add(b, clock, "fresh", timeout_s=50.0)
    clock.advance(6.0)
    batch, expired = b.take()
    assert tokens(batch) == ["fresh"]
    assert tokens(expired) == ["expires"]
    assert len(b) == 0 and b.rows == 0


def test_when_every_queued_request_expired_there_is_no_batch_to_run(clock: FakeClock) -> None:
    b = make(clock)
    add(b, clock, "a", timeout_s=1.0)
    add(b, clock, "b", timeout_s=1.0)
    clock.advance(1.0)  # a deadline equal to now has passed
    batch, expired = b.take()
    assert batch == []
    assert tokens(expired) == ["a", "b"]
    assert b.wait_s() is None


# -- clearing ---------------------------------------------------------------------------------


def test_clear_hands_back_every_queued_request_and_empties_the_queue(clock: FakeClock) -> None:
    b = make(clock)
    settle_target(b, clock, 4)
    add(b, clock, "x", rows=2)
    add(b, clock, "y")
    assert tokens(b.clear()) == ["x", "y"]
    assert len(b) == 0 and b.rows == 0
    assert b.wait_s() is None


def items(*specs: tuple[int, object]) -> list[Item]:
    """Items from (rows, client id) pairs, request ids 0, 1, ..."""
    return [Item((rid, cid), rows, 0.0, 1.0) for rid, (rows, cid) in enumerate(specs)]


def test_micro_batches_split_rows_evenly_keeping_requests_whole() -> None:
    batch = items((3, 1), (3, 2), (2, 3), (4, 4))
    groups = micro_batches(batch, 2)
    assert [[it.token[0] for it in g] for g in groups] == [[0, 1], [2, 3]]
    assert [[it.token[0] for it in g] for g in micro_batches(batch, 1)] == [[0, 1, 2, 3]]
    assert len(micro_batches(items((10, 1)), 4)) == 1  # one request is never split


def test_micro_batches_never_name_more_requests_than_a_header_holds() -> None:
    # 40 one-row requests with 256-byte string ids: one micro-batch by rows, but their ids
    # would not fit one p2p header.
    batch = items(*[(1, "i" * 256)] * 40)
    groups = micro_batches(batch, 1)
    assert len(groups) > 1 and sum(len(g) for g in groups) == 40
    for g in groups:
        header = {"k": "b", "n": ["x"], "t": [["float32", [len(g), 64]]],
                  "items": [[it.token[0], it.token[1], it.rows] for it in g]}
        assert len(msgpack.packb(header)) <= HEADER_BYTES - 4
