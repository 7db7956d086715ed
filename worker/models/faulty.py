"""Models that fail on purpose, for fault-injection tests and demos.

``build(mode="exit")`` ends the worker process while the model loads (a crash on a bad
checkpoint, say); ``mode="raise"`` raises from the factory (a load error the worker reports);
``mode="ok"`` builds a working ``fixed`` model, so one deployment can be switched between them;
``load_s`` makes that load slow (a large checkpoint), to act while a world is still forming.
"""

from __future__ import annotations

import os
import time

from worker.models.fixed import FixedTimeHandler


def build(mode: str = "exit", exit_code: int = 3, load_s: float = 0.0) -> FixedTimeHandler:
    time.sleep(load_s)
    if mode == "exit":
        os._exit(exit_code)
    if mode == "raise":
        raise RuntimeError("this model refuses to load (fault injection)")
    return FixedTimeHandler(batch_ms=5.0, row_ms=0.0, features=4, scale=2.0)
