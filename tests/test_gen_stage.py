"""A generative world's serving logic (worker/gen_stage.py) with the real tinygpt: a one-stage
world here, and a two-stage world on a real gloo pair (rank 1's GenInner in a process of its
own, tests/gloo_peer.py). No socket and no thread: the test calls ``accept`` and ``step`` as a
runner would and reads the answers from a list."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from mesh import codec, dataplane
from mesh.errors import Unavailable
from mesh.messages import ClientKind, request_header
from mesh.spec import DeploymentSpec
from tests.gloo_peer import Peer
from worker.gen_stage import GenEntry
from worker.loader import load_handler
from worker.models.tinygpt import generate
from worker.world import Compute, World

TINY = {"name": "tinygpt", "model": "worker.models.tinygpt:build"}
PROMPTS = ["hello", "The quick brown fox", "a", "pipelines kept full", "x" * 40, "KV",
           "0123456789", "stream seven"]

PeersFn = Callable[..., Peer]


def entry(deployment: dict[str, Any], *, size: int = 1, peer: Peer | None = None,
          ) -> tuple[GenEntry, list[list[Any]]]:
    spec = DeploymentSpec(**deployment)
    handler = load_handler(spec, "cpu", stage=0, stages=size)
    world = World(world_id=1, epoch=1, rank=0, size=size, deployment=spec, handler=handler,
                  comm=peer.comm if peer is not None else None)
    sent: list[list[Any]] = []
    stage = GenEntry(world, send=sent.append, compute=Compute(),
                     on_broken=lambda *args: pytest.fail(f"broken: {args}"))
    stage.prepare()
    return stage, sent


def dispatch(rid: int, prompt: str, *, kind: str = ClientKind.STREAM, timeout_ms: int = 60_000,
             **params: Any) -> list[Any]:
    frames = codec.encode(request_header(kind, f"c{rid}", "tinygpt", {"prompt": prompt},
                                         timeout_ms, params))
    return [dataplane.pack_dispatch(rid, 1, 1, timeout_ms), *[bytes(f) for f in frames]]


def answers(sent: list[list[Any]]) -> list[dict[str, Any]]:
    out = []
    for frames in sent:
        for head, part in dataplane.replies(dataplane.unpack(frames[0]), frames[1:]):
            header = codec.decode([bytes(f) for f in part], codec.to_numpy)
            out.append({"rid": head.rid, "status": head.status, "kind": header.get("kind"),
                        "code": header.get("code"), "seq": header.get("seq"),
                        "tokens": header.get("tokens"), "outputs": header.get("outputs"),
                        "message": header.get("message")})
    return out


def run_until(stage: GenEntry, done: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        stage.step()


def texts(replies: list[dict[str, Any]]) -> dict[int, str]:
    """Each stream's text, from its chunks in order (checking they are numbered 0, 1, ...)."""
    by_rid: dict[int, list[dict[str, Any]]] = {}
    for r in replies:
        if r["kind"] == ClientKind.CHUNK:
            by_rid.setdefault(r["rid"], []).append(r)
    out = {}
    for rid, chunks in by_rid.items():
        assert [c["seq"] for c in chunks] == list(range(chunks[0]["seq"],
                                                       chunks[0]["seq"] + len(chunks)))
        out[rid] = "".join(c["outputs"]["text"] for c in chunks)
    return out


def ended(replies: list[dict[str, Any]]) -> set[int]:
    return {r["rid"] for r in replies if r["kind"] in (ClientKind.END, ClientKind.ERROR,
                                                        ClientKind.RESULT)}


def test_eight_streams_decoded_together_each_equal_the_prompt_decoded_alone() -> None:
    stage, sent = entry(TINY)
    for rid, prompt in enumerate(PROMPTS, 1):
        stage.accept(dispatch(rid, prompt, max_tokens=24))
    stage.accept(dispatch(99, "whole", kind=ClientKind.INFER, max_tokens=10))
    run_until(stage, lambda: stage.idle)
    replies = answers(sent)
    got = texts(replies)
    assert got == {rid: generate(p, 24) for rid, p in enumerate(PROMPTS, 1)}
    [result] = [r for r in replies if r["kind"] == ClientKind.RESULT]
    assert result["outputs"] == {"text": generate("whole", 10), "finish_reason": "length",
                                 "prompt_tokens": 5, "completion_tokens": 10}
    ends = [r for r in replies if r["kind"] == ClientKind.END]
    assert len(ends) == len(PROMPTS) and all(r["status"] == dataplane.OK for r in ends)
    # Several sequences shared each micro-batch: far fewer steps than tokens.
    assert stage.stats.batches < 24 * len(PROMPTS) // 3
    assert stage.cache.used_bytes == 0 and stage.scheduler.used_blocks == 0


