"""Unit tests for controller/router.py, driven synchronously with fake senders and a fake clock.

Every scenario ends by checking the router's promise: each submitted request got exactly one
final answer (a result or a typed error), and nothing else reached the client.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import pytest

from controller.config import DeploymentConfig
from controller.mailbox import RouterReport, WorldIdle, WorldStalled
from controller.router import Router
from mesh import codec, dataplane
from mesh.errors import BadRequest, ModelError, Unavailable
from mesh.messages import (
    ClientKind,
    error_header,
    request_header,
    result_header,
)
from mesh.testing.clock import FakeClock


@dataclass
class Dispatch:
    """One request as a worker received it."""

    entry: bytes
    rid: int
    world_id: int
    epoch: int
    deadline_ms: int
    header: bytes
    frames: list[Any]


class Harness:
    """A router with recording fakes for both sockets and the world-idle callback."""

    def __init__(self, *, max_attempts: int = 3, deferred: bool = False,
                 **deployment: Any) -> None:
        self.clock = FakeClock(1000.0)
        # deferred: the router's flushes wait in here until ``end_wake_up`` (the controller's
        # event loop runs them once the wake-up's callbacks are done); else each dispatch
        # goes out at once.
        self.deferred: list[Any] = []
        self.to_client: list[list[Any]] = []
        self.to_worker: list[list[Any]] = []
        self.idle: list[int] = []
        self.stalled: list[tuple[int, str]] = []
        self.vanished: set[bytes] = set()  # worker identities the socket no longer knows
        self.submitted: list[tuple[bytes, Any]] = []
        self.router = Router(
            DeploymentConfig(name="mlp", model="worker.models.mlp:build", **deployment),
            send_client=self._send_client,
            send_worker=self._send_worker,
            next_rid=itertools.count(1).__next__,
            tell=self._told,
            max_attempts=max_attempts,
            defer=self.deferred.append if deferred else None,
            clock=self.clock,
        )

    def add_world(self, world_id: int, epoch: int, entry: bytes, **kwargs: Any) -> None:
        """A world whose one member socket is ``entry`` (what answers for it, see ``reply``)."""
        self.router.add_world(world_id, epoch, entry, frozenset({entry}), **kwargs)

    def _told(self, report: RouterReport) -> None:
        if isinstance(report, WorldIdle):
            self.idle.append(report.world_id)
        elif isinstance(report, WorldStalled):
            self.stalled.append((report.world_id, report.reason))

    def _send_client(self, frames: list[Any]) -> bool:
        self.to_client.append(list(frames))
        return True

    def _send_worker(self, frames: list[Any]) -> bool:
        self.to_worker.append(list(frames))
        if len(self.to_worker) > 1000:
            raise RuntimeError("the router keeps re-sending: dispatch loop does not end")
        return frames[0] not in self.vanished

    # -- driving ------------------------------------------------------------------------

    def submit(self, client_id: Any, *, client: bytes = b"client-1", timeout_ms: int = 1000,
               kind: str = ClientKind.INFER) -> None:
        header = codec.pack(request_header(kind, client_id, "mlp", {}, timeout_ms))
        frames = [f"tensor-of-{client_id}".encode()]
        self.submitted.append((client, client_id))
        self.router.submit(client, client_id, kind, header, frames, timeout_ms)

    def end_wake_up(self) -> None:
        while self.deferred:
            self.deferred.pop(0)()

    def dispatches(self, entry: bytes | None = None) -> list[Dispatch]:
        out = []
        for frames in self.to_worker:
            head = dataplane.unpack(frames[1])
            if type(head) is dataplane.CancelWork:
                continue
            if type(head) is dataplane.DispatchBatch or \
                    type(head) is dataplane.PackedDispatchBatch:
                requests = dataplane.dispatches(head, frames[2:])
                assert requests, "a batch whose frames do not add up"
                found = [Dispatch(frames[0], rid, head.world_id, head.epoch, deadline_ms,
                                  bytes(part[0]), [bytes(f) for f in part[1:]])
                         for rid, deadline_ms, part in requests]
            else:
                assert type(head) is dataplane.Dispatch
                found = [Dispatch(frames[0], head.rid, head.world_id, head.epoch,
                                  head.deadline_ms, frames[2], frames[3:])]
            out += [d for d in found if entry is None or d.entry == entry]
        return out

    def cancels(self) -> list[tuple[bytes, int, int, int]]:
        """(entry, rid, world, epoch) of every stop-work message sent to a worker."""
        out = []
        for frames in self.to_worker:
            head = dataplane.unpack(frames[1])
            if type(head) is dataplane.CancelWork:
                out.append((frames[0], head.rid, head.world_id, head.epoch))
        return out

    def dispatch_of(self, client_id: Any) -> Dispatch:
        """The latest dispatch of a client's request."""
        found = [d for d in self.dispatches()
                 if codec.unpack_header(d.header)["id"] == client_id]
        assert found, f"request {client_id!r} was never dispatched"
        return found[-1]

    def reply(self, d: Dispatch, *, status: int = dataplane.OK,
              frames: list[Any] | None = None, code: str = "") -> None:
        client_id = codec.unpack_header(d.header)["id"]
        if frames is None:
            frames = [codec.pack(result_header(client_id, {"y": client_id})), b"y-bytes"]
        # From the socket the request went to: the world's member.
        self.router.on_reply(dataplane.Reply(d.rid, d.world_id, d.epoch, status, code), frames,
                             d.entry)

    def reply_error(self, d: Dispatch, code: str, retryable: bool = False) -> None:
        client_id = codec.unpack_header(d.header)["id"]
        header = codec.pack(error_header(client_id, code, "from the worker", retryable))
        self.reply(d, status=dataplane.ERROR, frames=[header], code=code)

    # -- reading what the client got ----------------------------------------------------

    def answers(self) -> list[tuple[bytes, dict[str, Any]]]:
        return [(frames[0], codec.unpack_header(frames[1])) for frames in self.to_client]

    def final_answers(self, client_id: Any, client: bytes = b"client-1") -> list[dict[str, Any]]:
        return [h for c, h in self.answers()
                if c == client and h["id"] == client_id and h["kind"] != ClientKind.CHUNK]

    def code_of(self, client_id: Any, client: bytes = b"client-1") -> str:
        (answer,) = self.final_answers(client_id, client)
        return answer["code"] if answer["kind"] == ClientKind.ERROR else "ok"

    def assert_each_answered_once(self) -> None:
        """Every submitted request got exactly one final answer; no answer is unexplained.
        (One pass over the answers: the spike scenarios submit thousands.)"""
        finals = Counter((c, h["id"]) for c, h in self.answers() if h["kind"] != ClientKind.CHUNK)
        for client, client_id in self.submitted:
            got = finals[(client, client_id)]
            assert got == 1, (f"request {client_id!r} got {got} final answers: "
                              f"{self.final_answers(client_id, client)}")
        assert finals == Counter(self.submitted)
        assert self.router.unanswered == 0


