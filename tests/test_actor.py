"""Unit tests for mesh/actor.py: mailbox order, asks and their timeouts, lifecycle, owned tasks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mesh.actor import Actor
from mesh.errors import ActorStopped

# An ask that should fail at once on close gets this long before the test calls it a hang.
PROMPT_S = 2.0


class Recorder(Actor):
    """Records every message; answers asks; can be told to block or to raise."""

    def __init__(self) -> None:
        super().__init__("recorder")
        self.seen: list[Any] = []
        self.handling = asyncio.Event()
        self.release = asyncio.Event()
        self.started_hooks: list[str] = []

    async def on_start(self) -> None:
        self.started_hooks.append("on_start")

    async def on_stop(self) -> None:
        self.started_hooks.append("on_stop")

    async def handle(self, message: Any) -> Any:
        self.seen.append(message)
        if message == "block":
            self.handling.set()
            await self.release.wait()
            return "released"
        if message == "raise":
            raise ValueError("handler failed")
        if message == "seen":
            return list(self.seen)
        return ("echo", message)


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before
              if not t.done() and t is not asyncio.current_task()]
    assert not leaked, f"tasks left running: {leaked}"


async def wait_handling(actor: Recorder) -> None:
    async with asyncio.timeout(PROMPT_S):
        await actor.handling.wait()


# -- messaging --------------------------------------------------------------------------------


async def test_start_runs_on_start_before_the_mailbox_opens() -> None:
    actor = Recorder()
    assert not actor.running
    await actor.start()
    try:
        assert actor.running
        assert actor.started_hooks == ["on_start"]
    finally:
        await actor.aclose()
    assert actor.started_hooks == ["on_start", "on_stop"]
    assert not actor.running


async def test_told_messages_are_handled_in_the_order_they_were_sent() -> None:
    async with Recorder() as actor:
        for i in range(5):
            actor.tell(i)
        assert await actor.ask("seen", timeout_s=PROMPT_S) == [0, 1, 2, 3, 4, "seen"]


async def test_ask_returns_what_the_handler_returns() -> None:
    async with Recorder() as actor:
        assert await actor.ask("hello", timeout_s=PROMPT_S) == ("echo", "hello")


async def test_an_ask_whose_handler_raises_gets_the_exception_and_the_actor_keeps_serving() -> None:
    async with Recorder() as actor:
        with pytest.raises(ValueError, match="handler failed"):
            await actor.ask("raise", timeout_s=PROMPT_S)
        assert await actor.ask("after", timeout_s=PROMPT_S) == ("echo", "after")
        assert not actor.failed.is_set()


async def test_a_told_message_whose_handler_raises_does_not_stop_the_actor() -> None:
    async with Recorder() as actor:
        actor.tell("raise")
        assert await actor.ask("after", timeout_s=PROMPT_S) == ("echo", "after")
        assert actor.running


async def test_an_ask_not_answered_in_time_raises_timeout_error() -> None:
    async with Recorder() as actor:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await actor.ask("block", timeout_s=0.05)
        assert loop.time() - started < PROMPT_S


async def test_a_timed_out_ask_does_not_wedge_the_actor() -> None:
    async with Recorder() as actor:
        with pytest.raises(TimeoutError):
            await actor.ask("block", timeout_s=0.05)
        actor.release.set()
        assert await actor.ask("next", timeout_s=PROMPT_S) == ("echo", "next")


async def test_an_ask_that_timed_out_while_queued_is_never_handled() -> None:
    async with Recorder() as actor:
        actor.tell("block")
        await wait_handling(actor)
        with pytest.raises(TimeoutError):
            await actor.ask("too-late", timeout_s=0.05)
        actor.release.set()
        assert await actor.ask("seen", timeout_s=PROMPT_S) == ["block", "seen"]


# -- stopping ---------------------------------------------------------------------------------


async def test_the_ask_being_handled_fails_with_actor_stopped_when_the_actor_closes() -> None:
    actor = Recorder()
    await actor.start()
    ask = asyncio.create_task(actor.ask("block", timeout_s=30.0))
    await wait_handling(actor)
    await actor.aclose()
    async with asyncio.timeout(PROMPT_S):
        with pytest.raises(ActorStopped):
            await ask


async def test_asks_left_in_the_mailbox_fail_with_actor_stopped_when_the_actor_closes() -> None:
    actor = Recorder()
    await actor.start()
    actor.tell("block")
    await wait_handling(actor)
    asks = [asyncio.create_task(actor.ask(i, timeout_s=30.0)) for i in range(3)]
    await asyncio.sleep(0)  # let every ask reach the mailbox
    await actor.aclose()
    async with asyncio.timeout(PROMPT_S):
        results = await asyncio.gather(*asks, return_exceptions=True)
    assert [type(r) for r in results] == [ActorStopped] * 3
    assert actor.seen == ["block"]


async def test_tell_after_close_raises_actor_stopped() -> None:
    actor = Recorder()
    await actor.start()
    await actor.aclose()
    with pytest.raises(ActorStopped):
        actor.tell("late")


async def test_ask_after_close_raises_actor_stopped() -> None:
    actor = Recorder()
    await actor.start()
    await actor.aclose()
    with pytest.raises(ActorStopped):
        await actor.ask("late", timeout_s=PROMPT_S)


async def test_an_actor_cannot_be_started_twice_or_after_close() -> None:
    actor = Recorder()
    await actor.start()
    with pytest.raises(RuntimeError):
        await actor.start()
    await actor.aclose()
    with pytest.raises(RuntimeError):
        await actor.start()


async def test_aclose_twice_runs_on_stop_once() -> None:
    actor = Recorder()
    await actor.start()
    await actor.aclose()
    await actor.aclose()
    assert actor.started_hooks == ["on_start", "on_stop"]


# -- owned tasks ------------------------------------------------------------------------------


async def test_owned_tasks_are_cancelled_and_awaited_on_aclose() -> None:
    cleaned_up = []

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned_up.append(True)

    actor = Recorder()
    await actor.start()
    task = actor.spawn(forever(), name="recorder.forever")
    await asyncio.sleep(0)
    await actor.aclose()
    assert task.cancelled()
    assert cleaned_up == [True]


async def test_a_crashing_owned_task_sets_failed_and_keeps_its_exception() -> None:
    async def crash() -> None:
        raise RuntimeError("boom")

    async with Recorder() as actor:
        actor.spawn(crash(), name="recorder.crash")
        async with asyncio.timeout(PROMPT_S):
            await actor.failed.wait()
        assert isinstance(actor.failure, RuntimeError)
        assert str(actor.failure) == "boom"


async def test_an_owned_task_that_finishes_cleanly_does_not_set_failed() -> None:
    async def fine() -> int:
        return 1

    async with Recorder() as actor:
        task = actor.spawn(fine(), name="recorder.fine")
        await task
        await asyncio.sleep(0)
        assert not actor.failed.is_set()
        assert actor.failure is None


# -- context manager --------------------------------------------------------------------------


async def test_async_with_starts_the_actor_and_closes_it_on_exit() -> None:
    async with Recorder() as actor:
        assert actor.running
        assert await actor.ask("in", timeout_s=PROMPT_S) == ("echo", "in")
    assert not actor.running
    with pytest.raises(ActorStopped):
        actor.tell("out")


async def test_async_with_closes_the_actor_when_the_body_raises() -> None:
    with pytest.raises(KeyError):
        async with Recorder() as actor:
            raise KeyError("body")
    assert not actor.running
    assert actor.started_hooks == ["on_start", "on_stop"]
