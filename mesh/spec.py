"""What a worker is told about the deployment it serves: one typed record, sent whole.

The controller reads it from the TOML config (controller/config.py validates it there) and
sends it in every ``join`` and ``preload`` (mesh/messages.py); the worker decodes it into this
same type, so every default is defined here once and nobody repeats it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    name: str
    model: str
    checkpoint: str = ""
    stages: int = 1
    worlds: int = 1
    min_worlds: int = 1
    max_worlds: int = 4
    slo_p99_ms: float = 100.0
    max_batch_size: int = 32
    max_batch_delay_ms: float = 2.0
    # Requests waiting at the controller when every world is full; beyond this: Overloaded.
    max_queue: int = 4096
    # Admit a request only if the work ahead of it can plausibly be done before its deadline
    # (controller/admission.py); else answer overloaded at once, with a retry-after hint.
    admit_by_deadline: bool = True
    # Requests outstanding on one world before the router holds new ones back.
    max_inflight_per_world: int = 64
    # Deadline applied when a request names none, and the largest one accepted.
    default_timeout_ms: int = 30000
    max_timeout_ms: int = 600000
    # Extra keyword arguments for the model factory (msgpack/TOML-native values only).
    factory_kwargs: dict[str, Any] = field(default_factory=dict)
    # Pipeline: child indices of the nn.Sequential where stages 1.. begin (default: balanced
    # by parameter count), micro-batches per batch (0: one per stage), and the timeout of
    # every world operation (a stage silent this long breaks its world).
    split_points: list[int] = field(default_factory=list)
    micro_batches: int = 0
    world_timeout_ms: int = 10000
    # Autoscaling on the latency target: act on a breach after upscale_delay_s, give a world
    # back after downscale_delay_s of sustained headroom (one at a time).
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 30.0
    # Generative models (worker.generative): the KV cache budget of each stage of a world,
    # the sequences a world decodes at once, the tokens one micro-batch may carry (decodes
    # first, then chunks of prefills), and optional targets for time to first token (p99)
    # and time per output token (p50); 0: none.
    kv_cache_mb: float = 256.0
    max_seqs: int = 64
    max_batch_tokens: int = 512
    slo_ttft_p99_ms: float = 0.0
    slo_tpot_p50_ms: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return dict(msgspec.to_builtins(self))
