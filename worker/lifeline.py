"""Dying with the process that started this one: Linux's parent-death signal.

A worker dies with the controller that launched it, and a fork server's children with the
server (worker/forkserver.py says why each signal). The signal is armed by the process itself
and fires when its parent exits; a parent that died before it was armed is caught by the check
that follows (the process was re-parented by then).
"""

from __future__ import annotations

import ctypes
import os

_PR_SET_PDEATHSIG = 1


def follow(parent_pid: int, death_signal: int, parent: str) -> None:
    """Get ``death_signal`` when ``parent_pid`` dies; raise SystemExit naming ``parent`` if it
    is no longer this process's parent. Does nothing for a pid <= 0."""
    if parent_pid <= 0:
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, death_signal)
    except OSError:  # not Linux: a worker's controller watchdog still ends it
        pass
    if os.getppid() != parent_pid:
        raise SystemExit(f"{parent} {parent_pid} is gone")
