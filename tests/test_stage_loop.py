"""A world's serving logic on a real gloo pair: rank 0's EntryStage here, rank 1's InnerStage in
a process of its own (tests/gloo_peer.py). No socket and no thread: the test calls ``accept``
and ``step`` as a runner would, and reads the answers from a list.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from mesh import codec, dataplane
from mesh.errors import Unavailable
from mesh.messages import ClientKind, request_header
from mesh.spec import DeploymentSpec
from tests.gloo_peer import Peer
from worker.comm import PeerLost, WorldTimeout
from worker.loader import load_handler
from worker.stage_loop import EntryStage
from worker.world import Compute, World

MLP = {"name": "mlp", "model": "worker.models.mlp:build", "factory_kwargs": {"hidden": 64},
       "max_batch_size": 8, "max_batch_delay_ms": 0.0, "micro_batches": 2}

PeersFn = Callable[..., Peer]


def entry_for(peer: Peer, deployment: dict[str, Any]) -> tuple[EntryStage, list[list[Any]],
                                                                 list[tuple[Any, ...]]]:
    spec = DeploymentSpec(**deployment)
    handler = load_handler(spec, "cpu", stage=0, stages=2)
    world = World(world_id=1, epoch=1, rank=0, size=2, deployment=spec, handler=handler,
                  comm=peer.comm)
    sent: list[list[Any]] = []
    broken: list[tuple[Any, ...]] = []
    stage = EntryStage(world, send=sent.append, compute=Compute(),
                       on_broken=lambda *args: broken.append(args))
    return stage, sent, broken


def dispatch(rid: int, x: np.ndarray, timeout_ms: int = 10_000) -> list[Any]:
    frames = codec.encode(request_header(ClientKind.INFER, f"c{rid}", "mlp", {"x": x},
                                         timeout_ms))
    return [dataplane.pack_dispatch(rid, 1, 1, timeout_ms), *[bytes(f) for f in frames]]


def run_until(stage: EntryStage, done: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        wait = stage.wait_s()
        time.sleep(min(0.05, wait if wait is not None else 0.05))
        stage.step()


def read_replies(peer: Peer, count: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(count):
        line = peer.line()
        assert line.startswith("reply "), line
        out.append(json.loads(line.removeprefix("reply ")))
    return out


@pytest.mark.integration
def test_a_two_stage_world_computes_the_unsplit_model_and_closes_on_purpose(
        peers: PeersFn) -> None:
    peer = peers("inner", json.dumps(MLP), timeout_s=5.0)
    stage, sent, broken = entry_for(peer, MLP)
    rng = np.random.default_rng(0)
    xs = {rid: rng.standard_normal((rows, 64)).astype(np.float32)
          for rid, rows in ((1, 1), (2, 3), (3, 2), (4, 5))}
    for rid, x in xs.items():
        stage.accept(dispatch(rid, x))
    run_until(stage, lambda: stage.idle, 10.0)
    stage.finish(Unavailable("closing"), graceful=True)
    replies = read_replies(peer, len(xs))
    assert peer.proc.wait(10) == 0  # it ended on the Close, not on an error
    assert sent == [] and broken == []  # the last stage answered everything
    from worker.models.mlp import build

    model = build(hidden=64)
    with torch.inference_mode():
        for reply in replies:
            assert reply["status"] == dataplane.OK and reply["kind"] == "result"
            want = model(torch.from_numpy(xs[reply["rid"]]))
            torch.testing.assert_close(torch.tensor(reply["outputs"]["y"]), want)
    assert sorted(r["rid"] for r in replies) == sorted(xs)


@pytest.mark.integration
def test_an_idle_world_stays_up_through_many_timeouts_on_keepalives(peers: PeersFn) -> None:
    # World timeout 0.6 s: 8 s idle is over 13 timeouts. Rank 0 keeps the world alive with
    # keepalives every 0.15 s and learns each time, from a completed flush, that rank 1 still
    # takes what it is sent.
    peer = peers("inner", json.dumps(MLP), timeout_s=0.6)
    stage, sent, broken = entry_for(peer, MLP)
    started = time.monotonic()
    keepalives = 0
    while time.monotonic() - started < 8.0:
        before = stage.last_sent_s
        run_until(stage, lambda before=before: stage.last_sent_s != before, 2.0)
        keepalives += 1
    assert broken == [] and stage.broken is None and sent == []
    assert keepalives >= 8.0 / 0.6
    # Still a working world after the idle stretch.
    stage.accept(dispatch(7, np.ones((2, 64), np.float32)))
    run_until(stage, lambda: stage.idle, 10.0)
    stage.finish(Unavailable("closing"), graceful=True)
    (reply,) = read_replies(peer, 1)
    assert reply["rid"] == 7 and reply["status"] == dataplane.OK
    assert peer.proc.wait(10) == 0


@pytest.mark.integration
def test_an_idle_world_whose_next_rank_stops_taking_breaks_on_a_world_timeout(
        peers: PeersFn) -> None:
    peer = peers("receive", "1", timeout_s=0.5)
    stage, sent, broken = entry_for(peer, MLP)
    started = time.monotonic()
    run_until(stage, lambda: stage.broken is not None, 5.0)
    assert isinstance(stage.broken, WorldTimeout)
    assert sent == []  # it held no request
    assert broken and broken[0][:2] == (1, 1) and broken[0][3] is False
    # Two keepalives go through (one taken, one into the posted header receive), then the
    # flush before the third waits out the timeout.
    assert time.monotonic() - started < 0.5 / 4 * 3 + 0.5 + 1.5


@pytest.mark.integration
@pytest.mark.parametrize("round_", range(3))
def test_a_next_rank_killed_while_batches_are_posted_answers_unavailable_never_model_error(
        peers: PeersFn, round_: int) -> None:
    peer = peers("receive", "2", timeout_s=5.0)
    stage, sent, broken = entry_for(peer, MLP)
    stage.accept(dispatch(1, np.ones((1, 64), np.float32)))
    stage.accept(dispatch(2, np.ones((1, 64), np.float32)))
    stage.step()  # one batch of two requests, two micro-batches: both posted
    assert [peer.line(), peer.line()] == ["got 1", "got 2"]
    peer.kill()
    time.sleep(0.05 * round_)
    rids = list(range(10, 18))
    for rid in rids:
        stage.accept(dispatch(rid, np.ones((1, 64), np.float32)))
    run_until(stage, lambda: stage.broken is not None, 10.0)
    assert isinstance(stage.broken, PeerLost)
    assert broken and broken[0][3] is True  # reported as a lost peer
    answers = {}
    for message in sent:
        batch = dataplane.replies(dataplane.unpack(message[0]), message[1:])
        assert batch, message
        for head, frames in batch:
            header = codec.unpack_header(frames[0])
            assert head.status == dataplane.ERROR
            assert head.code == header["code"]  # the code travels in the fixed part too
            answers[head.rid] = header["code"]
    assert set(answers) == set(rids)
    assert set(answers.values()) == {"unavailable"}, answers


@pytest.mark.integration
def test_time_rank_0_spends_blocked_on_a_slower_next_rank_is_not_counted_busy(
        peers: PeersFn) -> None:
    # Rank 1 takes two messages, then stops taking: rank 0 fills its send window and then
    # blocks on the next send until the world times out. That wait is rank 1's slowness, not
    # rank 0's cost: were it counted, the controller would see every stage of a backed-up
    # pipeline as costly as its bottleneck and never share the cheap one (controller/sharing).
    peer = peers("receive", "2", timeout_s=1.0)
    stage, _, _ = entry_for(peer, {**MLP, "max_batch_size": 1, "micro_batches": 1})
    for rid in range(1, 20):
        stage.accept(dispatch(rid, np.ones((1, 64), np.float32)))
    started = time.monotonic()
    run_until(stage, lambda: stage.broken is not None, 10.0)
    assert isinstance(stage.broken, WorldTimeout)
    assert peer.comm.waited_s >= 0.9  # it did block for about the world's timeout
    assert time.monotonic() - started >= 0.9
    assert stage.stats.requests >= 10
    assert stage.stats.busy_s < 0.4, stage.stats.busy_s


def one_rank_mlp() -> tuple[Any, EntryStage, list[list[Any]]]:
    """A one-rank mlp world on the CPU: its handler, its EntryStage and what it sent."""
    spec = DeploymentSpec(**{**MLP, "micro_batches": 1})
    handler = load_handler(spec, "cpu", stage=0, stages=1)
    world = World(world_id=1, epoch=1, rank=0, size=1, deployment=spec, handler=handler,
                  comm=None)
    sent: list[list[Any]] = []
    return handler, EntryStage(world, send=sent.append, compute=Compute(), on_broken=print), sent


def test_a_one_rank_world_answers_a_batch_of_dispatches_in_one_message() -> None:
    handler, stage, sent = one_rank_mlp()
    xs = {rid: np.full((1, 64), rid, np.float32) for rid in (1, 2, 3)}
    parts = [dispatch(rid, x)[1:] for rid, x in xs.items()]
    bad = codec.encode(request_header(ClientKind.INFER, "c9", "mlp", {"x": np.ones((1, 3),
                                                                                   np.float32)},
                                      10_000))
    parts.append([bytes(f) for f in bad])  # refused by validation: answered in the same batch
    items = [(rid, 10_000, len(part)) for rid, part in zip((1, 2, 3, 9), parts, strict=True)]
    stage.accept([dataplane.pack_dispatch_batch(1, 1, items), *[f for p in parts for f in p]])
    stage.flush()
    assert len(sent) == 1  # the refusal, alone so far
    stage.step()
    assert len(sent) == 2  # three results: one message
    answers = {head.rid: (head.status, codec.decode([bytes(f) for f in frames]))
               for message in sent
               for head, frames in dataplane.replies(dataplane.unpack(message[0]), message[1:])}
    assert sorted(answers) == [1, 2, 3, 9]
    assert answers[9][0] == dataplane.ERROR and answers[9][1]["code"] == "bad_request"
    with torch.inference_mode():
        for rid, x in xs.items():
            status, body = answers[rid]
            assert status == dataplane.OK and body["id"] == f"c{rid}"
            # Each request its own row. A batch of three and a single row take different
            # matrix kernels on some CPUs (seen on the GPU host's): equal to rounding only.
            np.testing.assert_allclose(body["outputs"]["y"],
                                       handler.module(torch.from_numpy(x)).numpy(),
                                       rtol=1e-4, atol=1e-6)
    # A batch whose frame counts do not add up is dropped whole: nothing in it is trusted.
    stage.accept([dataplane.pack_dispatch_batch(1, 1, [(5, 10_000, 2), (6, 10_000, 2)]),
                  *parts[0], *parts[1][:1]])
    stage.flush()
    stage.step()
    assert len(sent) == 2 and not stage.queued


def test_a_one_rank_world_takes_a_packed_batch_of_dispatches_and_drops_a_bad_one_whole(
        ) -> None:
    handler, stage, sent = one_rank_mlp()
    xs = {1: np.full((1, 64), 1, np.float32), 2: np.full((3, 64), 2, np.float32)}
    requests = [(rid, 10_000, dispatch(rid, x)[1:]) for rid, x in xs.items()]
    stage.accept(dataplane.pack_dispatches(1, 1, requests))
    stage.flush()
    stage.step()
    answers = {head.rid: codec.decode([bytes(f) for f in frames])
               for message in sent
               for head, frames in dataplane.replies(dataplane.unpack(message[0]), message[1:])}
    assert sorted(answers) == [1, 2]
    with torch.inference_mode():
        for rid, x in xs.items():
            assert answers[rid]["id"] == f"c{rid}"
            np.testing.assert_allclose(answers[rid]["outputs"]["y"],
                                       handler.module(torch.from_numpy(x)).numpy(),
                                       rtol=1e-4, atol=1e-6)
    bad = dataplane.pack_dispatches(1, 1, requests)
    bad[1] = bad[1][:-1]  # the pack a byte short: no request in it is trusted
    stage.accept(bad)
    stage.flush()
    stage.step()
    assert len(sent) == 1 and not stage.queued
