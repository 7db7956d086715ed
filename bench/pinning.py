"""Cores of their own for a benchmark's processes, where the host has enough of them.

On a shared host the scheduler moves the client, the controller and each worker between cores
and lets them take turns on one, so what a benchmark measures is partly who ran where. With a
core set per process (``plan``), each keeps its caches and never waits for another's time
slice: the figures compare code, not scheduling. ``pin`` applies a set to every thread a
process has now; threads it starts later inherit the set of the thread that starts them.

Where the host has too few cores for every role, nothing is pinned, and ``describe`` says
what shares what: a benchmark on 2 cores is a contest for them, and its tables say so.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence


def available_cores() -> list[int]:
    """The cores this process may run on (its affinity), in order."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def plan(cores: Sequence[int], needs: Sequence[tuple[str, int]]) -> dict[str, list[int]] | None:
    """Disjoint cores for each role, in the order given (``needs``: (role, cores wanted));
    None when the cores do not go round."""
    if any(n < 1 for _, n in needs) or len({role for role, _ in needs}) != len(needs):
        raise ValueError(f"each role needs a distinct name and at least one core: {needs}")
    if sum(n for _, n in needs) > len(cores):
        return None
    out: dict[str, list[int]] = {}
    at = 0
    for role, n in needs:
        out[role] = list(cores[at:at + n])
        at += n
    return out


def pin(pid: int, cores: Iterable[int]) -> int:
    """Restrict every thread of process ``pid`` to ``cores``; returns how many were pinned.
    A thread that ended meanwhile is skipped."""
    mask = set(cores)
    pinned = 0
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, mask)
        except (ProcessLookupError, FileNotFoundError):
            continue
        pinned += 1
    return pinned


def describe(placement: dict[str, list[int]] | None, roles: Sequence[str],
             cores: Sequence[int]) -> str:
    """One line for a benchmark's header: where each role runs, or what shares what."""
    if placement is None:
        return (f"not pinned: {', '.join(roles)} share {len(cores)} cores "
                f"(pinning needs more cores than this host has)")
    return "pinned: " + ", ".join(f"{role} on {_span(placement[role])}" for role in roles)


def _span(cores: list[int]) -> str:
    if len(cores) > 1 and cores == list(range(cores[0], cores[-1] + 1)):
        return f"cores {cores[0]}-{cores[-1]}"
    return ("core " if len(cores) == 1 else "cores ") + ",".join(map(str, cores))
