"""Models that fail on purpose, for fault-injection tests and demos.

``build(mode="exit")`` ends the worker process while the model loads (a crash on a bad
checkpoint, say); ``mode="raise"`` raises from the factory (a load error the worker reports);
``mode="ok"`` builds a working ``fixed`` model, so one deployment can be switched between them.
"""

from __future__ import annotations

import os

from worker.models.fixed import FixedTimeHandler


def build(mode: str = "exit", exit_code: int = 3) -> FixedTimeHandler:
    if mode == "exit":
        os._exit(exit_code)
    if mode == "raise":
        raise RuntimeError("this model refuses to load (fault injection)")
    return FixedTimeHandler(batch_ms=5.0, row_ms=0.0, features=4, scale=2.0)