# -- one message per world and wake-up ---------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["reqs", "reqp"])
def test_what_one_wake_up_dispatches_to_a_world_goes_out_as_one_message(packed: bool) -> None:
    h = Harness(deferred=True, max_inflight_per_world=64)
    h.add_world(1, 0, b"w1", packed=packed)  # packed: its entry's joined said so
    h.add_world(2, 0, b"w2", packed=packed)
    for i in range(10):
        h.submit(f"r{i}", timeout_ms=1000 + 10 * i)
    assert h.to_worker == []  # nothing is sent before the wake-up's work is done
    h.end_wake_up()
    assert sorted(frames[0] for frames in h.to_worker) == [b"w1", b"w2"]
    kind = dataplane.PackedDispatchBatch if packed else dataplane.DispatchBatch
    assert all(type(dataplane.unpack(f[1])) is kind for f in h.to_worker)
    if packed:  # head, then one pack holding every request's header and tensor frame
        assert all(len(f) == 3 for f in h.to_worker)
    for i in range(10):  # each request with its own header, frames and deadline
        d = h.dispatch_of(f"r{i}")
        assert d.frames == [f"tensor-of-r{i}".encode()]
        assert abs(d.deadline_ms - (1000 + 10 * i)) <= 1  # float rounding of the clock
    for d in h.dispatches():
        h.reply(d)
    h.end_wake_up()
    h.assert_each_answered_once()
    # Alone in its wake-up, a request travels as a single dispatch.
    h.submit("alone")
    h.end_wake_up()
    assert type(dataplane.unpack(h.to_worker[-1][1])) is dataplane.Dispatch


def test_a_batch_whose_world_is_gone_is_taken_back_and_sent_to_another_world() -> None:
    h = Harness(deferred=True, max_inflight_per_world=64)
    h.add_world(1, 0, b"w1")
    h.add_world(2, 0, b"w2")
    h.vanished.add(b"w1")
    for i in range(6):
        h.submit(f"r{i}")
    h.end_wake_up()
    assert h.router.worlds[1].unreachable and not h.router.worlds[1].inflight
    delivered = [d for d in h.dispatches(b"w2")]
    assert sorted(codec.unpack_header(d.header)["id"] for d in delivered) == \
        [f"r{i}" for i in range(6)]
    for d in delivered:
        h.reply(d)
    h.end_wake_up()
    h.assert_each_answered_once()
    assert all(p.attempts == 1 for p in h.router.pending.values())


def test_a_cancel_never_overtakes_the_dispatch_it_stops() -> None:
    h = Harness(deferred=True)
    h.add_world(1, 0, b"w1")
    h.submit("r")
    h.router.cancel(b"client-1", "r")  # in the same wake-up: the dispatch is still held
    kinds = [type(dataplane.unpack(f[1])) for f in h.to_worker]
    assert kinds == [dataplane.Dispatch, dataplane.CancelWork]
    assert h.code_of("r") == "cancelled"
    h.reply(h.dispatch_of("r"))  # the world answers anyway: dropped, its slot freed
    assert not h.router.worlds[1].inflight
    h.assert_each_answered_once()


# -- world choice and queueing ----------------------------------------------------------------


def test_a_request_goes_to_the_world_with_the_fewest_outstanding_requests() -> None:
    h = Harness(max_inflight_per_world=8)
    h.add_world(1, 0, b"w1")
    h.add_world(2, 0, b"w2")
    for i in range(3):
        h.submit(f"a{i}")
    # Three requests over two idle worlds: 2 and 1 (in some order).
    loads = sorted(len(h.dispatches(e)) for e in (b"w1", b"w2"))
    assert loads == [1, 2]
    busier = b"w1" if len(h.dispatches(b"w1")) == 2 else b"w2"
    lighter = b"w2" if busier == b"w1" else b"w1"
    h.submit("next")
    assert h.dispatch_of("next").entry == lighter
    # Now 2/2: answering one on the busier world makes it the lighter one.
    h.reply(h.dispatches(busier)[0])
    h.submit("after-reply")
    assert h.dispatch_of("after-reply").entry == busier
    for d in h.dispatches():
        if not h.final_answers(codec.unpack_header(d.header)["id"]):
            h.reply(d)
    h.assert_each_answered_once()


def test_a_dispatch_carries_the_request_untouched_with_its_remaining_time() -> None:
    h = Harness()
    h.submit("a", timeout_ms=1000)
    h.clock.advance(0.4)  # waits in the queue: no world yet
    h.add_world(7, 3, b"w7")
    d = h.dispatch_of("a")
    assert (d.entry, d.world_id, d.epoch) == (b"w7", 7, 3)
    assert d.deadline_ms == 600
    assert codec.unpack_header(d.header) == request_header(ClientKind.INFER, "a", "mlp", {}, 1000)
    assert d.frames == [b"tensor-of-a"]


