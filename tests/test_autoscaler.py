"""The autoscaling policy, driven by a fake clock: no sleeping, no processes."""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Any

from controller.autoscaler import Autoscaler, Context, State, decide
from mesh.testing.clock import FakeClock


def ctx(now: float, **kw: Any) -> Context:
    base = dict(now_s=now, slo_p99_ms=100.0, p99_ms=40.0, samples=500, arrival_rps=100.0,
                queued=0, serving=2, forming=0, desired=2, min_worlds=1, max_worlds=8,
                world_rps=100.0, upscale_delay_s=2.0, downscale_delay_s=30.0)
    base.update(kw)
    rate = base["world_rps"]
    base.setdefault("capacity_rps", rate * base["serving"] if rate else 0.0)  # type: ignore[operator]
    return Context(**base)  # type: ignore[arg-type]


class Sim:
    """Runs decide() every tick of a fake clock; worlds appear after a start-up delay."""

    def __init__(self, *, start_s: float = 0.5, tick_s: float = 0.5, **kw: Any) -> None:
        self.now = 0.0
        self.tick_s = tick_s
        self.start_s = start_s
        self.state = State()
        self.desired = kw.pop("desired", 2)
        self.serving = self.desired
        self.forming: list[float] = []  # ready times
        self.kw = kw
        self.changes: list[tuple[float, int]] = []
        self.reasons: list[str] = []

    def step(self, **load: Any) -> int:
        """One tick; a load value may be a function of the serving worlds (a host-bound
        rate)."""
        self.now += self.tick_s
        ready = [t for t in self.forming if t <= self.now]
        self.forming = [t for t in self.forming if t > self.now]
        self.serving += len(ready)
        values = {k: v(self.serving) if callable(v) else v
                  for k, v in {**self.kw, **load}.items()}
        c = ctx(self.now, desired=self.desired, serving=self.serving,
                forming=len(self.forming), **values)
        target, self.state, why = decide(c, self.state)
        self.reasons.append(why)
        if target > self.desired:
            self.forming += [self.now + self.start_s] * (target - self.desired)
        elif target < self.desired:
            self.serving -= self.desired - target
        if target != self.desired:
            self.changes.append((self.now, target))
        self.desired = target
        return target

    def run(self, seconds: float, **load: Any) -> None:
        end = self.now + seconds
        while self.now < end:
            self.step(**load)


def test_a_steady_load_under_the_target_changes_nothing() -> None:
    sim = Sim()
    sim.run(120, p99_ms=40.0, arrival_rps=100.0)  # 2 worlds at 100/s each: 50% busy
    assert sim.changes == []


def test_a_latency_breach_scales_up_within_the_upscale_delay() -> None:
    sim = Sim()
    sim.run(10, p99_ms=40.0, arrival_rps=100.0)
    breach_at = sim.now
    sim.run(5, p99_ms=250.0, arrival_rps=140.0, world_rps=0.0)  # rate unknown: latency only
    assert sim.changes, "no scale-up"
    t, target = sim.changes[0]
    assert target == 3
    assert 2.0 <= t - breach_at <= 2.0 + sim.tick_s


def test_a_predicted_breach_scales_up_at_once_to_what_the_arrival_rate_needs() -> None:
    sim = Sim()
    sim.run(5, p99_ms=40.0, arrival_rps=100.0)
    t0 = sim.now
    sim.step(p99_ms=45.0, arrival_rps=400.0)  # 4x: needs ceil(400 / (100 * 0.75)) = 6
    assert sim.changes == [(t0 + sim.tick_s, 6)]


def test_forming_worlds_count_as_capacity_so_a_slow_start_is_not_answered_twice() -> None:
    sim = Sim(start_s=5.0)
    sim.run(20, p99_ms=300.0, arrival_rps=100.0, world_rps=0.0)
    ups = [t for t, _ in sim.changes]
    # One step every (start-up + delay), not one per tick while the new world starts.
    assert all(b - a >= 5.0 for a, b in itertools.pairwise(ups))


def test_a_step_down_gives_back_what_the_load_does_not_need_once_the_delay_has_passed(
        ) -> None:
    """6 worlds of 100/s each, and the load falls to 60/s: after downscale_delay_s of
    headroom it goes straight to 2 worlds (60/s stays under half of their 200/s), not one world
    per delay; then it holds (one world would be over half its capacity)."""
    sim = Sim(desired=6)
    down_at = sim.now
    sim.run(200, p99_ms=20.0, arrival_rps=60.0)
    assert len(sim.changes) == 1, sim.changes
    [(when, worlds)] = sim.changes
    assert worlds == 2 and 30.0 <= when - down_at <= 31.0
    assert any(r.startswith("down:") and "2 world(s) enough" in r for r in sim.reasons)


