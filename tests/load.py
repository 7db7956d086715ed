"""Closed-loop load from a client; with a ``mesh.testing.ledger.LedgerClient``, a check that
every request was answered exactly once."""

from __future__ import annotations

import asyncio
from typing import Self

import numpy as np

from mesh.client import Client
from mesh.errors import MeshError
from mesh.testing.ledger import LedgerClient
from mesh.testing.waits import until


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
        ledger = self.client.ledger
        assert self.ok + len(self.errors) == self.sent
        assert ledger.sent == self.sent  # one request on the wire per call
        duplicates = {i: n for i, n in ledger.answers.items() if n != 1}
        assert not duplicates, f"requests answered more than once: {duplicates}"
        assert ledger.lost == 0 and sum(ledger.answers.values()) == self.sent