def test_requests_queue_while_every_world_is_full_and_go_out_as_replies_free_slots() -> None:
    h = Harness(max_inflight_per_world=2)
    h.add_world(1, 0, b"w1")
    for i in range(4):
        h.submit(i)
    assert len(h.dispatches()) == 2
    assert h.router.queued == 2
    assert h.router.in_flight == 2

    h.reply(h.dispatch_of(0))
    assert [codec.unpack_header(d.header)["id"] for d in h.dispatches()] == [0, 1, 2]
    assert h.router.queued == 1

    for i in (1, 2):
        h.reply(h.dispatch_of(i))
    h.reply(h.dispatch_of(3))
    assert h.router.queued == 0
    assert h.router.in_flight == 0
    h.assert_each_answered_once()


def test_a_request_beyond_a_full_queue_is_answered_overloaded() -> None:
    h = Harness(max_inflight_per_world=1, max_queue=1)
    h.add_world(1, 0, b"w1")
    h.submit("in-flight")
    h.submit("queued")
    h.submit("turned-away")
    assert h.code_of("turned-away") == "overloaded"
    assert h.final_answers("turned-away")[0]["retryable"] is True
    h.reply(h.dispatch_of("in-flight"))
    h.reply(h.dispatch_of("queued"))
    assert h.code_of("queued") == "ok"
    h.assert_each_answered_once()


def test_with_no_world_and_no_queue_a_request_is_answered_overloaded_at_once() -> None:
    h = Harness(max_queue=0)
    h.submit("a")
    assert h.code_of("a") == "overloaded"
    assert h.to_worker == []
    h.assert_each_answered_once()


def test_requests_answered_while_queued_give_their_queue_places_back() -> None:
    h = Harness(max_queue=2)
    h.submit("a", timeout_ms=100)
    h.submit("b", timeout_ms=100)
    h.clock.advance(0.2)
    h.router.sweep()
    h.submit("c", timeout_ms=1000)
    assert h.final_answers("c") == []  # queued, not Overloaded
    h.add_world(1, 0, b"w1")
    h.reply(h.dispatch_of("c"))
    h.assert_each_answered_once()


# -- deadlines --------------------------------------------------------------------------------


def test_the_deadline_sweep_answers_deadline_exceeded_exactly_once() -> None:
    h = Harness()
    h.add_world(1, 0, b"w1")
    h.submit("slow", timeout_ms=100)
    h.clock.advance(0.05)
    h.router.sweep()
    assert h.final_answers("slow") == []
    h.clock.advance(0.06)
    h.router.sweep()
    h.router.sweep()
    assert h.code_of("slow") == "deadline_exceeded"
    h.assert_each_answered_once()


def test_a_reply_after_the_deadline_answer_is_dropped_and_frees_the_world_slot() -> None:
    h = Harness(max_inflight_per_world=1)
    h.add_world(1, 0, b"w1")
    h.submit("slow", timeout_ms=100)
    h.submit("waiting", timeout_ms=5000)
    h.clock.advance(0.2)
    h.router.sweep()
    slow = h.dispatch_of("slow")
    # The worker is told to stop: it still answers, and that answer frees the slot.
    assert h.cancels() == [(b"w1", slow.rid, 1, 0)]
    before = len(h.to_client)
    h.reply(slow)  # the worker finishes after all
    assert len(h.to_client) == before  # the late result never reaches the client
    # The slot the slow request held is free again: the waiting request goes out.
    h.reply(h.dispatch_of("waiting"))
    assert h.code_of("slow") == "deadline_exceeded"
    assert h.code_of("waiting") == "ok"
    h.assert_each_answered_once()


def test_a_result_that_arrives_past_the_deadline_before_the_sweep_is_a_deadline_error() -> None:
    # The controller's loop was busy past the deadline: the worker's result is read before
    # the deadline timer runs. The caller must not get a success after its deadline.
    h = Harness()
    h.add_world(1, 0, b"w1")
    h.submit("slow", timeout_ms=100)
    h.clock.advance(0.3)
    h.reply(h.dispatch_of("slow"))  # no sweep in between
    assert h.code_of("slow") == "deadline_exceeded"
    h.router.sweep()
    h.assert_each_answered_once()
    assert h.router.stats.errors["deadline_exceeded"] == 1 and h.router.stats.total_ok == 0


def test_a_reply_after_the_deadline_answer_is_counted_as_late() -> None:
    h = Harness()
    h.add_world(1, 0, b"w1")
    h.submit("slow", timeout_ms=100)
    h.clock.advance(0.2)
    h.router.sweep()
    h.reply(h.dispatch_of("slow"))
    assert h.router.late_replies == 1


def test_a_request_that_expires_in_the_queue_is_never_dispatched() -> None:
    h = Harness()
    h.submit("expired", timeout_ms=100)
    h.clock.advance(0.2)
    h.router.sweep()
    assert h.code_of("expired") == "deadline_exceeded"
    h.add_world(1, 0, b"w1")
    assert h.to_worker == []
    assert h.router.queued == 0
    h.assert_each_answered_once()


# -- replies ----------------------------------------------------------------------------------


def test_a_reply_is_forwarded_to_the_client_as_identity_plus_the_worker_frames() -> None:
    h = Harness()
    h.add_world(1, 0, b"w1")
    h.submit("a", client=b"client-9")
    frames = [codec.pack(result_header("a", {"y": 1})), b"raw-tensor-bytes"]
    h.reply(h.dispatch_of("a"), frames=frames)
    assert h.to_client == [[b"client-9", *frames]]
    assert h.router.in_flight == 0
    h.assert_each_answered_once()


