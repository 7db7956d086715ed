"""Deadline-aware admission on a fake clock (controller/admission.py)."""

from __future__ import annotations

from controller.admission import (
    ADMIT_SHARE,
    VALID_S,
    Capacity,
    TokenCapacity,
    WorldRate,
    worlds_rps,
)


def saturated(cap: Capacity, start_s: float, seconds: int, rps: int, backlog: int) -> float:
    """``rps`` answers a second for ``seconds`` seconds with ``backlog`` always waiting."""
    t = start_s
    for _ in range(seconds * rps):
        cap.answered(t, backlog)
        t += 1.0 / rps
    return t


def serve(rate: WorldRate, start_s: float, answers: int, service_s: float,
          gap_s: float = 0.0) -> float:
    """A world answers ``answers`` requests one at a time, ``service_s`` each, idle for
    ``gap_s`` between them."""
    t = start_s
    for _ in range(answers):
        rate.holding(t)
        t += service_s
        rate.answered(t, served=True, holding=False)
        t += gap_s
    return t


def test_nothing_is_refused_before_any_rate_was_measured() -> None:
    cap = Capacity(floor=4)
    assert cap.retry_after_s(0.5, backlog=10_000, timeout_s=0.5) == 0.0
    assert cap.retry_after_s(0.5, backlog=10_000, timeout_s=0.5,
                             prior_rps=worlds_rps([WorldRate().rps])) == 0.0


def test_a_worlds_rate_is_what_it_served_over_the_time_it_held_work() -> None:
    rate = WorldRate()
    # 10 ms a request, mostly idle between requests: the idle time is not service time.
    serve(rate, 0.0, answers=20, service_s=0.010, gap_s=0.090)
    assert 99 <= rate.rps <= 101
    # Held work without a break: 3 answers in 30 ms.
    held = WorldRate()
    held.holding(0.0)
    for t in (0.010, 0.020):
        held.answered(t, served=True, holding=True)
    held.answered(0.030, served=True, holding=False)
    assert 99 <= held.rps <= 101


def test_one_answer_gives_a_world_its_first_rate() -> None:
    rate = WorldRate()
    assert rate.rps == 0.0
    serve(rate, 0.0, answers=1, service_s=0.010)
    assert 99 <= rate.rps <= 101


def test_a_world_that_drops_work_without_serving_it_keeps_the_rate_it_served_at() -> None:
    rate = WorldRate()
    t = serve(rate, 0.0, answers=100, service_s=0.010)
    # Two hundred expired requests answered at once, then two more served.
    rate.holding(t)
    for _ in range(200):
        rate.answered(t, served=False, holding=True)
    t = serve(rate, t + 0.010, answers=2, service_s=0.010)
    assert 90 <= rate.rps <= 101


def test_the_worlds_rates_add_up_and_a_world_with_none_yet_counts_as_their_mean() -> None:
    assert worlds_rps([]) == 0.0
    assert worlds_rps([0.0, 0.0]) == 0.0
    assert worlds_rps([100.0, 50.0]) == 150.0
    assert worlds_rps([100.0, 50.0, 0.0]) == 225.0


def test_a_cold_deployment_refuses_what_its_first_answers_say_cannot_finish_in_time() -> None:
    cap = Capacity(floor=4)
    rate = WorldRate()
    t = serve(rate, 0.0, answers=1, service_s=0.010)
    prior = worlds_rps([rate.rps])
    # About 100 a second: 0.8 * 0.5 s * 100 = 40 may wait ahead.
    assert cap.retry_after_s(t, backlog=30, timeout_s=0.5, prior_rps=prior) == 0.0
    retry = cap.retry_after_s(t, backlog=80, timeout_s=0.5, prior_rps=prior)
    assert 0.35 < retry < 0.45


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


def test_an_old_measurement_expires_and_gives_way_to_the_worlds_own_rates() -> None:
    cap = Capacity(floor=4)
    t = saturated(cap, 0.0, 3, rps=100, backlog=20)
    assert cap.retry_after_s(t, backlog=500, timeout_s=0.5) > 0.0
    later = t + VALID_S + 2.0
    assert cap.retry_after_s(later, backlog=500, timeout_s=0.5) == 0.0
    # What the worlds measured while they served (they still exist) holds after it expires.
    assert cap.rate_rps(later, prior_rps=50.0) == 50.0
    assert cap.retry_after_s(later, backlog=500, timeout_s=0.5, prior_rps=50.0) > 0.0
    # A fresh saturated measurement comes first.
    assert 95 <= cap.rate_rps(t, prior_rps=50.0) <= 105


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
