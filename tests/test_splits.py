"""Unit tests for worker/splits.py: the cut of a pipeline model by measured cost, chosen by a
pure function, measured on a fake clock, and the same on every rank (rank 0's, through a
real store in this process)."""

from __future__ import annotations

import datetime
import itertools
import logging
import random
import threading
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mesh.spec import DeploymentSpec
from worker.comm import CommError
from worker.formation import Formation, FormationAborted
from worker.handler import TensorHandler
from worker.loader import build_handler, load_handler, split_for
from worker.splits import (
    Split,
    SplitMemo,
    balance,
    choose,
    decode,
    encode,
    example_batch,
    measure_children,
    publish,
    receive,
    stage_costs,
)
from worker.stages import split_points_for

# What a ResNet-18 in an nn.Sequential costs per child (ms; stem conv, bn, relu, maxpool,
# four layers, avgpool, flatten, fc), and where its weights are: by weight, everything up to
# the last layer is stage 0.
RESNET_MS = [9.5, 3.4, 0.1, 12.8, 13.6, 23.6, 17.3, 47.9, 0.1, 0.0, 0.01]
RESNET_BY_WEIGHT = [8]


def slowest(costs: list[float], points: list[int]) -> float:
    return max(stage_costs(costs, points))


# -- the choice ----------------------------------------------------------------------------


def test_a_resnet_like_model_is_cut_where_both_stages_cost_about_the_same() -> None:
    points = balance(RESNET_MS, 2, prefer=RESNET_BY_WEIGHT)
    first, second = stage_costs(RESNET_MS, points)
    assert points == [6]
    assert max(first, second) / min(first, second) < 1.1
    by_weight = stage_costs(RESNET_MS, RESNET_BY_WEIGHT)
    assert by_weight[0] / by_weight[1] > 1000  # what the cut by weight did


def test_the_cut_minimises_the_slowest_stage_against_every_other_cut() -> None:
    rng = random.Random(30)
    for _ in range(400):
        n = rng.randint(1, 9)
        stages = rng.randint(1, n)
        costs = [rng.choice([0.0, rng.uniform(0, 10), rng.uniform(0, 0.1)]) for _ in range(n)]
        points = balance(costs, stages, tolerance=0.0)
        assert len(points) == stages - 1 and points == sorted(set(points))
        assert all(0 < p < n for p in points)
        best = min(slowest(costs, list(q))
                   for q in itertools.combinations(range(1, n), stages - 1))
        assert slowest(costs, points) <= best + 1e-9, (costs, stages, points)


def test_within_the_tolerance_the_cut_nearest_the_preferred_one_wins() -> None:
    # An mlp: two big Linear layers with cheap ones around them. Cutting before or after the
    # ReLU between them costs the same to within noise; the cut by weight (3) is kept, so two
    # workers that measure it a little differently agree.
    mlp = [0.2, 0.01, 9.4, 0.01, 9.4, 0.01, 0.03]
    noisy = [0.2, 0.01, 9.3, 0.02, 9.5, 0.01, 0.03]
    assert balance(mlp, 2, prefer=[3]) == balance(noisy, 2, prefer=[3]) == [3]
    assert balance(mlp, 2, prefer=[4]) == [4]
    # Outside the tolerance the preference counts for nothing.
    assert balance([1.0, 1.0, 1.0, 5.0], 2, prefer=[1]) == [3]


def test_with_no_preference_the_most_even_of_the_best_cuts_wins() -> None:
    assert balance([1.0] * 10, 3) == [3, 6]
    assert balance([1.0] * 9, 3) == [3, 6]
    assert balance([0.0, 0.0, 0.0], 2) == [1]


def test_every_stage_gets_a_child_even_when_one_child_dominates() -> None:
    assert balance([100.0, 1.0, 1.0, 1.0], 3) == [1, 2]
    assert balance([1.0, 1.0, 1.0, 100.0], 3) == [1, 3]  # the most even of the best
    assert balance([5.0, 4.0, 3.0, 2.0, 1.0], 5) == [1, 2, 3, 4]


def test_the_cut_is_a_function_of_its_arguments_alone() -> None:
    rng = random.Random(7)
    costs = [rng.uniform(0, 5) for _ in range(40)]
    first = balance(costs, 6, prefer=[5, 10, 15, 20, 30])
    assert all(balance(list(costs), 6, prefer=[5, 10, 15, 20, 30]) == first for _ in range(5))
    assert balance(costs, 1) == []


