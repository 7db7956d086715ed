"""The world communicator on real gloo pairs: messages, timeouts, peer loss, abort, close.

This process is rank 0; rank 1 is a real second process (tests/gloo_peer.py) playing a
scenario, so a peer can be killed for real (SIGKILL) and its death seen through gloo.
"""

from __future__ import annotations

import datetime
import os
import signal
import struct
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from worker.comm import (
    HEADER_BYTES,
    HEADER_TAG,
    Comm,
    CommError,
    PeerLost,
    WorldTimeout,
    classify,
)


@pytest.mark.integration
def test_a_message_carries_its_header_and_tensors_of_any_dtype_and_shape(peers: Any) -> None:
    peer = peers("echo")
    comm = peer.comm
    tensors = [torch.arange(12, dtype=torch.float32).reshape(3, 4),
               torch.ones(2, 3, dtype=torch.bfloat16),
               torch.arange(5, dtype=torch.int64),
               torch.zeros(0, 7),
               torch.tensor(3.5),
               torch.arange(16.0).reshape(4, 4).t()]  # not contiguous
    for i in range(3):
        comm.send(1, {"k": "b", "items": [[i, "client", 3]]}, tensors)
        header, got = comm.recv(1)
        assert header == {"k": "b", "items": [[i, "client", 3]]}
        assert len(got) == len(tensors)
        for sent, received in zip(tensors, got, strict=True):
            assert received.dtype == sent.dtype and received.shape == sent.shape
            torch.testing.assert_close(received, sent.contiguous())
    comm.send(1, {"k": "x"})
    assert peer.proc.wait(10) == 0


@pytest.mark.integration
def test_posted_sends_stay_outstanding_within_the_window_and_flush_waits_for_them(
        peers: Any) -> None:
    peer = peers("receive", "5")
    comm = peer.comm
    for i in range(3):
        comm.send(1, {"i": i}, [torch.full((2,), float(i))], window=8)
    # gloo learns that a send completed only by waiting on it: nothing was waited for yet.
    assert comm.pending_sends == 3
    assert [peer.line() for _ in range(3)] == ["got 1", "got 2", "got 3"]
    comm.flush()  # the peer took them all: returns at once
    assert comm.pending_sends == 0
    for i in range(2):
        comm.send(1, {"i": i}, window=1)
        assert comm.pending_sends <= 1
    comm.flush()
    assert [peer.line() for _ in range(2)] == ["got 4", "got 5"]


@pytest.mark.integration
def test_a_header_too_large_raises_value_error_and_leaves_the_world_usable(
        peers: Any) -> None:
    comm = peers("echo").comm
    with pytest.raises(ValueError, match="exceeds"):
        comm.send(1, {"blob": "x" * 5000})
    comm.send(1, {"ok": True})
    assert comm.recv(1)[0] == {"ok": True}


@pytest.mark.integration
def test_a_receive_from_a_silent_peer_times_out_as_world_timeout(peers: Any) -> None:
    comm = peers("receive", "0", timeout_s=0.5).comm
    started = time.monotonic()
    with pytest.raises(WorldTimeout):
        comm.recv(1)
    assert 0.4 < time.monotonic() - started < 3.0


@pytest.mark.integration
def test_a_flush_to_a_peer_that_stopped_receiving_times_out_as_world_timeout(
        peers: Any) -> None:
    peer = peers("receive", "1", timeout_s=0.5)
    comm = peer.comm
    comm.send(1, {"k": "p"}, window=8)
    assert peer.line() == "got 1"
    # Its next header's receive was posted when it took the first, so a header alone would
    # still go; the tensor behind it is never asked for.
    comm.send(1, {"k": "b"}, [torch.ones(4)], window=8)
    started = time.monotonic()
    with pytest.raises(WorldTimeout):
        comm.flush()
    assert time.monotonic() - started < 3.0


@pytest.mark.integration
def test_closing_a_rank_fails_its_peers_blocked_receive_at_once_as_peer_lost(
        peers: Any) -> None:
    peer = peers("receive", "1", timeout_s=30.0)
    time.sleep(0.3)  # the peer is blocked in its receive
    started = time.monotonic()
    peer.comm.close()
    assert peer.line().startswith("error peer_lost")
    assert time.monotonic() - started < 5.0  # not its 30 s timeout
    assert peer.proc.wait(10) == 3


@pytest.mark.integration
def test_an_unreadable_header_is_a_comm_error_for_the_receiver(peers: Any) -> None:
    peer = peers("echo")
    raw = struct.pack("<I", 3) + b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    buf = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    buf[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    peer.comm.pg.send([buf], 1, HEADER_TAG).wait()
    assert peer.line().startswith("error error unreadable p2p header")


def test_after_abort_every_operation_fails_at_once_with_comm_error() -> None:
    store = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=10))
    comm = Comm(world_id=1, epoch=1, rank=0, size=1, store=store, device="cpu", timeout_s=5.0,
                backend="gloo")
    comm.abort()
    comm.abort()  # idempotent
    started = time.monotonic()
    with pytest.raises(CommError, match="aborted"):
        comm.send(0, {"k": "p"})
    with pytest.raises(CommError, match="aborted"):
        comm.recv(0)
    assert time.monotonic() - started < 0.5
    comm.close()
    with pytest.raises(CommError, match="aborted"):
        comm.flush() if comm.pending_sends else comm.send(0, {"k": "p"})