def test_stream_chunks_are_forwarded_in_order_and_the_request_stays_open_until_the_end() -> None:
    h = Harness()
    h.add_world(1, 0, b"w1")
    h.submit("s", kind=ClientKind.STREAM)
    d = h.dispatch_of("s")
    chunks = [codec.pack({"v": 1, "kind": ClientKind.CHUNK, "id": "s", "seq": i}) for i in range(3)]
    for chunk in chunks:
        h.reply(d, status=dataplane.CHUNK, frames=[chunk])
    assert h.router.in_flight == 1
    end = codec.pack({"v": 1, "kind": ClientKind.END, "id": "s"})
    h.reply(d, frames=[end])
    assert [f[1] for f in h.to_client] == [*chunks, end]
    assert h.router.in_flight == 0
    h.assert_each_answered_once()


def test_a_reply_for_an_unknown_request_is_counted_late_and_dropped() -> None:
    h = Harness()
    h.add_world(1, 0, b"w1")
    h.router.on_reply(dataplane.Reply(999, 1, 0, dataplane.OK),
                      [codec.pack(result_header("x", {}))])
    assert h.router.late_replies == 1
    assert h.to_client == []


def test_an_unavailable_error_from_a_worker_is_retried_instead_of_shown_to_the_client() -> None:
    h = Harness()
    h.add_world(1, 0, b"w1")
    h.add_world(2, 0, b"w2")
    h.submit("a")
    first = h.dispatch_of("a")
    h.reply_error(first, Unavailable.code, retryable=True)
    assert h.final_answers("a") == []
    again = h.dispatch_of("a")
    assert len(h.dispatches()) == 2
    assert again.rid == first.rid
    assert again.frames == first.frames
    h.reply(again)
    assert h.code_of("a") == "ok"
    h.assert_each_answered_once()


def test_a_request_a_world_failed_is_re_sent_to_another_world_while_one_has_room() -> None:
    # World 1 answers "unavailable" (it is breaking, and nobody has told the controller yet):
    # the re-send goes to world 2, though world 1 now holds fewer requests, so a request is
    # not spent on a world that is going away. With world 1 alone, it still goes there.
    h = Harness(max_inflight_per_world=8)
    h.add_world(1, 0, b"w1")
    h.add_world(2, 0, b"w2")
    h.submit("a")
    h.submit("b")
    h.submit("c")
    on_w1 = h.dispatches(b"w1")
    failing = on_w1[0]
    name = codec.unpack_header(failing.header)["id"]
    for d in on_w1:
        h.reply_error(d, Unavailable.code, retryable=True)
    assert h.dispatch_of(name).entry == b"w2"
    assert len(h.router.worlds[1].inflight) == 0 < len(h.router.worlds[2].inflight)
    for d in h.dispatches(b"w2"):
        h.reply(d)
    h.assert_each_answered_once()
    solo = Harness()
    solo.add_world(1, 0, b"w1")
    solo.submit("a")
    solo.reply_error(solo.dispatch_of("a"), Unavailable.code, retryable=True)
    assert [d.entry for d in solo.dispatches()] == [b"w1", b"w1"]


def test_an_unavailable_error_is_shown_once_the_retry_budget_is_spent() -> None:
    h = Harness(max_attempts=2)
    h.add_world(1, 0, b"w1")
    h.submit("a")
    for _ in range(2):
        h.reply_error(h.dispatch_of("a"), Unavailable.code, retryable=True)
    assert len(h.dispatches()) == 2
    assert h.code_of("a") == "unavailable"
    h.assert_each_answered_once()


def test_a_model_error_from_a_worker_is_forwarded_without_a_retry() -> None:
    h = Harness()
    h.add_world(1, 0, b"w1")
    h.submit("a")
    h.reply_error(h.dispatch_of("a"), ModelError.code)
    assert len(h.dispatches()) == 1
    assert h.code_of("a") == "model_error"
    h.assert_each_answered_once()


# -- draining and removing worlds -------------------------------------------------------------


def test_a_draining_world_gets_no_new_requests_and_reports_idle_once_its_work_is_answered() -> None:
    h = Harness(max_inflight_per_world=8)
    h.add_world(1, 0, b"w1")
    h.submit("on-w1")
    h.add_world(2, 0, b"w2")
    h.submit("x")
    h.submit("y")  # w1 now holds fewer than w2 ...
    h.router.drain_world(1)
    h.submit("after-drain")  # ... yet the new request avoids the draining world
    assert h.dispatch_of("after-drain").entry == b"w2"
    assert h.idle == []

    for client_id in ("on-w1", "x", "y", "after-drain"):
        h.reply(h.dispatch_of(client_id))
    assert h.idle == [1]
    h.assert_each_answered_once()


def test_draining_an_idle_world_reports_it_idle_at_once() -> None:
    h = Harness()
    h.add_world(1, 0, b"w1")
    h.router.drain_world(1)
    assert h.idle == [1]


def test_removing_a_world_re_sends_its_unanswered_requests_to_another_world() -> None:
    h = Harness(max_inflight_per_world=8)
    h.add_world(1, 0, b"w1")
    h.submit("a")
    h.submit("b")
    h.add_world(2, 0, b"w2")
    old = {cid: h.dispatch_of(cid) for cid in ("a", "b")}
    assert {d.entry for d in old.values()} == {b"w1"}

    assert h.router.remove_world(1, "worker lost") == 2
    for cid, before in old.items():
        after = h.dispatch_of(cid)
        assert (after.entry, after.world_id) == (b"w2", 2)
        assert after.rid == before.rid
        assert (after.header, after.frames) == (before.header, before.frames)
    assert h.final_answers("a") == h.final_answers("b") == []

    # The broken world answers after all: too late, dropped and counted.
    h.reply(old["a"])
    assert h.router.late_replies == 1
    assert h.final_answers("a") == []
    for cid in ("a", "b"):
        h.reply(h.dispatch_of(cid))
    h.assert_each_answered_once()


