"""HeldSends: the controller's held sends run at the end of a loop iteration, or at once
after a batch; one owner's failure does not keep the others' back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from controller.backend import Backend
from controller.frontend import Frontend
from controller.held_sends import HeldSends
from controller.routers import Routers
from mesh.messages import PROTOCOL_VERSION, batch_header, split_batch
from mesh.testing.ports import free_port
from worker.world import Replier


class Soon:
    """A fake ``call_soon``: runs what was scheduled when told the iteration ended."""

    def __init__(self) -> None:
        self.scheduled: list[Callable[[], None]] = []

    def __call__(self, fn: Callable[[], None]) -> object:
        self.scheduled.append(fn)
        return None

    def end_iteration(self) -> None:
        due, self.scheduled = self.scheduled, []
        for fn in due:
            fn()


def test_deferred_flushes_run_once_at_the_iteration_end_in_the_order_deferred() -> None:
    soon = Soon()
    held = HeldSends(soon)
    ran: list[str] = []
    held.defer(lambda: ran.append("router"))
    held.defer(lambda: ran.append("frontend"))
    assert ran == [] and len(soon.scheduled) == 1  # one wake-up for all of them
    soon.end_iteration()
    assert ran == ["router", "frontend"]
    soon.end_iteration()
    assert ran == ["router", "frontend"]


def test_now_runs_them_early_and_the_iteration_end_finds_nothing_left() -> None:
    soon = Soon()
    held = HeldSends(soon)
    ran: list[str] = []
    held.defer(lambda: ran.append("a"))
    held.now()
    assert ran == ["a"]
    held.defer(lambda: ran.append("b"))  # deferred again before the iteration ends
    assert len(soon.scheduled) == 1  # the pending end-of-iteration run covers it
    soon.end_iteration()
    assert ran == ["a", "b"]
    held.defer(lambda: ran.append("c"))  # a new iteration schedules a new run
    assert len(soon.scheduled) == 1
    soon.end_iteration()
    assert ran == ["a", "b", "c"]


def test_a_flush_that_defers_another_gets_it_run_in_the_same_pass() -> None:
    soon = Soon()
    held = HeldSends(soon)
    ran: list[str] = []

    def router_flush() -> None:
        ran.append("router")
        held.defer(lambda: ran.append("frontend"))  # e.g. a world could not be reached

    held.defer(router_flush)
    held.now()
    assert ran == ["router", "frontend"]


def test_a_failing_flush_is_logged_and_the_others_still_run(
        caplog: pytest.LogCaptureFixture) -> None:
    soon = Soon()
    held = HeldSends(soon)
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("a bug in one owner")

    held.defer(broken)
    held.defer(lambda: ran.append("frontend"))
    soon.end_iteration()
    assert ran == ["frontend"]
    assert "a held send failed" in caplog.text


async def test_without_an_injected_call_soon_it_uses_the_running_loop() -> None:
    held = HeldSends()
    ran: list[str] = []
    held.defer(lambda: ran.append("x"))
    assert ran == []
    await asyncio.sleep(0)
    assert ran == ["x"]


# -- wired to real sockets: the frontend and the backend flush after a batch ---------------

def ping(rid: int) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "kind": "ping", "id": rid})


async def answers(sock: zmq.asyncio.Socket, wait_s: float) -> list[Any]:
    """The ids of every answer that arrives within ``wait_s`` (batches unpacked)."""
    ids: list[Any] = []
    while await sock.poll(int(wait_s * 1000)):
        frames = await sock.recv_multipart()
        head = msgpack.unpackb(frames[0])
        if head.get("kind") == "batch":
            ids += [msgpack.unpackb(part[0])["id"] for part in split_batch(head, frames[1:])]
        else:
            ids.append(head["id"])
    return ids


async def test_a_clients_batch_is_answered_without_waiting_for_the_loops_turn() -> None:
    soon = Soon()  # never told the iteration ended unless the test says so
    held = HeldSends(soon)
    context = zmq.asyncio.Context()
    frontend = Frontend(context, f"tcp://127.0.0.1:{free_port()}", max_request_bytes=1 << 20,
                        defer=held.defer, after_batch=held.now)
    frontend.start(Routers.of({}))
    client = context.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(frontend.endpoint)
    try:
        await client.send_multipart([msgpack.packb(batch_header([1, 1])), ping(1), ping(2)])
        assert sorted(await answers(client, 1.0)) == [1, 2]
        # A lone message from the same (batching) client waits for the end of the turn.
        await client.send(ping(3))
        assert await answers(client, 0.3) == []
        soon.end_iteration()
        assert await answers(client, 1.0) == [3]
    finally:
        client.close(0)
        frontend.close()
        context.destroy(0)


class Routes:
    """The part of a Router that the backend calls for a reply."""

    def __init__(self) -> None:
        self.replies: list[int] = []

    def on_reply(self, head: Any, frames: list[Any], sender: bytes) -> None:
        self.replies.append(head.rid)


async def test_a_workers_batch_of_replies_is_passed_on_at_once() -> None:
    flushed: list[int] = []
    context = zmq.asyncio.Context()
    backend = Backend(context, f"tcp://127.0.0.1:{free_port()}",
                      after_batch=lambda: flushed.append(1))
    routes = Routes()
    backend.start(route={7: routes}.get,  # type: ignore[arg-type]
                  on_heartbeat=lambda *a: None, on_control=lambda *a: None)
    worker = zmq.Context()
    sock = worker.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(backend.endpoint)
    try:
        replier = Replier(7, 1, sock.send_multipart)
        for rid in (1, 2):
            replier.result(rid, rid, {"y": 1})
        replier.flush()  # one message, two replies
        for _ in range(100):
            if routes.replies:
                break
            await asyncio.sleep(0.01)
        assert routes.replies == [1, 2] and flushed == [1]
        replier.result(3, 3, {"y": 1})
        replier.flush()  # one reply alone: it waits for the end of the turn
        for _ in range(100):
            if len(routes.replies) == 3:
                break
            await asyncio.sleep(0.01)
        assert routes.replies == [1, 2, 3] and flushed == [1]
    finally:
        sock.close(0)
        worker.term()
        backend.close()
        context.destroy(0)