def test_backend_failures_are_classified_by_their_message() -> None:
    assert isinstance(classify(RuntimeError("[pair.cc:553] Connection closed by peer")),
                      PeerLost)
    assert isinstance(classify(RuntimeError("Timed out waiting 200ms for send")), WorldTimeout)
    assert isinstance(classify(RuntimeError("Application timeout caused pair closure")),
                      WorldTimeout)
    assert isinstance(classify(dist.DistNetworkError("reset")), PeerLost)
    other = classify(RuntimeError("something else"))
    assert type(other) is CommError
    assert classify(other) is other


@pytest.mark.integration
def test_a_gloo_rank_on_a_cuda_device_stages_through_host_memory(peers: Any) -> None:
    # Building a group touches no GPU, so this runs anywhere: the rank declared on cuda:0
    # posts host buffers, and a tensor it is given on the CPU travels without a device copy.
    peer = peers("receive", "1", device="cuda:0")
    comm = peer.comm
    assert comm.backend == "gloo" and comm.staged and comm.wire.type == "cpu"
    comm.send(1, {"k": "t"}, [torch.arange(4.0)])
    assert peer.line() == "got 1"


def test_nccl_is_refused_for_a_cpu_rank() -> None:
    store = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=10))
    with pytest.raises(CommError, match="needs a CUDA device"):
        Comm(world_id=1, epoch=1, rank=0, size=1, store=store, device="cpu", timeout_s=1.0,
             backend="nccl")


@pytest.mark.integration
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_ranks_on_one_gpu_exchange_cuda_tensors_over_gloo(peers: Any) -> None:
    peer = peers("echo", device="cuda:0", peer_device="cuda:0")
    comm = peer.comm
    x = torch.arange(6.0, device="cuda:0").reshape(2, 3)
    comm.send(1, {"k": "b"}, [x])
    _, (got,) = comm.recv(1)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got, x)


@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ranks_on_two_gpus_exchange_messages_over_nccl(peers: Any) -> None:
    peer = peers("echo", device="cuda:0", peer_device="cuda:1", backend="nccl")
    comm = peer.comm
    assert comm.backend == "nccl" and not comm.staged
    for i in range(3):  # NCCL pairs operations in order: header, tensors, next header
        x = torch.arange(6.0, device="cuda:0").reshape(2, 3) * i
        comm.send(1, {"k": "b", "i": i}, [x, x[:1]])
        header, (got, first) = comm.recv(1)
        assert header == {"k": "b", "i": i}
        torch.testing.assert_close(got, x)
        torch.testing.assert_close(first, x[:1])
    comm.send(1, {"k": "x"})


# -- a peer that dies -----------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("pause_s", [0.0, 0.02, 0.1, 0.3])
def test_a_peer_killed_between_two_posted_sends_makes_the_next_call_raise_peer_lost(
        peers: Any, pause_s: float) -> None:
    peer = peers("receive", "1", timeout_s=10.0)
    comm = peer.comm
    comm.send(1, {"k": "b"}, [torch.ones(64)], window=8)
    assert peer.line() == "got 1"
    peer.kill()
    time.sleep(pause_s)  # at once, and later: the failure may come from posting or waiting
    started = time.monotonic()
    with pytest.raises(PeerLost):
        comm.send(1, {"k": "b"}, [torch.ones(64)], window=8)
        comm.send(1, {"k": "b"}, [torch.ones(64)], window=8)
        comm.flush()
    assert time.monotonic() - started < 5.0


@pytest.mark.integration
def test_a_peer_killed_while_we_wait_to_receive_is_peer_lost_at_once(peers: Any) -> None:
    peer = peers("receive", "0", timeout_s=30.0)
    os.kill(peer.proc.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(PeerLost):
        peer.comm.recv(1)
    assert time.monotonic() - started < 5.0


def test_a_rendezvous_stuck_on_a_dead_peer_does_not_hold_up_the_next_world() -> None:
    """Rank 0 of world 5 waits for a peer that died; world 6, on the same rank-0 worker and
    its store, must still form at once. With one store client per worker it waited the stuck
    rendezvous's whole timeout (the soak saw 120 s): each world now gets a client of its own
    (worker.formation.Formation.store)."""
    import threading

    from worker.formation import Formation

    master = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=30))

    def store() -> Any:
        return Formation("test").store("127.0.0.1", master.port, connect_timeout_s=6.0,
                                       timeout_s=5.0)

    stuck_failed = threading.Event()

    def stuck() -> None:
        try:
            Comm(world_id=5, epoch=1, rank=0, size=2, store=store(), device="cpu",
                 timeout_s=5.0, connect_timeout_s=6.0, bind_host="127.0.0.1")
        except CommError:
            stuck_failed.set()

    formed: list[Comm] = []

    def rank(r: int) -> None:
        formed.append(Comm(world_id=6, epoch=1, rank=r, size=2, store=store(), device="cpu",
                           timeout_s=5.0, connect_timeout_s=6.0, bind_host="127.0.0.1"))

    waiting = threading.Thread(target=stuck, daemon=True)
    waiting.start()
    time.sleep(0.5)  # world 5's rank 0 is waiting for its rank 1 now
    started = time.monotonic()
    ranks = [threading.Thread(target=rank, args=(r,), daemon=True) for r in (0, 1)]
    for t in ranks:
        t.start()
    for t in ranks:
        t.join(10)
    assert len(formed) == 2, "world 6 did not form beside the stuck world 5"
    assert time.monotonic() - started < 4.0  # not after world 5's 6 s wait
    assert not stuck_failed.is_set()  # world 5 was still waiting all the while
    for comm in formed:
        comm.close()
    waiting.join(15)
    assert stuck_failed.is_set()
