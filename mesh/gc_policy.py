"""Garbage collection for processes that serve for weeks: collect young objects less often,
and keep what startup built out of every collection.

CPython's cyclic collector runs a young collection every 700 net container allocations, and
every tenth of those looks at older objects too, traversing everything the process holds. A
request's path allocates a few dozen containers (decoded headers, tuples, lists, records), so
a busy controller ran a young collection every few dozen requests and, now and then, a full
one over every object it had built since it started (a worker over all of torch's as well),
on the thread that serves. Reference counting frees almost everything a request makes; only
reference cycles need the collector, and they are rare on the data path.

So: a young collection every ``YOUNG`` allocations, older generations rarely, and
``freeze`` once a process has started (imports, configuration, sockets), which moves every
object alive then into a permanent generation that no collection traverses: about a tenth
less controller CPU per request through the controller (``python -m bench.overhead
--echo-only --concurrency 128``; the figures are in docs/benchmarks.md).

A worker freezes at start only, not after loading a model: a model's stage can be dropped
later (``max_idle_stages``), and a frozen object in a reference cycle would never be freed.
"""

from __future__ import annotations

import gc

YOUNG = 50_000  # CPython's default is 700
OLDER = (50, 100)  # young collections per middle one, middle per full (10, 10)


def tune() -> None:
    """Set the collection thresholds; once, early in the process."""
    gc.set_threshold(YOUNG, *OLDER)


def freeze() -> None:
    """Move every object alive now out of the collector's sight (after startup)."""
    gc.freeze()


def stats() -> dict[str, object]:
    """For status: collections run per generation, objects frozen, the thresholds."""
    return {"collections": [g["collections"] for g in gc.get_stats()],
            "frozen": gc.get_freeze_count(), "thresholds": list(gc.get_threshold())}
