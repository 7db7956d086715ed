"""Deadline-aware admission on a fake clock (controller/admission.py)."""

from __future__ import annotations

from controller.admission import ADMIT_SHARE, VALID_S, Capacity, TokenCapacity


def saturated(cap: Capacity, start_s: float, seconds: int, rps: int, backlog: int) -> float:
    """``rps`` answers a second for ``seconds`` seconds with ``backlog`` always waiting."""
    t = start_s
    for _ in range(seconds * rps):
        cap.answered(t, backlog)
        t += 1.0 / rps
    return t


def test_nothing_is_refused_before_a_saturated_rate_was_measured() -> None:
    cap = Capacity(floor=4)
    assert cap.retry_after_s(0.5, backlog=10_000, timeout_s=0.5) == 0.0


def test_an_idle_deployments_low_answer_rate_is_not_taken_for_its_capacity() -> None:
    cap = Capacity(floor=4)
    t = 0.0
    for _ in range(30):  # 10 answers a second, the backlog often empty
        cap.answered(t, 0)
        t += 0.1
    assert cap.estimate() == 0.0
    assert cap.retry_after_s(t, backlog=500, timeout_s=0.5) == 0.0


def test_a_saturated_deployment_admits_what_it_can_answer_in_time_and_refuses_the_rest() -> None:
    cap = Capacity(floor=4)
    t = saturated(cap, 0.0, 3, rps=100, backlog=20)
    assert 95 <= cap.estimate() <= 105
    # 500 ms deadlines: about 0.8 * 0.5 * 100 = 40 requests may wait ahead.
    assert cap.retry_after_s(t, backlog=30, timeout_s=0.5) == 0.0
    retry = cap.retry_after_s(t, backlog=80, timeout_s=0.5)
    assert 0.35 < retry < 0.45  # 81 / 100 - 0.4
    # A longer deadline waits behind the same backlog.
    assert cap.retry_after_s(t, backlog=80, timeout_s=5.0) == 0.0
    assert ADMIT_SHARE == 0.8


def test_a_backlog_below_the_floor_is_always_admitted() -> None:
    cap = Capacity(floor=64)
    t = saturated(cap, 0.0, 8, rps=10, backlog=100)  # 80 answers: a full window
    assert cap.retry_after_s(t, backlog=63, timeout_s=0.1) == 0.0
    assert cap.retry_after_s(t, backlog=64, timeout_s=0.1) > 0.0


def test_an_old_measurement_expires() -> None:
    cap = Capacity(floor=4)
    t = saturated(cap, 0.0, 3, rps=100, backlog=20)
    assert cap.retry_after_s(t, backlog=500, timeout_s=0.5) > 0.0
    later = t + VALID_S + 2.0
    assert cap.retry_after_s(later, backlog=500, timeout_s=0.5) == 0.0


def test_answers_given_without_service_are_not_taken_for_a_saturated_rate() -> None:
    cap = Capacity(floor=4)
    t = saturated(cap, 0.0, 3, rps=100, backlog=20)
    for i in range(200):  # an expired backlog answered in 2 ms
        cap.answered(t + i * 1e-5, backlog=300, served=False)
    t = saturated(cap, t + 0.01, 1, rps=100, backlog=20)
    assert 95 <= cap.estimate() <= 105


def test_capacity_follows_a_change_of_service_rate() -> None:
    cap = Capacity(floor=4)
    t = saturated(cap, 0.0, 3, rps=100, backlog=20)
    t = saturated(cap, t, 5, rps=200, backlog=20)  # a second world joined
    assert cap.estimate() > 180


def test_a_generative_deployment_is_admitted_by_the_tokens_ahead_of_a_request() -> None:
    cap = TokenCapacity(floor=8)
    assert cap.retry_after_s(0.0, backlog_tokens=1_000_000, timeout_s=1.0) == 0.0  # unknown
    t = 0.0
    for _ in range(300):  # 2,000 tokens a second, in chunks of 20, 16 sequences unanswered
        cap.delivered(t, 20, backlog=16)
        t += 0.01
    assert 1900 <= cap.rate <= 2100
    # 10 s deadlines: 0.8 * 10 * 2,000 = 16,000 tokens may be ahead.
    assert cap.retry_after_s(t, backlog_tokens=15_000, timeout_s=10.0) == 0.0
    retry = cap.retry_after_s(t, backlog_tokens=20_000, timeout_s=10.0)
    assert 1.8 < retry < 2.2  # 20,000 / 2,000 - 8 s
    # Tokens delivered while few sequences run say nothing of capacity, and clear the window.
    cap.delivered(t, 5, backlog=2)
    cap.delivered(t + 0.1, 5, backlog=2)
    assert cap.retry_after_s(t + VALID_S + 1.0, backlog_tokens=20_000, timeout_s=10.0) == 0.0
