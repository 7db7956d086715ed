"""The stages a worker has built, kept for reuse within a memory bound.

Loading a stage (building the model, reading a checkpoint, moving it to the device) takes
hundreds of milliseconds to seconds; forming a world from stages already loaded takes
milliseconds. So a worker keeps what it built: a world re-formed after a failure, or a preload
for the warm pool, reuses it. But a worker that has served many deployments, or many stage
layouts, must not hold all of them forever (on a GPU that is an out-of-memory error waiting
for the next join).

The rule: a stage that a world on this worker uses is *in use* and is never dropped; of the
*idle* ones, the ``max_idle`` most recently used are kept and older ones are dropped. And with
a byte bound (``max_bytes``, 0: none), idle stages are dropped, least recently used first,
while the stages kept, in use and idle, hold more bytes than that: during a rolling update a
worker may hold both revisions' stages, and it is their size, not their count, that fills a
device. A stage's bytes (``size_of``: its parameters and buffers) are measured once, when it
loads. Stages in use may hold more than the bound on their own; the bound then keeps no idle
one. Loading happens outside the lock (the event loop pins and unpins while a load runs on
the loader thread); a join loads and pins in one call, so its stage cannot be dropped in
between.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger(__name__)


class StageCache:
    def __init__(self, max_idle: int, *, max_bytes: int = 0,
                 size_of: Callable[[Any], int] | None = None,
                 on_drop: Callable[[Hashable], None] | None = None) -> None:
        """``size_of(handler)``: the bytes a loaded stage holds (none counted without it).
        ``on_drop(key)`` runs after a dropped stage's handler is released by the cache, so
        it may give the freed memory back (``torch.cuda.empty_cache``)."""
        _check_limits(max_idle, max_bytes)
        self._max_idle = max_idle
        self._max_bytes = max_bytes
        self._size_of = size_of
        self._sizes: dict[Hashable, int] = {}  # key -> bytes, measured when it loaded
        self._on_drop = on_drop
        self._lock = threading.Lock()
        # key -> handler, least recently used first
        self._stages: OrderedDict[Hashable, Any] = OrderedDict()
        self._users: dict[Hashable, set[int]] = {}  # key -> worlds using it
        self._key_of: dict[int, Hashable] = {}  # world -> its key

    def __len__(self) -> int:
        return len(self._stages)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._stages

    @property
    def max_idle(self) -> int:
        return self._max_idle

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def idle(self) -> int:
        with self._lock:
            return sum(1 for k in self._stages if not self._users.get(k))

    @property
    def bytes(self) -> int:
        """Bytes of every stage held, in use and idle."""
        with self._lock:
            return sum(self._sizes.values())

    @property
    def full(self) -> bool:
        """The stages held reach the byte bound: a stage loaded now (not for a world) would
        be dropped again at once, or push out one that was."""
        return self._max_bytes > 0 and self.bytes >= self._max_bytes

    def set_max_idle(self, max_idle: int) -> None:
        self.set_limits(max_idle=max_idle, max_bytes=self._max_bytes)

    def set_limits(self, *, max_idle: int, max_bytes: int) -> None:
        """New bounds (the controller's welcome); stages over them are dropped at once."""
        _check_limits(max_idle, max_bytes)
        with self._lock:
            self._max_idle, self._max_bytes = max_idle, max_bytes
            dropped = self._evict()
        self._report(dropped)

    def get(self, key: Hashable, load: Callable[[], Any], *, world: int | None = None) -> Any:
        """The stage for ``key``, built with ``load`` if not held; pinned by ``world`` if given
        (before any other stage can push it out)."""
        with self._lock:
            handler = self._stages.get(key)
            if handler is not None:
                self._stages.move_to_end(key)
                if world is not None:
                    self._pin(key, world)
                return handler
        handler = load()  # may take seconds: not under the lock
        size = self._size_of(handler) if self._size_of is not None else 0
        with self._lock:
            held = self._stages.get(key)
            if held is not None:
                handler = held  # built meanwhile by another caller: keep one copy
            else:
                self._stages[key] = handler
                self._sizes[key] = size
            self._stages.move_to_end(key)
            if world is not None:
                self._pin(key, world)
            dropped = self._evict()
        self._report(dropped)
        return handler

    def release(self, world: int) -> None:
        """``world`` no longer uses its stage; it stays while it is among the newest idle ones."""
        with self._lock:
            key = self._key_of.pop(world, None)
            if key is None:
                return
            users = self._users.get(key)
            if users is not None:
                users.discard(world)
                if not users:
                    del self._users[key]
                    if key in self._stages:
                        self._stages.move_to_end(key)  # idle since now: the newest idle
            dropped = self._evict()
        self._report(dropped)

    def _pin(self, key: Hashable, world: int) -> None:
        old = self._key_of.get(world)
        if old is not None and old != key:
            users = self._users.get(old)
            if users is not None:
                users.discard(world)
                if not users:
                    del self._users[old]
        self._key_of[world] = key
        self._users.setdefault(key, set()).add(world)

    def _evict(self) -> list[tuple[Hashable, Any]]:
        """Drop idle stages, least recently used first, while more are idle than
        ``max_idle`` or all of them hold more than ``max_bytes``."""
        idle = [k for k in self._stages if not self._users.get(k)]  # oldest first
        held = sum(self._sizes.values())
        dropped = []
        for count, key in enumerate(idle):
            over_count = len(idle) - count > self._max_idle
            over_bytes = self._max_bytes > 0 and held > self._max_bytes
            if not (over_count or over_bytes):
                break
            held -= self._sizes.pop(key, 0)
            dropped.append((key, self._stages.pop(key)))
        return dropped

    def _report(self, dropped: list[tuple[Hashable, Any]]) -> None:
        keys = [key for key, _ in dropped]
        dropped.clear()  # the last references the cache held: the memory can go now
        for key in keys:
            if self._on_drop is not None:
                try:
                    self._on_drop(key)
                except Exception:
                    log.exception("dropping stage %r failed", key)


def _check_limits(max_idle: int, max_bytes: int) -> None:
    if max_idle < 0:
        raise ValueError(f"max_idle must be at least 0, got {max_idle}")
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be at least 0 (0: no bound), got {max_bytes}")
