"""HeldSends: the controller's held sends run at the end of a loop iteration, or at once
after a batch; one owner's failure does not keep the others' back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from controller.held_sends import HeldSends


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
