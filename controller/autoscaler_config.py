"""``[autoscaler]``: the scaling policy and its thresholds, a record of their own so that the
policy (controller/autoscaler.py) and the config (controller/config.py) both read it without
importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from msgspec import Meta


@dataclass(frozen=True, slots=True)
class AutoscalerConfig:
    """``[autoscaler]``: the scaling policy and its thresholds (controller/autoscaler.py says
    what each does); the delays before acting are each deployment's own."""

    policy: Literal["latency"] = "latency"
    # Scale up when the arrival rate needs the worlds busier than this.
    target_util: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.75
    # Give a world back only if the rest would stay under this, and p99 under
    # down_fraction of the target.
    down_util: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.5
    down_fraction: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.5
    # Answers in the window before its p99 counts as a breach.
    min_samples: Annotated[int, Meta(ge=1, le=1_000_000)] = 20
    # How long a bigger fleet serves before its capacity is judged (long enough for the
    # workers' smoothed costs to settle, short because a failed probe costs throughput), the
    # rise in service rate that makes added worlds worth keeping, and how long a ceiling found
    # otherwise holds before a new probe.
    probe_s: Annotated[float, Meta(ge=0.1, le=3600.0)] = 3.0
    min_gain: Annotated[float, Meta(ge=0.0, le=10.0)] = 0.1
    hold_s: Annotated[float, Meta(ge=0.0, le=86400.0)] = 300.0