def test_removing_the_only_world_with_no_retry_left_answers_unavailable() -> None:
    h = Harness(max_attempts=1)
    h.add_world(1, 0, b"w1")
    h.submit("a")
    assert h.router.remove_world(1, "worker lost") == 0
    assert h.code_of("a") == "unavailable"
    assert h.final_answers("a")[0]["retryable"] is True
    h.assert_each_answered_once()


def test_removing_a_world_after_the_deadline_answers_unavailable_without_a_re_send() -> None:
    h = Harness(max_attempts=3)
    h.add_world(1, 0, b"w1")
    h.add_world(2, 0, b"w2")
    h.submit("a", timeout_ms=100)
    entry = h.dispatch_of("a").entry
    h.clock.advance(0.2)  # deadline passed, sweep not yet run
    h.router.remove_world(1 if entry == b"w1" else 2, "worker lost")
    assert len(h.dispatches()) == 1
    assert h.code_of("a") == "unavailable"
    h.assert_each_answered_once()


def test_a_request_of_a_removed_world_waits_for_the_next_world_while_retries_remain() -> None:
    h = Harness(max_attempts=3)
    h.add_world(1, 0, b"w1")
    h.submit("a")
    h.router.remove_world(1, "worker lost")
    assert h.final_answers("a") == []
    assert h.router.queued == 1
    h.add_world(2, 1, b"w2")
    h.reply(h.dispatch_of("a"))
    assert h.code_of("a") == "ok"
    h.assert_each_answered_once()


def test_a_world_whose_worker_vanished_does_not_make_the_router_spin() -> None:
    h = Harness(max_attempts=3)
    h.vanished.add(b"gone")
    h.add_world(1, 0, b"gone")
    h.submit("a")
    h.add_world(2, 0, b"w2")  # pumps the queue
    assert len(h.dispatches(b"gone")) <= 3
    h.router.remove_world(1, "worker lost")
    h.reply(h.dispatch_of("a"))
    h.assert_each_answered_once()


# -- admission errors and cancellation --------------------------------------------------------


def test_a_second_request_with_an_id_already_in_flight_is_a_bad_request() -> None:
    h = Harness()
    h.add_world(1, 0, b"w1")
    h.submit("same")
    h.router.submit(b"client-1", "same", ClientKind.INFER, b"", [], 1000)
    (dup,) = h.final_answers("same")
    assert dup["code"] == BadRequest.code
    assert len(h.dispatches()) == 1
    # Another connection may use the same id; the first one is still served.
    h.submit("same", client=b"client-2")
    h.reply(h.dispatch_of("same"))
    h.reply(h.dispatches()[0])
    assert [a["kind"] for a in h.final_answers("same")] == [ClientKind.ERROR, ClientKind.RESULT]
    assert h.code_of("same", client=b"client-2") == "ok"


def test_an_id_can_be_reused_once_its_request_is_answered() -> None:
    h = Harness()
    h.add_world(1, 0, b"w1")
    h.submit("id")
    h.reply(h.dispatch_of("id"))
    h.submit("id")
    assert len(h.dispatches()) == 2
    h.reply(h.dispatch_of("id"))
    assert [a["kind"] for a in h.final_answers("id")] == [ClientKind.RESULT] * 2


def test_cancelling_an_in_flight_request_answers_cancelled_and_drops_the_worker_result() -> None:
    h = Harness()
    h.add_world(1, 0, b"w1")
    h.submit("a")
    h.router.cancel(b"client-1", "a")
    assert h.code_of("a") == "cancelled"
    h.reply(h.dispatch_of("a"))
    assert h.code_of("a") == "cancelled"
    assert h.router.in_flight == 0
    h.assert_each_answered_once()


def test_cancelling_a_queued_request_answers_cancelled_and_it_is_never_dispatched() -> None:
    h = Harness()
    h.submit("a")
    h.router.cancel(b"client-1", "a")
    h.add_world(1, 0, b"w1")
    assert h.to_worker == []
    assert h.code_of("a") == "cancelled"
    h.assert_each_answered_once()


def test_cancelling_an_unknown_request_sends_nothing() -> None:
    h = Harness()
    h.router.cancel(b"client-1", "never-sent")
    assert h.to_client == []


def test_a_request_arriving_while_not_accepting_is_answered_cancelled() -> None:
    h = Harness()
    h.add_world(1, 0, b"w1")
    h.router.accepting = False
    h.submit("a")
    assert h.code_of("a") == "cancelled"
    assert h.to_worker == []
    h.assert_each_answered_once()


def test_fail_all_answers_every_open_request_once() -> None:
    h = Harness(max_inflight_per_world=1)
    h.add_world(1, 0, b"w1")
    h.submit("in-flight")
    h.submit("queued")
    h.router.fail_all(Unavailable("shutting down"))
    assert h.code_of("in-flight") == h.code_of("queued") == "unavailable"
    h.assert_each_answered_once()


def test_a_resumed_stream_names_the_tokens_delivered_after_those_its_client_resumed_from() -> None:
    from controller.inflight import with_resume

    original = codec.pack(request_header("stream", 9, "tinygpt", {"prompt": "hi"}, 5000,
                                         {"max_tokens": 20,
                                          "resume": {"tokens": [1, 2], "chunks": 2}}))
    edited = codec.unpack_header(with_resume(original, [7, 8, 9], 2))
    assert edited["params"] == {"max_tokens": 20,
                                "resume": {"tokens": [1, 2, 7, 8, 9], "chunks": 4}}
    assert edited["inputs"] == {"prompt": "hi"} and edited["id"] == 9


def _chunk(client_id: Any, seq: int, tokens: list[int]) -> bytes:
    return codec.pack({"v": 1, "kind": ClientKind.CHUNK, "id": client_id, "seq": seq,
                       "outputs": {"text": "x" * len(tokens)}, "tokens": tokens})


