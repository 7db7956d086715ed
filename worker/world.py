"""One world membership of a worker: which deployment, which rank, the handler and its queue.

A world is one replica of one deployment; this worker is rank ``rank`` of ``size``. With one
rank the world needs no communicator: stage 0 is also the last stage. The data plane thread
owns the membership once it is added; the control plane only creates and removes it.
"""

from __future__ import annotations

import time
from typing import Any

from worker.batcher import Batcher
from worker.handler import Handler


class World:
    def __init__(
        self,
        *,
        world_id: int,
        epoch: int,
        rank: int,
        size: int,
        deployment: dict[str, Any],
        handler: Handler,
    ) -> None:
        self.world_id = world_id
        self.epoch = epoch
        self.rank = rank
        self.size = size
        self.deployment = deployment
        self.handler = handler
        self.joined_at = time.monotonic()
        self.draining = False
        self.batcher = Batcher(
            max_batch_size=int(deployment.get("max_batch_size", 32)),
            max_batch_delay_ms=float(deployment.get("max_batch_delay_ms", 2.0)),
            clock=time.monotonic,
        )

    @property
    def key(self) -> tuple[int, int]:
        return (self.world_id, self.epoch)

    def close(self) -> None:
        """Release what the membership holds (the communicator, in multi-rank worlds)."""
