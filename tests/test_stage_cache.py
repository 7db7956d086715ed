"""Unit tests for worker/stage_cache.py: stages in use stay, idle ones are bounded, LRU first."""

from __future__ import annotations

import threading
import weakref
from typing import Any

import pytest

from worker.stage_cache import StageCache


class Loads:
    """A loader that counts its builds and hands out distinct objects."""

    def __init__(self) -> None:
        self.built: list[str] = []

    def __call__(self, key: str) -> Any:
        def load() -> Any:
            self.built.append(key)
            return object()
        return load


@pytest.fixture
def loads() -> Loads:
    return Loads()


def test_a_held_stage_is_not_built_again(loads: Loads) -> None:
    cache = StageCache(4)
    a = cache.get("a", loads("a"))
    assert cache.get("a", loads("a")) is a
    assert loads.built == ["a"]


def test_idle_stages_beyond_the_limit_go_least_recently_used_first(loads: Loads) -> None:
    dropped: list[Any] = []
    cache = StageCache(2, on_drop=dropped.append)
    for key in ("a", "b", "c"):
        cache.get(key, loads(key))
    assert dropped == ["a"] and "a" not in cache and len(cache) == 2
    cache.get("b", loads("b"))  # b is now the newest
    cache.get("d", loads("d"))
    assert dropped == ["a", "c"]
    assert "b" in cache and "d" in cache


def test_a_stage_in_use_is_never_dropped(loads: Loads) -> None:
    cache = StageCache(0)
    used = cache.get("a", loads("a"), world=1)
    cache.get("b", loads("b"))  # idle, limit 0: dropped at once
    assert "a" in cache and "b" not in cache
    assert cache.get("a", loads("a")) is used
    cache.release(1)
    assert len(cache) == 0


def test_a_stage_shared_by_two_worlds_stays_until_both_let_go(loads: Loads) -> None:
    cache = StageCache(0)
    cache.get("a", loads("a"), world=1)
    cache.get("a", loads("a"), world=2)
    cache.release(1)
    assert "a" in cache
    cache.release(2)
    assert "a" not in cache
    cache.release(2)  # twice is harmless


def test_released_stages_count_as_newest_idle(loads: Loads) -> None:
    dropped: list[Any] = []
    cache = StageCache(1, on_drop=dropped.append)
    cache.get("old", loads("old"), world=7)
    cache.get("preloaded", loads("preloaded"))
    cache.release(7)  # "old" became idle after "preloaded" was built: it is kept
    assert dropped == ["preloaded"] and "old" in cache


def test_lowering_the_limit_drops_at_once(loads: Loads) -> None:
    dropped: list[Any] = []
    cache = StageCache(8, on_drop=dropped.append)
    for key in "abc":
        cache.get(key, loads(key))
    cache.set_max_idle(1)
    assert dropped == ["a", "b"] and cache.idle == 1
    with pytest.raises(ValueError, match="at least 0"):
        cache.set_max_idle(-1)


def test_a_world_that_changes_stage_moves_its_pin(loads: Loads) -> None:
    cache = StageCache(0)
    cache.get("a", loads("a"), world=1)
    cache.get("b", loads("b"), world=1)  # world 1 now uses b: a is idle, limit 0
    assert "a" not in cache and "b" in cache


def test_a_failing_drop_hook_does_not_break_the_cache(loads: Loads) -> None:
    def boom(key: Any) -> None:
        raise RuntimeError("no")
    cache = StageCache(0, on_drop=boom)
    cache.get("a", loads("a"))
    cache.get("b", loads("b"), world=1)  # still works after the hook failed
    assert "a" not in cache and "b" in cache


def test_pins_and_releases_proceed_while_a_load_runs(loads: Loads) -> None:
    cache = StageCache(1)
    cache.get("a", loads("a"), world=1)
    started, finish = threading.Event(), threading.Event()

    def slow_load() -> Any:
        started.set()
        assert finish.wait(5.0)
        return object()

    loader = threading.Thread(target=cache.get, args=("b", slow_load), kwargs={"world": 2})
    loader.start()
    assert started.wait(5.0)
    cache.release(1)  # must not wait for the load: the lock is not held while building
    assert "a" in cache
    finish.set()
    loader.join(5.0)
    assert "b" in cache and cache.idle == 1


def test_a_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="max_idle"):
        StageCache(-1)


def test_a_dropped_stage_is_freed_before_on_drop_runs() -> None:
    class Stage:
        pass

    alive_at_drop: list[bool] = []
    refs: list[weakref.ref[Stage]] = []

    def load() -> Stage:
        stage = Stage()
        refs.append(weakref.ref(stage))
        return stage

    # on_drop is where a CUDA worker calls empty_cache: nothing may hold the stage by then.
    cache = StageCache(0, on_drop=lambda key: alive_at_drop.append(refs[0]() is not None))
    cache.get("a", load, world=1)
    cache.release(1)
    assert alive_at_drop == [False]


# -- a bound on bytes (max_stage_bytes) ----------------------------------------------------


