"""The benchmarks' judges (bench/elastic.py, bench/autoscale.py) on made-up timelines: the
compressed day, the oracle schedule, direction changes, SLO windows, worker-seconds, and how
long the worlds take to come down after a fall."""

from __future__ import annotations

from bench.autoscale import settle_after_fall
from bench.elastic import Day, direction_changes, oracle_worlds, windows_within, worker_seconds
from mesh.loadgen import Second


def row(t: float, *, done: int = 10, p99: float = 50.0, worlds: int = 1,
        workers: int = 1) -> Second:
    return Second(t=t, target_rps=0.0, sent=done, done=done, p99_ms=p99, worlds=worlds,
                  workers=workers)


def test_the_day_is_quiet_at_night_peaks_at_noon_and_spikes_twice() -> None:
    day = Day(duration_s=600, night_rps=10, peak_rps=100, spike_rps=150, spike_s=10)
    assert day.rate(0) == day.rate(599) == 10  # night at both ends
    assert day.rate(300) == 100  # noon
    assert 10 < day.rate(150) < 100 and 10 < day.rate(450) < 100  # the slow sine between
    assert day.rate(0.33 * 600) == day.rate(0.72 * 600) == 150  # the spikes
    assert day.rate(0.33 * 600 + 6) < 150  # ... are sharp: 10 s wide
    rates = [day.rate(t) for t in range(600)]
    assert sum(r == 150 for r in rates) == 2 * 9  # whole seconds strictly within 5 s of each


def test_the_oracle_needs_the_fewest_worlds_that_hold_the_rate_within_bounds() -> None:
    assert oracle_worlds(0, 40, 1, 6) == 1  # never below min_worlds
    assert oracle_worlds(40, 40, 1, 6) == 1  # exactly what one holds
    assert oracle_worlds(40.5, 40, 1, 6) == 2
    assert oracle_worlds(1000, 40, 1, 6) == 6  # never above max_worlds


def test_direction_changes_count_turns_not_steps_or_flat_stretches() -> None:
    assert direction_changes([]) == 0
    assert direction_changes([1, 2, 3, 4, 4, 4]) == 0  # up in steps: no turn
    assert direction_changes([1, 2, 3, 3, 2, 1]) == 1  # up, a flat top, down
    assert direction_changes([1, 2, 1, 2, 1]) == 3  # flapping
    assert direction_changes([2, 2, 1, 1, 3]) == 1


def test_windows_without_answers_are_not_judged_and_a_late_p99_misses() -> None:
    seconds = [row(1, p99=50), row(2, p99=151), row(3, done=0, p99=0), row(4, p99=150)]
    assert windows_within(seconds, 150.0) == (2, 3)


def test_worker_seconds_carry_a_failed_poll_over_from_the_row_before() -> None:
    seconds = [row(1, workers=2), row(2, workers=-1), row(3, workers=3), row(4, workers=1)]
    assert worker_seconds(seconds) == 2 + 2 + 3 + 1


def test_after_a_fall_the_worlds_settle_to_what_the_base_load_held_before_the_step() -> None:
    worlds = [1] * 10 + [2, 3, 4, 4] + [4, 4, 3, 2, 2, 1, 1, 1]  # fall after t=14
    seconds = [row(t + 1, worlds=w) for t, w in enumerate(worlds)]
    assert settle_after_fall(seconds, fall_t=14.0) == (4, 1, 6.0)  # down to 1 at t=20
    stuck = [row(t + 1, worlds=w) for t, w in enumerate([1] * 10 + [4] * 12)]
    assert settle_after_fall(stuck, fall_t=14.0) == (4, 1, None)