def _generative_stream(h: Harness, client_id: str, max_tokens: int) -> None:
    header = codec.pack(request_header(ClientKind.STREAM, client_id, "mlp",
                                       {"prompt": "hello"}, 5000, {"max_tokens": max_tokens}))
    h.submitted.append((b"client-1", client_id))
    h.router.submit(b"client-1", client_id, ClientKind.STREAM, header, [], 5000)


def test_a_generative_stream_whose_world_fails_is_re_sent_with_the_tokens_delivered() -> None:
    h = Harness()
    h.add_world(1, 0, b"w1", generative=True)
    h.add_world(2, 0, b"w2", generative=True)
    _generative_stream(h, "s", 10)
    first = h.dispatch_of("s")
    h.clock.advance(0.02)
    h.reply(first, status=dataplane.CHUNK, frames=[_chunk("s", 0, [5])])
    h.clock.advance(0.01)
    h.reply(first, status=dataplane.CHUNK, frames=[_chunk("s", 1, [6, 7])])
    assert h.router.gen.tokens_total == 3
    assert h.router.remove_world(first.world_id, "peer lost") == 1
    again = h.dispatch_of("s")
    assert again.world_id != first.world_id
    params = codec.unpack_header(again.header)["params"]
    assert params == {"max_tokens": 10, "resume": {"tokens": [5, 6, 7], "chunks": 2}}
    h.reply(again, status=dataplane.CHUNK, frames=[_chunk("s", 2, [8])])
    h.reply(again, frames=[codec.pack({"v": 1, "kind": ClientKind.END, "id": "s", "seq": 3})])
    assert [codec.unpack_header(f[1]).get("seq") for f in h.to_client] == [0, 1, 2, 3]
    h.assert_each_answered_once()
    summary = h.router.gen.summary(h.clock())
    assert summary.ttft_p99_ms == pytest.approx(20.0)
    assert summary.tpot_p50_ms == pytest.approx(10.0 / 3)  # 10 ms over the 3 after the first


def test_generative_requests_go_to_the_world_with_the_fewest_tokens_outstanding() -> None:
    h = Harness()
    h.add_world(1, 0, b"w1", generative=True)
    h.add_world(2, 0, b"w2", generative=True)
    _generative_stream(h, "long", 200)  # world 1 (the first, both empty)
    _generative_stream(h, "short-1", 4)  # world 2
    _generative_stream(h, "short-2", 4)  # world 2 again: 8 + 2 tokens against 201
    entries = {d.entry for d in h.dispatches()}
    assert entries == {b"w1", b"w2"}
    by_id = {codec.unpack_header(d.header)["id"]: d.entry for d in h.dispatches()}
    assert by_id["short-1"] == by_id["short-2"] != by_id["long"]


def test_a_reply_no_client_could_read_reports_the_world_and_the_request_is_re_sent() -> None:
    h = Harness()
    h.add_world(1, 0, b"w1")
    h.add_world(2, 0, b"w2")
    h.submit("a")
    d = h.dispatch_of("a")
    h.reply(d, frames=[b"\xc1 garbage", b"y"])
    assert h.to_client == [] and h.router.bad_replies == 1
    assert [w for w, _ in h.stalled] == [d.world_id]  # reported once
    h.reply(d, frames=[b"more garbage"])
    assert len(h.stalled) == 1
    # The WorldManager breaks the world: the request goes to the other one and is answered.
    assert h.router.remove_world(d.world_id, "answered garbage") == 1
    again = h.dispatch_of("a")
    assert again.world_id != d.world_id
    h.reply(again)
    assert h.code_of("a") == "ok"
    h.assert_each_answered_once()


def test_a_reply_batch_is_split_per_answer_and_one_that_does_not_add_up_is_refused_whole(
        ) -> None:
    head = dataplane.unpack(dataplane.pack_reply_batch(3, 1, [(7, dataplane.OK, "", 2),
                                                              (8, dataplane.ERROR, "x", 1)]))
    answers = dataplane.replies(head, [b"h7", b"t7", b"h8"])
    assert [(r.rid, r.world_id, r.epoch, r.status, r.code, f) for r, f in answers] == [
        (7, 3, 1, dataplane.OK, "", [b"h7", b"t7"]), (8, 3, 1, dataplane.ERROR, "x", [b"h8"])]
    assert dataplane.replies(head, [b"h7", b"t7"]) == []  # a frame short
    assert dataplane.replies(head, [b"h7", b"t7", b"h8", b"extra"]) == []
    zero = dataplane.unpack(dataplane.pack_reply_batch(3, 1, [(7, dataplane.OK, "", 0)]))
    assert dataplane.replies(zero, []) == []  # an answer without its header
    assert dataplane.unpack(b"\x94\xa4ress\x03\x01\x91\x93\x07\x00\xa0") is None  # 3 fields


