"""Client-side load with a ledger: what was sent, what came back, and how often."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, Self

import numpy as np

from mesh.client import Client
from mesh.errors import MeshError
from tests.polling import until


class LedgerClient(Client):
    """A real client that also counts every answer frame it receives, per request id."""

    def __init__(self, endpoint: str, **options: Any) -> None:
        super().__init__(endpoint, **options)
        self.answers: Counter[Any] = Counter()
        self.chunks: Counter[Any] = Counter()

    def _on_header(self, header: dict[str, Any], req_id: Any, kind: Any,
                   frames: list[Any]) -> None:
        # Every answer as received, alone in a message or in a batch of them.
        if kind == "chunk":
            self.chunks[req_id] += 1
        elif kind != "pong" and req_id not in self._pings:
            self.answers[req_id] += 1
        super()._on_header(header, req_id, kind, frames)


class Load:
    """Closed-loop callers of the ``mlp`` demo (any width: only the output shape is checked).

    ``async with Load(client) as load:`` keeps them running for the block; ``errors`` holds
    every failure a caller saw. With a LedgerClient, ``assert_exactly_once`` checks the ledger.
    """

    def __init__(self, client: Client, callers: int = 6, timeout_s: float = 15.0) -> None:
        self.client = client
        self.callers = callers
        self.timeout_s = timeout_s
        self.sent = 0
        self.ok = 0
        self.errors: list[BaseException] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _caller(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self._stop.is_set():
            x = rng.standard_normal((1, 64)).astype(np.float32)
            self.sent += 1
            try:
                out = await self.client.infer("mlp", {"x": x}, timeout_s=self.timeout_s)
                assert out["y"].shape == (1, 10)
                self.ok += 1
            except MeshError as exc:
                self.errors.append(exc)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._caller(i)) for i in range(self.callers)]

    async def answered(self, more: int, timeout_s: float = 30.0) -> None:
        """Return once ``more`` requests have been answered ok since the call: the load is
        flowing (before a fault is injected, or after the fleet recovered from one)."""
        target = self.ok + more
        await until(lambda: self.ok >= target, timeout_s, f"{more} more answers")

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def assert_exactly_once(self) -> None:
        assert isinstance(self.client, LedgerClient)
        assert self.ok + len(self.errors) == self.sent
        duplicates = {i: n for i, n in self.client.answers.items() if n != 1}
        assert not duplicates, f"requests answered more than once: {duplicates}"
        assert sum(self.client.answers.values()) == self.sent
