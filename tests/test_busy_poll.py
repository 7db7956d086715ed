"""Busy polling: the controller's loop stays awake for ``busy_poll_us`` after each message,
and not a moment longer: an idle controller does not spin."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from controller.busy_poll import BusyPoll
from mesh.client import Client
from tests.conftest import StartCluster


class Loop:
    """A fake event loop: a clock and the callbacks ``call_soon`` queued for the next turn."""

    def __init__(self) -> None:
        self.now = 0.0
        self.ready: list[Callable[[], None]] = []

    def call_soon(self, fn: Callable[[], None]) -> object:
        self.ready.append(fn)
        return None

    def turn(self, advance_s: float) -> None:
        self.now += advance_s
        ready, self.ready = self.ready, []
        for fn in ready:
            fn()


def test_a_message_keeps_the_loop_turning_for_the_window_and_then_it_sleeps() -> None:
    loop = Loop()
    busy = BusyPoll(0.0003, clock=lambda: loop.now, call_soon=loop.call_soon)
    assert not busy.spinning and loop.ready == []
    busy.activity()
    assert busy.spinning and len(loop.ready) == 1
    loop.turn(0.0001)
    loop.turn(0.0001)
    assert busy.spinning and len(loop.ready) == 1  # still within 300 us: one callback queued
    loop.turn(0.0002)  # 400 us after the message
    assert not busy.spinning and loop.ready == []  # nothing queued: the loop may sleep


def test_each_message_extends_the_window_without_a_second_spinner() -> None:
    loop = Loop()
    busy = BusyPoll(0.0003, clock=lambda: loop.now, call_soon=loop.call_soon)
    busy.activity()
    loop.turn(0.0002)
    busy.activity()  # a new message, 200 us in
    assert len(loop.ready) == 1
    loop.turn(0.0002)  # 400 us after the first, 200 after the second
    assert busy.spinning
    loop.turn(0.0002)
    assert not busy.spinning
    assert busy.windows == 1
    busy.activity()  # after a quiet spell: a new window
    assert busy.spinning and busy.windows == 2


def test_a_closed_busy_poll_stops_spinning_and_starts_no_more() -> None:
    loop = Loop()
    busy = BusyPoll(1.0, clock=lambda: loop.now, call_soon=loop.call_soon)
    busy.activity()
    busy.close()
    loop.turn(0.0)
    assert not busy.spinning and loop.ready == []
    busy.activity()
    assert loop.ready == []


def controller_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.integration
async def test_a_busy_polling_controller_serves_and_stops_spinning_when_traffic_stops(
        cluster_factory: StartCluster) -> None:
    cluster = await cluster_factory(
        '[[deployments]]\nname = "echo"\nmodel = "worker.models.echo:build"\n',
        controller="busy_poll_us = 2000")
    x = np.arange(4, dtype=np.float32)
    pid = cluster.proc.pid
    async with Client(cluster.client) as client:
        # A request every millisecond or so: with a 2 ms window the controller never sleeps
        # in between, so it keeps most of a core busy (without busy polling, about 0.1-0.3).
        before, t0 = controller_cpu_s(pid), time.monotonic()
        while time.monotonic() - t0 < 2.0:
            out = await client.infer("echo", {"x": x}, timeout_s=10.0)
            assert np.array_equal(out["x"], x)
            await asyncio.sleep(0.001)
        busy_cores = (controller_cpu_s(pid) - before) / (time.monotonic() - t0)
        await asyncio.sleep(0.5)  # the client's pings and the workers' heartbeats go on
        before, t0 = controller_cpu_s(pid), time.monotonic()
        await asyncio.sleep(2.0)
        idle_cores = (controller_cpu_s(pid) - before) / (time.monotonic() - t0)
    # Heartbeats (every 200 ms) each start a 2 ms window: about 1% of a core at most. A
    # controller that kept spinning would use a whole one.
    assert idle_cores < 0.25, f"the idle controller used {idle_cores:.2f} cores"
    assert busy_cores > 0.5, f"the controller used {busy_cores:.2f} cores: did it spin?"
