"""Unit tests for controller/health.py: one verdict per lost worker, from exits or silence."""

from __future__ import annotations

import asyncio

import pytest

from controller.health import Health, exit_reason
from mesh.testing.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(50.0)


@pytest.fixture
def lost() -> list[tuple[str, str, bool]]:
    return []


@pytest.fixture
def health(clock: FakeClock, lost: list[tuple[str, str, bool]]) -> Health:
    return Health(timeout_ms=1000, on_lost=lambda *verdict: lost.append(verdict), clock=clock)


def test_a_beating_worker_is_never_lost(health: Health, clock: FakeClock, lost: list) -> None:
    health.watch("w1")
    for _ in range(10):
        clock.advance(0.6)
        health.beat("w1")
        assert health.check() == []
    assert lost == []


def test_a_silent_worker_is_lost_once_and_marked_for_killing(
        health: Health, clock: FakeClock, lost: list) -> None:
    health.watch("w1")
    health.watch("w2")
    clock.advance(0.9)
    health.beat("w2")
    clock.advance(0.2)
    assert health.check() == ["w1"]
    assert lost == [("w1", "no heartbeat for 1100 ms", True)]
    clock.advance(5.0)
    health.check()
    assert [w for w, _, _ in lost] == ["w1", "w2"]  # w1 not again


def test_an_exit_is_reported_at_once_and_names_the_signal(health: Health, lost: list) -> None:
    health.watch("w1")
    health.exited("w1", -9)
    assert lost == [("w1", "exited with code -9 (SIGKILL)", False)]
    assert health.check() == []


def test_an_exit_after_a_silence_verdict_is_not_a_second_loss(
        health: Health, clock: FakeClock, lost: list) -> None:
    health.watch("w1")
    clock.advance(2.0)
    health.check()
    health.exited("w1", -9)  # the process killed for its silence ends
    assert len(lost) == 1


def test_a_worker_that_dies_before_registering_is_still_reported(
        health: Health, lost: list) -> None:
    # The WorldManager counts these as failed starts and backs the launcher off.
    health.exited("w7", 3)
    assert lost == [("w7", "exited with code 3", False)]


def test_a_beat_from_an_unwatched_worker_starts_nothing(
        health: Health, clock: FakeClock, lost: list) -> None:
    health.beat("stranger")
    clock.advance(10.0)
    assert health.check() == [] and lost == []


def test_a_worker_that_registers_again_is_watched_again(
        health: Health, clock: FakeClock, lost: list) -> None:
    health.watch("remote")
    health.exited("remote", 0)
    health.watch("remote")  # its operator restarted it under the same id
    clock.advance(2.0)
    health.check()
    assert [reason for _, reason, _ in lost] == ["exited with code 0",
                                                 "no heartbeat for 2000 ms"]


@pytest.mark.parametrize(("code", "reason"), [
    (0, "exited with code 0"),
    (-15, "exited with code -15 (SIGTERM)"),
    (-250, "exited with code -250"),  # not a signal this platform names
])
def test_exit_reasons(code: int, reason: str) -> None:
    assert exit_reason(code) == reason


async def test_the_actor_checks_on_its_own() -> None:
    verdicts: list[tuple[str, str, bool]] = []
    reported = asyncio.Event()

    def on_lost(*verdict: object) -> None:
        verdicts.append(verdict)  # type: ignore[arg-type]
        reported.set()

    health = Health(timeout_ms=50, check_interval_ms=10, on_lost=on_lost)
    await health.start()
    try:
        health.watch("w1")
        await asyncio.wait_for(reported.wait(), 5.0)
    finally:
        await health.aclose()
    assert verdicts[0][0] == "w1" and verdicts[0][2] is True


def test_time_the_controller_was_not_listening_is_no_workers_silence(
        health: Health, clock: FakeClock, lost: list) -> None:
    health.watch("w1")
    health.lag.tick()
    clock.advance(3.0)  # the controller's loop was blocked: no heartbeat could be read
    health.credit(health.lag.tick())
    assert health.check() == [] and lost == []
    # Silence while listening still counts: checked every 50 ms from now on, w1 is lost once
    # it has been silent for the timeout (1 s) of listening time.
    verdicts: list[str] = []
    for _ in range(30):
        clock.advance(0.05)
        health.credit(health.lag.tick())
        verdicts += health.check()
    assert verdicts == ["w1"]
    assert lost[0][1] == "no heartbeat for 1050 ms"