@pytest.mark.parametrize("costs,stages", [([1.0], 2), ([], 1), ([1.0, -1.0], 2),
                                          ([1.0, float("nan")], 2), ([1.0, 2.0], 0)])
def test_impossible_cuts_and_bad_costs_are_refused(costs: list[float], stages: int) -> None:
    with pytest.raises(ValueError):
        balance(costs, stages)


# -- the record ----------------------------------------------------------------------------


def test_a_split_describes_each_stages_children_and_cost_and_travels_as_msgpack() -> None:
    split = Split((2, 5), 6, "measured", (1.0, 2.0, 3.0, 4.0, 5.0, 6.25), 16)
    assert split.describe() == {"basis": "measured", "rows": 16, "stages": [
        {"children": [0, 1], "ms": 3.0}, {"children": [2, 4], "ms": 12.0},
        {"children": [5, 5], "ms": 6.25}]}
    assert decode(encode(split)) == split
    assert decode(encode(None)) is None
    unmeasured = Split((1,), 3, "parameters")
    assert [s["ms"] for s in unmeasured.describe()["stages"]] == [None, None]


# -- measuring -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Takes(nn.Module):
    """A child that takes ``ms`` on the fake clock (plus ``extra_ms`` on its ``slow_runs``
    first timed runs: another process's burst of load), and adds one."""

    def __init__(self, clock: FakeClock, ms: float, extra_ms: float = 0.0,
                 slow_runs: int = 0) -> None:
        super().__init__()
        self.clock, self.ms, self.extra_ms, self.slow_runs = clock, ms, extra_ms, slow_runs
        self.runs = 0
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.runs += 1
        extra = self.extra_ms if 1 < self.runs <= 1 + self.slow_runs else 0.0  # after warm-up
        self.clock.now += (self.ms + extra) / 1000.0
        return x + 1


def test_each_child_is_measured_on_its_predecessors_output_by_its_least_time() -> None:
    clock = FakeClock()
    children = [Takes(clock, 2.0), Takes(clock, 5.0, extra_ms=50.0, slow_runs=3),
                Takes(clock, 1.0)]
    seen: list[float] = []
    children[2].register_forward_pre_hook(lambda _m, args: seen.append(float(args[0][0])))
    costs = measure_children(nn.Sequential(*children), torch.zeros(4), "cpu", clock=clock)
    assert costs == pytest.approx([2.0, 5.0, 1.0])  # the burst on child 1 is not its cost
    assert seen and set(seen) == {2.0}  # child 2 ran on child 1's output of child 0's
    assert all(c.runs == 1 + 20 for c in children)  # one warm-up pass, twenty timed ones


def test_measuring_stops_early_when_a_pass_is_slow_but_measures_once_at_least() -> None:
    clock = FakeClock()
    children = [Takes(clock, 3000.0)]
    costs = measure_children(nn.Sequential(*children), torch.zeros(1), "cpu", clock=clock)
    assert costs == pytest.approx([3000.0])
    assert children[0].runs == 2  # warm-up and one timed pass: over the budget


def test_an_example_batch_is_built_from_the_input_spec_of_one_tensor() -> None:
    x = example_batch({"x": {"dtype": "float32", "shape": [1, 3, 8, 8]}}, 5)
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x, example_batch({"x": {"dtype": "float32", "shape": [1, 3, 8, 8]}}, 5))
    ids = example_batch({"x": {"dtype": "int64", "shape": [1, 12]}}, 2)
    assert ids.dtype == torch.int64 and not ids.any()  # valid token ids
    for spec in ({"x": {"dtype": "float32", "shape": [1]}}, {"prompt": {"dtype": "str"}},
                 {"a": {"dtype": "float32", "shape": [1, 2]}, "b": {}}, {},
                 {"x": {"dtype": "nonsense", "shape": [1, 2]}}):
        assert example_batch(spec, 4) is None, spec


