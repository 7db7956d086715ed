"""What a worker is told about the deployment it serves: one typed record, sent whole.

The controller reads it from the TOML config and sends it in every ``join`` and ``preload``
(mesh/messages.py); the worker decodes it into this same type, so every default and every range
is defined here once and nobody repeats it: msgspec checks the ranges wherever the record is
decoded (mesh/typed.py), the config's ``deployments[mlp].stages`` and a worker's ``join``
alike. Rules between fields (min_worlds <= worlds <= max_worlds) are controller/config.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from msgspec import Meta

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
FACTORY_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    name: Annotated[str, Meta(pattern=NAME_PATTERN)]
    # A factory, 'package.module:function'.
    model: Annotated[str, Meta(pattern=FACTORY_PATTERN)]
    checkpoint: str = ""
    stages: Annotated[int, Meta(ge=1, le=64)] = 1
    worlds: Annotated[int, Meta(ge=0, le=1024)] = 1
    min_worlds: Annotated[int, Meta(ge=0, le=1024)] = 1
    max_worlds: Annotated[int, Meta(ge=1, le=1024)] = 4
    slo_p99_ms: Annotated[float, Meta(ge=0.1, le=3600000.0)] = 100.0
    max_batch_size: Annotated[int, Meta(ge=1, le=65_536)] = 32
    max_batch_delay_ms: Annotated[float, Meta(ge=0.0, le=10000.0)] = 2.0
    # Requests waiting at the controller when every world is full; beyond this: Overloaded.
    max_queue: Annotated[int, Meta(ge=0, le=10_000_000)] = 4096
    # Admit a request only if the work ahead of it can plausibly be done before its deadline
    # (controller/admission.py); else answer overloaded at once, with a retry-after hint.
    admit_by_deadline: bool = True
    # Requests outstanding on one world before the router holds new ones back.
    max_inflight_per_world: Annotated[int, Meta(ge=1, le=1_000_000)] = 64
    # Deadline applied when a request names none, and the largest one accepted.
    default_timeout_ms: Annotated[int, Meta(ge=1, le=86_400_000)] = 30000
    max_timeout_ms: Annotated[int, Meta(ge=1, le=86_400_000)] = 600000
    # Extra keyword arguments for the model factory (msgpack/TOML-native values only).
    factory_kwargs: dict[str, Any] = field(default_factory=dict)
    # Pipeline: child indices of the nn.Sequential where stages 1.. begin (default: balanced
    # by the children's measured time, worker/splits.py), micro-batches per batch (0: one per
    # stage), and the timeout of every world operation (a stage silent this long breaks its
    # world).
    split_points: list[Annotated[int, Meta(ge=1, le=4096)]] = field(default_factory=list)
    micro_batches: Annotated[int, Meta(ge=0, le=1024)] = 0
    world_timeout_ms: Annotated[int, Meta(ge=100, le=3_600_000)] = 10000
    # Autoscaling on the latency target: act on a breach after upscale_delay_s, give a world
    # back after downscale_delay_s of sustained headroom (one at a time).
    upscale_delay_s: Annotated[float, Meta(ge=0.0, le=3600.0)] = 2.0
    downscale_delay_s: Annotated[float, Meta(ge=0.0, le=86400.0)] = 30.0
    # Generative models (worker.generative): the KV cache budget of each stage of a world,
    # the sequences a world decodes at once, the tokens one micro-batch may carry (decodes
    # first, then chunks of prefills), and optional targets for time to first token (p99)
    # and time per output token (p50); 0: none.
    kv_cache_mb: Annotated[float, Meta(ge=0.0625, le=1048576.0)] = 256.0
    max_seqs: Annotated[int, Meta(ge=1, le=4096)] = 64
    max_batch_tokens: Annotated[int, Meta(ge=1, le=1_048_576)] = 512
    slo_ttft_p99_ms: Annotated[float, Meta(ge=0.0, le=3600000.0)] = 0.0
    slo_tpot_p50_ms: Annotated[float, Meta(ge=0.0, le=3600000.0)] = 0.0

    def to_wire(self) -> dict[str, Any]:
        return dict(msgspec.to_builtins(self))