def test_a_packed_reply_batch_slices_its_small_frames_and_keeps_large_ones_whole() -> None:
    import zmq

    big = memoryview(bytes(range(256)) * (dataplane.PACK_MAX_BYTES // 256)).cast("B")
    answers_in = [(7, dataplane.OK, "", [b"\x81\xa1h7", b"t7" * 10, big]),
                  (8, dataplane.ERROR, "bad_request", [b"\x81\xa1h8"]),
                  (9, dataplane.CHUNK, "", [b"\x81\xa1h9", b""])]  # an empty tensor frame
    message = dataplane.pack_replies(3, 1, answers_in)
    assert len(message) == 3 and message[2] is big  # head, pack, the large frame itself
    head = dataplane.unpack(message[0])
    assert type(head) is dataplane.PackedReplyBatch
    for pack in (message[1], zmq.Frame(message[1])):  # as the controller receives it, or not
        answers = dataplane.replies(head, [pack, big])
        assert [(r.rid, r.world_id, r.epoch, r.status, r.code) for r, _ in answers] == [
            (7, 3, 1, dataplane.OK, ""), (8, 3, 1, dataplane.ERROR, "bad_request"),
            (9, 3, 1, dataplane.CHUNK, "")]
        assert [[bytes(f) for f in frames] for _, frames in answers] == [
            [b"\x81\xa1h7", b"t7" * 10, bytes(big)], [b"\x81\xa1h8"], [b"\x81\xa1h9", b""]]
        assert answers[0][1][2] is big  # never copied on the way
        assert dataplane.is_map(answers[0][1][0])  # what the router checks, read in place


def test_a_packed_reply_batch_whose_sizes_do_not_account_for_every_byte_is_refused_whole(
        ) -> None:
    def head(*sizes: list[int]) -> Any:
        return dataplane.unpack(dataplane.pack(dataplane.PackedReplyBatch(
            3, 1, [(rid, dataplane.OK, "", list(s)) for rid, s in enumerate(sizes)])))

    pack = b"aaabb"
    assert len(dataplane.replies(head([3], [2]), [pack])) == 2
    assert dataplane.replies(head([3], [1]), [pack]) == []  # a byte left over
    assert dataplane.replies(head([3], [3]), [pack]) == []  # past the end
    assert dataplane.replies(head([3], [2, -1]), [pack]) == []  # a frame of its own missing
    assert dataplane.replies(head([3], [2]), [pack, b"extra"]) == []  # one too many
    assert dataplane.replies(head([3], [2, -2]), [pack, b"x"]) == []  # no such size
    assert dataplane.replies(head([3], []), [pack]) == []  # an answer without a header
    assert dataplane.replies(head([3], [2]), []) == []  # no pack at all
    assert dataplane.unpack(dataplane.pack(dataplane.PackedReplyBatch(
        3, 1, [(1, 0, "", [2])]))[:-1] + b"\xa1x") is None  # a size that is not an int


def test_a_packed_dispatch_batch_keeps_a_large_frame_whole_and_refuses_a_bad_count() -> None:
    big = b"b" * dataplane.PACK_MAX_BYTES
    message = dataplane.pack_dispatches(4, 2, [(1, 900, [b"\x81\xa1a", b"xy"]),
                                               (2, 800, [b"\x81\xa1b", big])])
    assert len(message) == 3 and message[2] is big
    head = dataplane.unpack(message[0])
    requests = dataplane.dispatches(head, message[1:])
    assert [(rid, deadline, [bytes(f) for f in part]) for rid, deadline, part in requests] == [
        (1, 900, [b"\x81\xa1a", b"xy"]), (2, 800, [b"\x81\xa1b", big])]
    assert requests[1][2][1] is big
    assert dataplane.dispatches(head, message[1:2]) == []  # the large frame missing
    assert dataplane.dispatches(head, [message[1][:-1], big]) == []  # a byte short
    assert dataplane.dispatches(dataplane.unpack(dataplane.pack_reply(1, 4, 2, 0)),
                                message[1:]) == []  # not a dispatch batch
    from mesh.messages import Joined

    joined = {"kind": "joined", "world_id": 1, "epoch": 1, "entry": "w1/1/1"}
    assert not Joined.from_wire(joined).packed_dispatches  # an older worker: reqs
    assert Joined.from_wire(joined | {"packed_dispatches": True}).packed_dispatches


def test_a_worker_packs_its_answers_only_for_a_controller_that_reads_them() -> None:
    from mesh.messages import Welcome
    from worker.world import Replier

    assert Welcome.from_wire(Welcome(heartbeat_interval_ms=1, controller_timeout_ms=1,
                                     packed_replies=True).to_wire()).packed_replies
    older = {"kind": "welcome", "heartbeat_interval_ms": 1, "controller_timeout_ms": 1}
    assert not Welcome.from_wire(older).packed_replies  # a controller that never said so
    for packed, tag in ((True, dataplane.PackedReplyBatch), (False, dataplane.ReplyBatch)):
        sent: list[list[Any]] = []
        replier = Replier(3, 1, sent.append, packed=packed)
        replier.result(7, "c7", {"y": [1.0, 2.0]})
        replier.error(8, "c8", BadRequest("no"))
        replier.flush()
        (message,) = sent
        head = dataplane.unpack(message[0])
        assert type(head) is tag
        answers = dataplane.replies(head, message[1:])
        assert [(r.rid, r.status, r.code) for r, _ in answers] == [
            (7, dataplane.OK, ""), (8, dataplane.ERROR, "bad_request")]
        assert codec.decode([bytes(f) for f in answers[0][1]])["outputs"] == {"y": [1.0, 2.0]}
        assert codec.decode([bytes(f) for f in answers[1][1]])["code"] == "bad_request"


def test_a_reply_to_a_world_with_no_known_members_is_refused_from_any_sender() -> None:
    # Fail closed: a world whose member sockets are not known accepts no answer at all, rather
    # than an answer from anyone.
    h = Harness()
    h.router.add_world(1, 0, b"w1", frozenset())
    h.submit("a")
    d = h.dispatch_of("a")
    for sender in (b"", b"w1", b"mallory"):
        h.router.on_reply(dataplane.Reply(d.rid, d.world_id, d.epoch, dataplane.OK),
                          [codec.pack(result_header("a", {"y": 1}))], sender)
    assert h.router.foreign_replies == 3
    assert h.final_answers("a") == []
    assert h.router.in_flight == 1


def test_only_a_member_socket_of_the_world_may_answer_for_it() -> None:
    h = Harness()
    h.router.add_world(1, 0, b"w1", frozenset({b"w1", b"w1-last"}))
    h.submit("a")
    d = h.dispatch_of("a")
    header = codec.pack(result_header("a", {"y": 1}))
    h.router.on_reply(dataplane.Reply(d.rid, d.world_id, d.epoch, dataplane.OK), [header],
                      b"mallory")
    assert h.router.foreign_replies == 1 and h.final_answers("a") == []
    h.router.on_reply(dataplane.Reply(d.rid, d.world_id, d.epoch, dataplane.OK), [header],
                      b"w1-last")
    assert h.code_of("a") == "ok"
    h.assert_each_answered_once()


# -- admission under a spike -------------------------------------------------------------------


class ServingWorld:
    """One world behind a Harness, as worker/stage_loop.py serves: one request at a time,
    ``service_s`` each, first come first served; a request whose deadline passed while it was
    queued, or that the router cancelled, is dropped with an immediate answer."""

    def __init__(self, h: Harness, service_s: float) -> None:
        self.h = h
        self.service_s = service_s
        self.queue: deque[tuple[Dispatch, float]] = deque()
        self.current: Dispatch | None = None
        self.done_s = 0.0

    def _read(self, now_s: float) -> None:
        for frames in self.h.to_worker:
            head = dataplane.unpack(frames[1])
            if type(head) is dataplane.CancelWork:
                for item in [q for q in self.queue if q[0].rid == head.rid]:
                    self.queue.remove(item)
                    self.h.reply_error(item[0], "cancelled")
            else:
                assert type(head) is dataplane.Dispatch
                d = Dispatch(frames[0], head.rid, head.world_id, head.epoch, head.deadline_ms,
                             frames[2], frames[3:])
                self.queue.append((d, now_s + head.deadline_ms / 1000.0))
        self.h.to_worker.clear()

    def step(self, now_s: float) -> None:
        self._read(now_s)
        if self.current is not None and now_s >= self.done_s - 1e-9:
            done, self.current = self.current, None
            self.h.reply(done)
            self._read(now_s)
        while self.current is None and self.queue:
            d, deadline_s = self.queue.popleft()
            if deadline_s <= now_s:
                self.h.reply_error(d, "deadline_exceeded")
                self._read(now_s)
            else:
                self.current, self.done_s = d, now_s + self.service_s


def offer(h: Harness, world: ServingWorld, rps: float, seconds: float, timeout_ms: int,
          tag: str) -> list[int]:
    """``rps`` requests a second for ``seconds`` on the fake clock, 1 ms a tick; returns how
    many answers ``ok`` (to any request) the client got in each second."""
    tick_s, gap_s = 0.001, 1.0 / rps
    next_s, n, oks = h.clock.now_s, 0, []
    read = len(h.to_client)
    for tick in range(1, round(seconds / tick_s) + 1):
        h.clock.advance(tick_s)
        now_s = h.clock.now_s
        while next_s <= now_s:
            h.submit(f"{tag}-{n}", timeout_ms=timeout_ms)
            n += 1
            next_s += gap_s
        h.router.sweep()
        world.step(now_s)
        if tick % 1000 == 0:
            answers = h.to_client[read:]
            read += len(answers)
            oks.append(sum(1 for frames in answers
                           if codec.unpack_header(frames[1])["kind"] == ClientKind.RESULT))
    return oks


def settle(h: Harness, world: ServingWorld) -> None:
    """Let the world finish what it holds (1 ms ticks, at most 5 s)."""
    for _ in range(5000):
        if not h.router.pending:
            return
        h.clock.advance(0.001)
        h.router.sweep()
        world.step(h.clock.now_s)
    raise AssertionError("the world never finished its backlog")


def test_a_cold_deployment_offered_four_times_its_capacity_answers_in_time_from_the_first_second(
        ) -> None:
    # A world of 100 requests a second that has served nothing, then 400 a second with 500 ms
    # deadlines: what it admits must be what it can answer in time, from the first second on.
    h = Harness(max_batch_size=1)
    h.add_world(1, 0, b"w1")
    world = ServingWorld(h, service_s=0.010)
    oks = offer(h, world, rps=400, seconds=3.0, timeout_ms=500, tag="spike")
    assert min(oks) >= 85, oks
    settle(h, world)
    h.assert_each_answered_once()


def test_a_spike_after_a_quiet_minute_is_admitted_by_the_rate_its_world_served_at_before(
        ) -> None:
    h = Harness(max_batch_size=1)
    h.add_world(1, 0, b"w1")
    world = ServingWorld(h, service_s=0.010)
    offer(h, world, rps=50, seconds=2.0, timeout_ms=500, tag="light")
    settle(h, world)
    h.clock.advance(60.0)
    oks = offer(h, world, rps=400, seconds=1.0, timeout_ms=500, tag="spike")
    assert oks[0] >= 85, oks
    settle(h, world)
    h.assert_each_answered_once()


def test_answers_a_world_gave_without_serving_do_not_raise_the_rate_admission_assumes() -> None:
    # Work a world drops comes back as a burst of immediate answers (cancelled, or its
    # deadline passed in the world's queue): no service rate can be read from them, or
    # admission takes in far more than the world can answer in time.
    h = Harness(max_batch_size=1, max_inflight_per_world=1000)
    h.add_world(1, 0, b"w1")
    world = ServingWorld(h, service_s=0.010)
    offer(h, world, rps=400, seconds=2.0, timeout_ms=500, tag="warm")
    # Two hundred patient requests, all dispatched, then cancelled by their caller.
    for i in range(200):
        h.submit(f"patient-{i}", timeout_ms=10_000)
    h.clock.advance(0.001)
    world.step(h.clock.now_s)
    for i in range(200):
        h.router.cancel(b"client-1", f"patient-{i}")
    oks = offer(h, world, rps=400, seconds=2.0, timeout_ms=500, tag="after")
    assert min(oks) >= 85, oks
    settle(h, world)
    h.assert_each_answered_once()
