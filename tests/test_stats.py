"""Unit tests for controller/stats.py: nearest-rank percentiles and the sliding latency window."""

from __future__ import annotations

from typing import Any

import pytest

from controller.stats import LatencySummary, LatencyWindow, percentile

# -- percentile -------------------------------------------------------------------------------

# The textbook nearest-rank example: the value whose rank is ceil(q/100 * n).
TEXTBOOK = [15.0, 20.0, 35.0, 40.0, 50.0]


@pytest.mark.parametrize(
    ("q", "expected"),
    [(0, 15.0), (5, 15.0), (20, 15.0), (30, 20.0), (40, 20.0), (50, 35.0), (75, 40.0),
     (80, 40.0), (81, 50.0), (100, 50.0)],
)
def test_percentile_returns_the_nearest_rank_value(q: float, expected: float) -> None:
    assert percentile(TEXTBOOK, q) == expected


def test_percentile_of_one_to_a_hundred_is_the_percentile_itself() -> None:
    values = [float(v) for v in range(1, 101)]
    for q in range(1, 101):
        assert percentile(values, q) == q, f"p{q}"


def test_percentile_is_always_one_of_the_samples() -> None:
    values = [0.003, 0.004, 0.011, 0.5]
    for q in (0, 12.5, 33.3, 50, 66.6, 99.9, 100):
        assert percentile(values, q) in values


def test_percentile_of_no_samples_is_zero() -> None:
    assert percentile([], 99) == 0.0


def test_percentile_of_a_single_sample_is_that_sample() -> None:
    assert percentile([0.25], 1) == percentile([0.25], 99) == 0.25


# -- the window -------------------------------------------------------------------------------


def test_a_summary_reports_percentiles_and_max_in_milliseconds() -> None:
    w = LatencyWindow(window_s=10.0)
    for ms in range(1, 101):
        w.record(now_s=5.0, latency_s=ms / 1000.0)
    s = w.summary(now_s=5.0)
    assert s.count == 100
    assert s.p50_ms == pytest.approx(50.0)
    assert s.p95_ms == pytest.approx(95.0)
    assert s.p99_ms == pytest.approx(99.0)
    assert s.max_ms == pytest.approx(100.0)


def test_samples_older_than_the_window_no_longer_count() -> None:
    w = LatencyWindow(window_s=10.0)
    w.record(now_s=0.0, latency_s=1.0)  # a slow outlier, long ago
    w.record(now_s=5.0, latency_s=0.2)
    w.record(now_s=12.0, latency_s=0.1)

    at_12 = w.summary(now_s=12.0)
    assert at_12.count == 2
    assert at_12.max_ms == pytest.approx(200.0)

    at_16 = w.summary(now_s=16.0)
    assert at_16.count == 1
    assert at_16.p99_ms == pytest.approx(100.0)

    assert w.summary(now_s=30.0) == LatencySummary(0, 0.0, 0.0, 0.0, 0.0, 0.0)


def test_an_empty_window_summarises_to_zeros() -> None:
    assert LatencyWindow().summary(now_s=123.0) == LatencySummary(0, 0.0, 0.0, 0.0, 0.0, 0.0)


def test_rps_is_the_rate_over_the_window_once_it_is_full() -> None:
    w = LatencyWindow(window_s=10.0)
    for i in range(200):  # 10 requests a second for 20 seconds
        w.record(now_s=i / 10.0, latency_s=0.01)
    assert w.summary(now_s=19.95).rps == pytest.approx(10.0, rel=0.02)


def test_rps_of_a_fresh_deployment_is_over_the_time_it_has_been_serving() -> None:
    w = LatencyWindow(window_s=60.0)
    for i in range(21):  # 10 requests a second for 2 seconds
        w.record(now_s=100.0 + i / 10.0, latency_s=0.01)
    assert w.summary(now_s=102.0).rps == pytest.approx(10.5)


def test_errors_are_counted_by_code_and_stay_out_of_the_latencies() -> None:
    w = LatencyWindow()
    w.record(now_s=1.0, latency_s=0.002)
    w.record_error("deadline_exceeded")
    w.record_error("deadline_exceeded")
    w.record_error("overloaded")
    assert w.errors == {"deadline_exceeded": 2, "overloaded": 1}
    assert w.total_ok == 1
    assert w.summary(now_s=1.0).count == 1


def test_totals_keep_counting_after_samples_leave_the_window() -> None:
    w = LatencyWindow(window_s=1.0)
    w.record(now_s=0.0, latency_s=0.5)
    w.record(now_s=10.0, latency_s=0.25)
    assert w.summary(now_s=10.0).count == 1
    assert w.total_ok == 2
    assert w.latency_sum_s == pytest.approx(0.75)


def test_a_status_summary_does_not_cut_a_longer_window_a_reader_keeps() -> None:
    # The autoscaler reads p99 over upscale_delay_s, which may exceed the status window.
    w = LatencyWindow(window_s=10.0, keep_s=30.0)
    for i in range(30):
        w.record(now_s=float(i), latency_s=0.5 if i < 20 else 0.01)
    assert w.summary(now_s=30.0).count == 10
    assert w.recent(now_s=30.0, window_s=30.0) == (30, 500.0)
    w.summary(now_s=45.0)  # now samples before 15 s are past keep_s
    assert w.recent(now_s=45.0, window_s=30.0)[0] == 15


def test_the_window_keeps_at_most_max_samples_dropping_the_oldest() -> None:
    w = LatencyWindow(window_s=100.0, max_samples=3)
    for i, latency in enumerate([9.0, 0.1, 0.2, 0.3]):
        w.record(now_s=float(i), latency_s=latency)
    s = w.summary(now_s=4.0)
    assert s.count == 3
    assert s.max_ms == pytest.approx(300.0)


def test_host_cpu_reads_busy_cores_from_proc_stat(tmp_path: Any) -> None:
    from controller.host_cpu import HostCpu

    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq
    stat.write_text("cpu  100 0 100 800 0 0 0\ncpu0 ...\n")
    host = HostCpu(2, smoothing=1.0, path=stat)
    assert host.sample() is None  # one sample is no rate yet
    stat.write_text("cpu  250 0 150 900 0 0 0\n")  # +200 busy, +100 idle of +300
    assert host.sample() == pytest.approx(2 * 200 / 300)
    assert HostCpu(2, path=tmp_path / "absent").sample() is None