def test_a_seeded_sampled_stream_repeats_and_resumes_exactly_from_its_delivered_tokens(
        ) -> None:
    stage, sent = entry(TINY)
    for rid in (1, 2):
        stage.accept(dispatch(rid, "sample me", max_tokens=30, temperature=0.9, top_k=20,
                              seed=1234))
    run_until(stage, lambda: stage.idle)
    replies = answers(sent)
    got = texts(replies)
    assert got[1] == got[2] and got[1] != generate("sample me", 30)
    chunks = [r for r in replies if r["rid"] == 1 and r["kind"] == ClientKind.CHUNK]
    delivered = [t for c in chunks[:11] for t in c["tokens"]]
    sent.clear()
    stage.accept(dispatch(3, "sample me", max_tokens=30, temperature=0.9, top_k=20, seed=1234,
                          resume={"tokens": delivered, "chunks": 11}))
    run_until(stage, lambda: stage.idle)
    rest = [r for r in answers(sent) if r["kind"] == ClientKind.CHUNK]
    assert rest[0]["seq"] == 11
    assert "".join(c["outputs"]["text"] for c in chunks[:11] + rest) == got[1]
    # The resume was prefilled, not generated: 19 tokens sampled, not 30.
    assert sum(len(c["tokens"]) for c in rest) == 19


def test_a_cancelled_stream_ends_at_once_and_frees_its_kv() -> None:
    stage, sent = entry(TINY)
    stage.accept(dispatch(1, "keep going", max_tokens=200))
    stage.accept(dispatch(2, "stop soon", max_tokens=200))
    for _ in range(5):
        stage.step()
    used = stage.cache.used_bytes
    stage.accept([dataplane.pack(dataplane.CancelWork(2, 1, 1))])
    stage.step()
    stage.step()  # within two micro-batches its KV is gone
    assert stage.cache.used_bytes < used
    run_until(stage, lambda: stage.idle)
    replies = answers(sent)
    [cancel] = [r for r in replies if r["rid"] == 2 and r["kind"] == ClientKind.ERROR]
    assert cancel["code"] == "cancelled"
    after = [r for r in replies[replies.index(cancel):] if r["rid"] == 2]
    assert after == [cancel]  # nothing after its final answer
    assert texts(replies)[1] == generate("keep going", 200)


@pytest.mark.parametrize(("params", "message"), [
    ({"max_tokens": 257}, "max_tokens must be an integer in 1..256"),
    ({"temperature": -1}, "temperature must lie in [0, 100]"),
    ({"top_p": 0}, "top_p must lie in (0, 1]"),
    ({"bogus": 1}, "unknown parameter 'bogus'"),
])
def test_bad_sampling_parameters_get_a_bad_request_naming_the_limit(params: dict[str, Any],
                                                                     message: str) -> None:
    stage, sent = entry(TINY)
    stage.accept(dispatch(1, "hi", **params))
    stage.flush()
    [reply] = answers(sent)
    assert reply["code"] == "bad_request" and message in reply["message"]


def test_a_prompt_longer_than_the_kv_budget_gets_a_bad_request_naming_it() -> None:
    stage, sent = entry({**TINY, "kv_cache_mb": 0.125})  # 128 KiB: 32 positions of tinygpt
    stage.accept(dispatch(1, "x" * 30, max_tokens=10))
    stage.accept(dispatch(2, "é", max_tokens=10))
    stage.flush()
    first, second = answers(sent)
    assert first["code"] == "bad_request"
    assert "= 40 exceeds the KV budget of 32 tokens" in first["message"]
    assert "kv_cache_mb = 0.125" in first["message"]
    assert second["code"] == "bad_request" and "outside printable ASCII" in second["message"]


@pytest.mark.integration
def test_two_stages_with_a_tight_kv_budget_preempt_and_still_give_every_stream_exactly(
        peers: PeersFn) -> None:
    deployment = {**TINY, "stages": 2, "kv_cache_mb": 0.5}  # 512 KiB a stage
    peer = peers("geninner", json.dumps(deployment), timeout_s=10.0)
    stage, sent = entry(deployment, size=2, peer=peer)
    assert stage.scheduler.total_blocks == 16  # 256 positions: rank 1 said it holds as many
    for rid, prompt in enumerate(PROMPTS, 1):
        stage.accept(dispatch(rid, prompt, max_tokens=40))
    peak = 0
    while not stage.idle:
        stage.step()
        peak = max(peak, stage.cache.used_bytes)
        assert stage.scheduler.used_blocks <= stage.scheduler.total_blocks
    assert peak <= stage.cache.budget_bytes
    assert stage.scheduler.preemptions > 0
    stage.finish(Unavailable("closing"), graceful=True)
    replies = []
    while True:
        line = peer.line()
        if line.startswith("kv "):
            assert line == "kv 0"  # rank 1 freed every sequence it held
            break
        replies.append(json.loads(line.removeprefix("reply ")))
    assert peer.proc.wait(10) == 0
    assert texts(replies) == {rid: generate(p, 40) for rid, p in enumerate(PROMPTS, 1)}
    assert sent == []  # the last stage answered everything