def test_after_a_4x_fall_the_worlds_come_down_within_the_delay_and_ten_seconds() -> None:
    sim = Sim(desired=1, world_rps=100.0)
    sim.run(20, p99_ms=60.0, arrival_rps=300.0)  # up to what 300/s needs
    assert sim.desired == 4
    fell_at = sim.now
    sim.run(60, p99_ms=10.0, arrival_rps=75.0)  # a quarter of it
    assert sim.desired == 2  # 75/s under half of 2 x 100/s
    assert sim.changes[-1][0] - fell_at <= 30.0 + 10.0


def test_with_nothing_arriving_it_goes_to_min_worlds_at_once_after_the_delay() -> None:
    sim = Sim(desired=5, min_worlds=1)
    sim.run(40, p99_ms=0.0, samples=0, arrival_rps=0.0)
    assert [w for _, w in sim.changes] == [1]


def test_bounds_are_respected_both_ways() -> None:
    sim = Sim(desired=2, min_worlds=2, max_worlds=3)
    sim.run(60, p99_ms=500.0, arrival_rps=10_000.0)
    assert max(w for _, w in sim.changes) == 3 and sim.desired == 3
    sim.run(300, p99_ms=1.0, arrival_rps=1.0)
    assert sim.desired == 2
    target, _, why = decide(ctx(0.0, desired=9, max_worlds=4), State())
    assert target == 4 and "bounds" in why


def test_a_noisy_steady_load_never_oscillates() -> None:
    for seed in range(30):
        rng = random.Random(seed)
        sim = Sim(desired=3)
        for _ in range(1200):  # 10 minutes of 0.5 s ticks
            sim.step(p99_ms=max(1.0, rng.gauss(45.0, 12.0)),
                     arrival_rps=max(0.0, rng.gauss(150.0, 25.0)),
                     world_rps=max(1.0, rng.gauss(100.0, 8.0)))
        directions = [1 if b > a else -1 for (_, a), (_, b) in
                      zip([(0.0, 3), *sim.changes], sim.changes, strict=False)]
        flips = sum(1 for a, b in itertools.pairwise(directions) if a != b)
        assert flips == 0, (seed, sim.changes)


def test_the_actor_applies_decisions_and_keeps_the_last_one_with_its_reason() -> None:
    clock = FakeClock(0.0)
    applied: list[tuple[str, int, str]] = []
    contexts = {"a": ctx(0.0, p99_ms=400.0, arrival_rps=100.0, world_rps=0.0), "b": None}

    def context_of(name: str, t: float) -> Context | None:
        c = contexts[name]
        return None if c is None else dataclasses.replace(c, now_s=t)

    scaler = Autoscaler(["a", "b"], context_of=context_of,
                        apply=lambda n, w, r: applied.append((n, w, r)), clock=clock)
    for _ in range(6):
        clock.advance(0.5)
        scaler.tick()
    assert applied and applied[0][:2] == ("a", 3) and "p99" in applied[0][2]
    assert scaler.last["a"].to_worlds == 3
    assert "b" not in scaler.last


def test_a_policy_error_is_logged_and_the_other_deployments_still_tick() -> None:
    applied: list[str] = []

    def context_of(name: str, t: float) -> Context | None:
        if name == "broken":
            raise RuntimeError("boom")
        return ctx(t, p99_ms=400.0, arrival_rps=1000.0)

    scaler = Autoscaler(["broken", "ok"], context_of=context_of,
                        apply=lambda n, w, r: applied.append(n), clock=lambda: 1.0)
    scaler.tick()
    assert applied == ["ok"]


def test_a_deployment_scaled_to_zero_comes_back_when_requests_arrive() -> None:
    target, _, why = decide(ctx(5.0, desired=0, serving=0, min_worlds=0, queued=3,
                                arrival_rps=0.0, world_rps=0.0, samples=0), State())
    assert target == 1 and "no world" in why
    target, _, _ = decide(ctx(5.0, desired=0, serving=0, min_worlds=0, queued=0,
                              arrival_rps=0.0, world_rps=0.0, samples=0), State())
    assert target == 0