class Sized:
    """A fake stage of a known size."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def sized(nbytes: int, built: list[int] | None = None) -> Any:
    def load() -> Sized:
        if built is not None:
            built.append(nbytes)
        return Sized(nbytes)
    return load


def by_size(stage: Sized) -> int:
    return stage.nbytes


def test_idle_stages_go_least_recently_used_first_while_all_stages_hold_too_many_bytes(
        ) -> None:
    dropped: list[Any] = []
    cache = StageCache(8, max_bytes=100, size_of=by_size, on_drop=dropped.append)
    cache.get("a", sized(40))
    cache.get("b", sized(30))
    cache.get("c", sized(20))
    assert cache.bytes == 90 and dropped == []
    cache.get("a", sized(40))  # a is now the most recently used
    cache.get("d", sized(50))  # 140 held: b goes (oldest), then 110: c goes
    assert dropped == ["b", "c"] and cache.bytes == 90
    assert "a" in cache and "d" in cache


def test_a_stage_in_use_is_never_dropped_for_bytes_even_over_the_bound() -> None:
    dropped: list[Any] = []
    cache = StageCache(8, max_bytes=100, size_of=by_size, on_drop=dropped.append)
    cache.get("old", sized(60), world=1)
    cache.get("new", sized(70), world=2)  # both revisions in use: 130 held, nothing idle
    assert dropped == [] and cache.bytes == 130 and cache.full
    cache.get("spare", sized(10))  # idle, and all stages are over the bound: it goes
    assert dropped == ["spare"]
    cache.release(1)  # the old revision's last world leaves: idle, over the bound, dropped
    assert dropped == ["spare", "old"] and cache.bytes == 70 and not cache.full
    assert "new" in cache


def test_the_count_bound_and_the_byte_bound_both_hold() -> None:
    dropped: list[Any] = []
    cache = StageCache(1, max_bytes=1000, size_of=by_size, on_drop=dropped.append)
    cache.get("a", sized(1))
    cache.get("b", sized(1))  # under the bytes, over the count
    assert dropped == ["a"]
    cache.get("c", sized(999))  # two idle (count) and 1000 held: b goes for the count
    assert dropped == ["a", "b"] and cache.bytes == 999 and not cache.full


def test_lowering_the_byte_bound_drops_at_once_and_zero_means_no_bound() -> None:
    dropped: list[Any] = []
    cache = StageCache(8, size_of=by_size, on_drop=dropped.append)
    for key, nbytes in (("a", 10), ("b", 20), ("c", 30)):
        cache.get(key, sized(nbytes))
    assert cache.bytes == 60 and not cache.full and cache.max_bytes == 0
    cache.set_limits(max_idle=8, max_bytes=35)
    assert dropped == ["a", "b"] and cache.bytes == 30
    cache.set_limits(max_idle=8, max_bytes=0)
    cache.get("d", sized(10**9))
    assert "d" in cache and dropped == ["a", "b"]
    with pytest.raises(ValueError, match="max_bytes"):
        cache.set_limits(max_idle=8, max_bytes=-1)
    with pytest.raises(ValueError, match="max_bytes"):
        StageCache(8, max_bytes=-1)


def test_a_stage_is_measured_once_when_it_loads() -> None:
    measured: list[int] = []

    def size_of(stage: Sized) -> int:
        measured.append(stage.nbytes)
        return stage.nbytes

    cache = StageCache(8, max_bytes=100, size_of=size_of)
    cache.get("a", sized(5), world=1)
    cache.get("a", sized(5), world=2)
    cache.release(1)
    assert measured == [5] and cache.bytes == 5


def test_a_handlers_bytes_are_its_parameters_and_buffers_each_storage_once() -> None:
    import torch
    from torch import nn

    from worker.handler import TensorHandler

    linear = nn.Linear(10, 4)  # 44 float32
    model = nn.Sequential(linear, nn.BatchNorm1d(4))  # 8 float32 and 2 + 1 buffers
    handler = TensorHandler(model)
    expected = (44 + 8) * 4 + (4 + 4) * 4 + 8  # running mean, var; num_batches_tracked int64
    assert handler.stage_bytes() == expected
    handler.tied = [linear, torch.zeros(3, dtype=torch.float64)]  # type: ignore[attr-defined]
    assert handler.stage_bytes() == expected + 24  # the linear counted once


def test_the_byte_bound_goes_from_the_config_to_the_workers_cache_and_its_bytes_come_back(
        ) -> None:
    from torch import nn

    from controller.config import parse_config
    from controller.fleet import Fleet
    from mesh.messages import Heartbeat, Message
    from worker.agent import WorkerAgent
    from worker.handler import TensorHandler

    config = parse_config({"controller": {"max_stage_bytes": 5000, "launcher": "none"},
                           "deployments": [{"name": "m", "model": "worker.models.mlp:build"}]})
    fleet = Fleet(config, clock=lambda: 0.0, wall_clock=lambda: 0.0)
    assert fleet.welcome.max_stage_bytes == 5000

    class RecordingLink:
        def __init__(self) -> None:
            self.sent: list[Message] = []

        def send(self, message: Message) -> None:
            self.sent.append(message)

    agent = WorkerAgent(controller="tcp://127.0.0.1:9", worker_id="w1", device="cpu")
    agent._link.close()
    link = agent._link = RecordingLink()  # type: ignore[assignment]
    try:
        agent._on_control(fleet.welcome)
        assert agent._stages.max_bytes == 5000
        agent._stages.get("m", lambda: TensorHandler(nn.Linear(10, 10)))  # 110 float32
        agent._send_heartbeat()
        [beat] = [m for m in link.sent if isinstance(m, Heartbeat)]
        assert beat.stage_bytes == 440 and beat.stages == 1 and beat.idle_stages == 1
    finally:
        agent._loader_pool.shutdown()
        agent._form_pool.shutdown()
        agent._context.term()
