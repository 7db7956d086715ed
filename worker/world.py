"""One world membership of a worker: the handler it serves and the executor that batches.

A world is one replica of one deployment; this worker is rank ``rank`` of ``size``. With one
rank the world needs no communicator: stage 0 is also the last stage.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mesh.errors import MeshError
from worker.executor import BatchStats, Executor, Reply
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
        pool: ThreadPoolExecutor,
        reply: Reply,
        stats: BatchStats,
    ) -> None:
        self.world_id = world_id
        self.epoch = epoch
        self.rank = rank
        self.size = size
        self.deployment = deployment
        self.handler = handler
        self.joined_at = time.monotonic()
        self.executor = Executor(
            handler,
            max_batch_size=int(deployment.get("max_batch_size", 32)),
            max_batch_delay_ms=float(deployment.get("max_batch_delay_ms", 2.0)),
            reply=reply,
            pool=pool,
            stats=stats,
        )

    @property
    def key(self) -> tuple[int, int]:
        return (self.world_id, self.epoch)

    async def drain(self, timeout_s: float) -> bool:
        return await self.executor.drain(timeout_s)

    def close(self, error: MeshError) -> None:
        self.executor.close(error)