def test_loop_lag_counts_only_gaps_beyond_the_period_and_its_slack(clock: FakeClock) -> None:
    from mesh.loop_lag import LoopLag

    lag = LoopLag(0.05, clock=clock)
    assert lag.tick() == 0.0
    clock.advance(0.12)  # late, within the slack (2 periods): a busy loop
    assert lag.tick() == 0.0
    clock.advance(3.0)
    assert lag.tick() == pytest.approx(3.0 - 0.05 - 0.1)
    assert lag.max_s == lag.total_s == pytest.approx(2.85)


class Links:
    """Which workers' connections are up, as the worker socket would answer a probe."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.probed: list[str] = []

    def __call__(self, worker_id: str) -> bool:
        self.probed.append(worker_id)
        return worker_id not in self.down


def probing(clock: FakeClock, lost: list, links: Links) -> Health:
    return Health(timeout_ms=1500, on_lost=lambda *verdict: lost.append(verdict), clock=clock,
                  probe_after_ms=300, grace_ms=200, reachable=links)


def test_a_worker_whose_connection_closed_is_lost_long_before_the_timeout(
        clock: FakeClock, lost: list) -> None:
    links = Links()
    health = probing(clock, lost, links)
    health.watch("w1")
    health.watch("w2")
    links.down.add("w1")  # killed: the kernel closed its connection
    clock.advance(0.25)
    health.beat("w2")
    assert health.check() == [] and links.probed == []  # nobody is late yet: no probe
    clock.advance(0.1)  # w1 late (350 ms): probed, unreachable, within the grace
    assert health.check() == [] and links.probed == ["w1"]
    clock.advance(0.15)
    assert health.check() == []
    clock.advance(0.06)  # unreachable for the grace
    assert health.check() == ["w1"]
    assert lost == [("w1", "connection closed (no heartbeat for 560 ms, unreachable for "
                           "210 ms)", True)]
    clock.advance(0.05)
    health.beat("w2")
    assert health.check() == []  # once
    assert len(lost) == 1


def test_a_late_but_connected_worker_waits_for_the_heartbeat_timeout(
        clock: FakeClock, lost: list) -> None:
    # A stopped process or a host cut off keeps its connection: only silence can judge it.
    links = Links()
    health = probing(clock, lost, links)
    health.watch("w1")
    for _ in range(29):
        clock.advance(0.05)
        assert health.check() == []
    assert links.probed.count("w1") == 23  # every check from 350 ms on
    clock.advance(0.06)
    assert health.check() == ["w1"]
    assert lost == [("w1", "no heartbeat for 1510 ms", True)]


def test_a_connection_that_comes_back_within_the_grace_is_no_loss(
        clock: FakeClock, lost: list) -> None:
    # A live worker whose connection broke reconnects (ZeroMQ retries every 100 ms); the
    # grace restarts each time the worker is heard from or reachable again.
    links = Links()
    health = probing(clock, lost, links)
    health.watch("w1")
    links.down.add("w1")
    clock.advance(0.35)
    health.check()
    clock.advance(0.15)
    links.down.clear()  # reconnected
    health.check()
    links.down.add("w1")  # and broke again: a new grace
    clock.advance(0.15)
    assert health.check() == []
    clock.advance(0.04)
    health.beat("w1")  # heard from: no longer late
    health.check()
    clock.advance(0.35)
    assert health.check() == []  # late again, the grace starts afresh
    clock.advance(0.19)
    assert health.check() == []
    clock.advance(0.02)
    assert health.check() == ["w1"]
    assert lost[0][1].startswith("connection closed")


def test_no_probe_without_a_reachability_check(clock: FakeClock, lost: list) -> None:
    links = Links()
    health = Health(timeout_ms=1500, on_lost=lambda *verdict: lost.append(verdict),
                    clock=clock, probe_after_ms=0, reachable=links)
    health.watch("w1")
    links.down.add("w1")
    clock.advance(1.0)
    assert health.check() == [] and links.probed == []
