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
    for frames in sent:
        head = dataplane.unpack(frames[0])
        header = codec.unpack_header(frames[1])
        assert type(head) is dataplane.Reply and head.status == dataplane.ERROR
        assert head.code == header["code"]  # the code travels in the fixed part too
        answers[head.rid] = header["code"]
    assert set(answers) == set(rids)
    assert set(answers.values()) == {"unavailable"}, answers
