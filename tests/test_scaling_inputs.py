"""What the autoscaler sees of the fleet (controller/scaling_inputs.py): one world's service
rate, the fleet's capacity, a world's CPU; all from the workers' smoothed load."""

from __future__ import annotations

import pytest

from controller.records import WorkerInfo, WorkerLoad, WorldInfo
from controller.scaling_inputs import capacity_rps, generative_pressure, world_cpu, world_rps


def workers(**loads: tuple[float, float, float]) -> dict[str, WorkerInfo]:
    """id=(cost_ms, util, cpu_cores)"""
    return {wid: WorkerInfo(wid, since_s=0.0, load=WorkerLoad(util, cost, cpu))
            for wid, (cost, util, cpu) in loads.items()}


def world(wid: int, *members: str) -> WorldInfo:
    return WorldInfo(wid, "d", 1, list(members), created_s=0.0)


FLEET = workers(a=(8.0, 0.5, 0.5), b=(16.0, 0.9, 1.0), c=(16.0, 0.8, 1.0), d=(0.0, 0.0, 0.0))


def test_a_worlds_rate_is_its_slowest_stage_averaged_over_the_worlds() -> None:
    assert world_rps([world(1, "a", "b")], FLEET) == pytest.approx(62.5)
    assert world_rps([world(1, "a"), world(2, "b")], FLEET) == pytest.approx((125 + 62.5) / 2)
    assert world_rps([world(1, "a", "d")], FLEET) == 0.0  # a cost still unknown


def test_capacity_is_the_slowest_stage_of_the_summed_rates_of_distinct_workers() -> None:
    shared = [world(1, "a", "b"), world(2, "a", "c")]
    # Stage 0: one shared worker at 125/s (counted once); stage 1: two at 62.5/s each.
    assert capacity_rps(shared, FLEET) == pytest.approx(125.0)
    assert capacity_rps(shared[:1], FLEET) == pytest.approx(62.5)
    assert capacity_rps([world(1, "a", "d")], FLEET) == 0.0
    assert capacity_rps([], FLEET) == 0.0


def test_a_worlds_cpu_is_its_workers_cores_over_their_busy_fraction() -> None:
    # b: 1 core at 90% busy, with a: 0.5 cores -> 1.5 / 0.9 when fully busy.
    assert world_cpu([world(1, "a", "b")], FLEET) == pytest.approx(1.5 / 0.9)
    assert world_cpu([world(1, "d")], FLEET) == 0.0  # idle: not judged


def test_a_generative_deployment_is_scaled_on_its_first_token_or_its_token_rate() -> None:
    # TTFT p99 200 ms against 400: half the target, so a latency of 200 ms against 400.
    assert generative_pressure((30, 200.0), (0, 0.0), 400.0, 0.0) == (30, 200.0, 400.0)
    # TPOT p50 30 ms against 20 (1.5x) is further over its target than the TTFT: it is what
    # the policy sees, as 1.5 x the TTFT target, with the TPOT's samples.
    assert generative_pressure((30, 200.0), (25, 30.0), 400.0, 20.0) == (25, 600.0, 400.0)
    # No first token measured yet: the TPOT alone.
    assert generative_pressure((0, 0.0), (5, 10.0), 400.0, 20.0) == (5, 200.0, 400.0)