def test_a_module_is_cut_by_measured_cost_and_by_weight_when_it_cannot_be_measured(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    model = nn.Sequential(nn.Linear(4, 4), Takes(clock, 1.0), nn.Linear(4, 400), nn.ReLU())
    spec = {"x": {"dtype": "float32", "shape": [1, 4]}}
    split = choose(model, 2, configured=[], inputs=spec, device="cpu", rows=3)
    assert split.basis == "measured" and split.rows == 3 and len(split.child_ms) == 4
    assert choose(model, 2, configured=[1], inputs=spec, device="cpu", rows=3) == \
        Split((1,), 4, "config")
    with caplog.at_level(logging.WARNING, logger="worker.splits"):
        unmeasured = choose(model, 2, configured=[], inputs={"prompt": {}}, device="cpu",
                            rows=3, label="m")
        broken = choose(model, 2, configured=[], inputs={"x": {"dtype": "float32",
                                                               "shape": [1, 5]}},
                        device="cpu", rows=3, label="m")
    assert unmeasured == broken == Split(tuple(split_points_for(model, 2)), 4, "parameters")
    assert "no example input" in caplog.text and "measuring its children failed" in caplog.text


def test_measuring_leaves_the_weights_and_the_rngs_state_as_they_were() -> None:
    from worker.models.resnet import build

    model = build(width=4, image=32)
    model.train()  # as a factory may return it: batch norm would learn from the example
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    choose(model, 2, configured=[], inputs=TensorHandler(model).input_spec(), device="cpu",
           rows=2)
    assert torch.equal(rng, torch.get_rng_state())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- loading a stage at a cut --------------------------------------------------------------


def resnet_spec(**fields: Any) -> DeploymentSpec:
    return DeploymentSpec(name="resnet", model="worker.models.resnet:build",
                          factory_kwargs={"width": 4, "image": 32}, **{"stages": 2, **fields})


def test_a_stage_loads_at_the_cut_it_is_given_and_describes_it() -> None:
    spec = resnet_spec()
    cut = Split((6,), 11, "measured", tuple(float(i) for i in range(11)), 16)
    first = load_handler(spec, "cpu", stage=0, stages=2, split=cut)
    second = load_handler(spec, "cpu", stage=1, stages=2, split=cut)
    assert list(first.module._modules) == [str(i) for i in range(6)]
    assert list(second.module._modules) == [str(i) for i in range(6, 11)]
    assert first.describe()["split"] == second.describe()["split"] == cut.describe()
    # With no cut given, as before: by weight, and nothing to describe.
    plain = load_handler(spec, "cpu", stage=1, stages=2)
    assert list(plain.module._modules) == ["8", "9", "10"] and "split" not in plain.describe()


def test_a_handler_that_cuts_itself_gets_no_cut_and_a_one_stage_model_none() -> None:
    gpt = DeploymentSpec(name="g", model="worker.models.tinygpt:build", stages=2)
    assert split_for(build_handler(gpt), gpt, "cpu", 2) is None
    assert split_for(build_handler(resnet_spec()), resnet_spec(stages=1), "cpu", 1) is None
    cut = split_for(build_handler(resnet_spec()), resnet_spec(), "cpu", 2)
    assert cut is not None and cut.basis == "measured" and len(cut.points) == 1


# -- one cut per deployment on a worker, and across the ranks of a world -------------------


def test_a_worker_keeps_the_first_cut_it_met_for_each_deployment() -> None:
    memo = SplitMemo(kept=2)
    memo.remember("a", Split((1,), 2, "measured"))
    memo.remember("a", Split((2,), 3, "measured"))
    memo.remember("b", None)
    assert "b" in memo and memo.get("b") is None
    assert memo.get("a") == Split((1,), 2, "measured")
    memo.remember("c", None)  # a was used last: b goes
    assert "a" in memo and "b" not in memo and "c" in memo


@pytest.fixture
def store() -> Any:
    return dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=10))


def test_a_later_rank_waits_for_rank_zeros_cut_and_takes_exactly_it(store: Any) -> None:
    formation = Formation("world 3/1")
    cut = Split((5,), 11, "measured", tuple([1.5] * 11), 8)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(receive(
        store, "split/3/1/t", lambda ready: formation.wait(ready, 10.0, "cut"))))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # nothing published yet
    publish(store, "split/3/1/t", cut)
    waiter.join(5.0)
    assert got == [cut]


def test_waiting_for_a_cut_ends_at_once_when_the_formation_is_aborted(store: Any) -> None:
    formation = Formation("world 3/1")
    failed: list[BaseException] = []

    def wait() -> None:
        try:
            receive(store, "split/3/1/never", lambda ready: formation.wait(ready, 30.0, "cut"))
        except BaseException as exc:
            failed.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    formation.abort("the controller gave up on the world")
    waiter.join(2.0)
    assert not waiter.is_alive() and isinstance(failed[0], FormationAborted)


def test_a_cut_that_does_not_decode_is_a_comm_error(store: Any) -> None:
    store.set("split/3/1/bad", b"\xc1")
    with pytest.raises(CommError, match="does not decode"):
        receive(store, "split/3/1/bad", lambda ready: None)


