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