def host_bound(serving: int, *, per_host: float = 1000.0) -> float:
    """A host with no room: however many worlds, together they serve ``per_host``/s."""
    return per_host / max(1, serving)


def test_worlds_that_add_no_service_rate_are_given_back_and_not_tried_again_soon() -> None:
    # One world serves 1000/s with the host to itself; arrivals of 900/s predict a need for
    # two (at 75% target utilisation). The second world only halves the first's rate.
    sim = Sim(desired=1, min_worlds=1, p99_ms=30.0, arrival_rps=900.0, world_rps=host_bound)
    sim.run(30.0)
    reasons = sim.reasons
    assert [w for _, w in sim.changes] == [2, 1], sim.changes
    up_at, down_at = (t for t, _ in sim.changes)
    # Back once the second world had served for the probe time (3 s) after forming (0.5 s).
    assert 3.0 <= down_at - up_at <= 3.0 + 0.5 + 2 * sim.tick_s
    down = next(r for r in reasons if r.startswith("down"))
    assert "no more than 1 served (1000/s)" in down and "holding at 1" in down
    assert reasons[-1].startswith("holding at 1: 2 worlds served 1000/s")
    # The ceiling holds for hold_s (300 s), then one new probe is allowed.
    sim.run(250.0)
    assert len(sim.changes) == 2
    sim.run(60.0)
    assert [w for _, w in sim.changes] == [2, 1, 2, 1]


def test_worlds_that_do_add_service_rate_are_kept() -> None:
    sim = Sim(desired=1)
    sim.run(30.0, p99_ms=30.0, arrival_rps=900.0, world_rps=1000.0)  # each world its own
    assert [w for _, w in sim.changes] == [2]
    assert sim.state.probe is None and sim.state.ceiling is None


def test_an_operator_scale_during_a_probe_ends_it() -> None:
    state = State()
    target, state, _ = decide(ctx(1.0, desired=1, serving=1, arrival_rps=900.0,
                                  world_rps=1000.0, p99_ms=30.0), state)
    assert target == 2 and state.probe is not None
    _, state, _ = decide(ctx(1.5, desired=3, serving=1, forming=2, arrival_rps=900.0,
                             world_rps=1000.0, p99_ms=30.0), state)
    assert state.probe is None


def test_no_world_is_added_that_the_hosts_free_cores_cannot_run() -> None:
    # 2 cores, both busy; a world of this deployment keeps 1.9 busy: not even tried.
    busy = ctx(1.0, desired=1, serving=1, arrival_rps=900.0, world_rps=1000.0, p99_ms=30.0,
               host_cores=2, host_busy_cores=1.95, world_cpu=1.9)
    target, state, why = decide(busy, State())
    assert target == 1 and state.probe is None
    assert why.startswith("holding at 1: the host's CPU is busy (1.9 of 2 cores)")
    # With 8 cores and 2 busy, three more such worlds fit (the arrival rate wants 6).
    roomy = dataclasses.replace(busy, arrival_rps=4000.0, host_cores=8, host_busy_cores=2.0)
    target, _, why = decide(roomy, State())
    assert target == 4 and "capped at 4" in why
    # A model that waits instead of computing (a fixed service time) is not held back.
    waits = dataclasses.replace(busy, world_cpu=0.05)
    assert decide(waits, State())[0] == 2
    # An unknown host (remote workers) is not either: the probe judges.
    assert decide(dataclasses.replace(busy, host_cores=0), State())[0] == 2


def test_the_latency_policys_thresholds_come_from_its_config() -> None:
    """[autoscaler] sets what were constants: with min_samples 5, 10 slow answers are a
    breach; with the default 20 they are noise. A policy is anything with initial/decide."""
    from controller.autoscaler import LatencyPolicy, ScalingPolicy, policy_of
    from controller.autoscaler_config import AutoscalerConfig

    slow = ctx(10.0, p99_ms=500.0, samples=10, arrival_rps=0.0, world_rps=0.0)
    default: ScalingPolicy[State] = LatencyPolicy()
    eager = policy_of(AutoscalerConfig(min_samples=5))
    state = default.initial()
    for now in (10.0, 13.0):
        target, state, why = default.decide(dataclasses.replace(slow, now_s=now), state)
    assert target == slow.desired, why
    state = eager.initial()
    for now in (10.0, 13.0):
        target, state, why = eager.decide(dataclasses.replace(slow, now_s=now), state)
    assert target == slow.desired + 1 and why.startswith("up: p99"), why