@pytest.fixture
def agent() -> Any:
    """A worker agent that is never started: its stages are loaded by hand."""
    from worker.agent import WorkerAgent

    agent = WorkerAgent(controller="tcp://127.0.0.1:9", worker_id="w1", device="cpu")
    agent._link.close()
    yield agent
    agent._loader_pool.shutdown()
    agent._form_pool.shutdown()
    agent._context.term()


def test_a_worker_holds_each_stage_under_its_cut_and_leads_worlds_with_the_first_it_met(
        agent: Any) -> None:
    spec = resnet_spec()
    rank0s_cut, another = Split((6,), 11, "measured"), Split((5,), 11, "measured")
    one = agent._handler_for(spec, 1, 2, 1, split=rank0s_cut, decided=True)
    assert agent._handler_for(spec, 1, 2, 2, split=rank0s_cut, decided=True) is one
    other = agent._handler_for(spec, 1, 2, 3, split=another, decided=True)
    assert other is not one and next(iter(other.module._modules)) == "5"
    # Leading a world of the same deployment, this worker cuts as the first cut it met:
    # measuring again could disagree with the stages it holds.
    lead = agent._handler_for(spec, 0, 2, 4)
    assert lead.pipeline_split == rank0s_cut and list(lead.module._modules)[-1] == "5"
    assert len(agent._stages) == 3


# -- what the controller shows --------------------------------------------------------------


def test_the_controller_shows_how_the_serving_world_is_cut_and_a_rollouts_once_it_serves(
        ) -> None:
    from controller.describe import describe_fleet, stage_split
    from controller.mailbox import FromWorker, WorldIdle
    from controller.records import WorldState
    from mesh.messages import ApplyArgs, Join, Joined, JoinFailed
    from tests.test_fleet import Rig
    from tests.test_fleet_apply import config

    resnet = {"name": "r", "model": "worker.models.resnet:build", "stages": 2, "worlds": 1,
              "min_worlds": 0}
    f = Rig(config(resnet))
    for i in range(4):
        f.register(f"w{i}", 10 + i)

    def answer(cut: dict[str, Any] | None, *, fail_rank: int = -1) -> int:
        """Every pending join answered, rank 0's with ``cut``; the world's id."""
        joins = f.take(Join)
        for worker, join in joins:
            if join.rank == fail_rank:
                f.handle(FromWorker(worker, JoinFailed(world_id=join.world_id, epoch=1,
                                                       error="no memory")))
                continue
            describe = {"split": cut} if join.rank == 0 and cut is not None else {}
            f.handle(FromWorker(worker, Joined(world_id=join.world_id, epoch=join.epoch,
                                               describe=describe,
                                               entry="x" if join.rank == 0 else "")))
        return int(joins[0][1].world_id)

    def shown() -> Any:
        [meta] = describe_fleet(f.fleet)
        assert meta.get("split") == stage_split(f.fleet, "r")  # describe shows what status does
        return meta.get("split")

    measured = Split((6,), 11, "measured", tuple([1.0] * 11), 16).describe()
    assert shown() is None  # nothing serves yet
    first = answer(measured)
    assert shown() == measured
    assert measured["stages"] == [{"children": [0, 5], "ms": 6.0},
                                  {"children": [6, 10], "ms": 5.0}]
    # A rollout whose new spec fails to load: its rank 0's cut is never shown.
    f.handle(ApplyArgs(document={"deployments": [{**resnet, "split_points": [4]}]}))
    answer(Split((4,), 11, "config").describe(), fail_rank=1)
    assert f.fleet.deployments["r"].rollout.state == "failed" and shown() == measured
    # One that serves: its cut once its world serves (the old one drains).
    f.handle(ApplyArgs(document={"deployments": [{**resnet, "split_points": [5]}]}))
    assert shown() == measured
    configured = Split((5,), 11, "config").describe()
    answer(configured)
    assert f.fleet.worlds[first].state == WorldState.DRAINING and shown() == configured
    f.handle(WorldIdle(first))
    assert shown() == configured
    # A cut of another stage count than its world's (a handler's mistake) is not shown.
    f.handle(ApplyArgs(document={"deployments": [{**resnet, "factory_kwargs": {"seed": 1}}]}))
    answer(Split((3, 6), 11, "measured", tuple([1.0] * 11), 16).describe())
    assert shown() is None
