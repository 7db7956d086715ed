"""The client's own books: what it sent and what came back on its socket, per request id.

Tests assert "every request answered exactly once" and benchmarks report lost and duplicated
answers from here, never from the controller's counters. ``LedgerClient`` is a real
``mesh.client.Client`` that keeps a ``Ledger`` as it sends and receives; what its callers
were told (including deadlines the client ran out itself) stays with the callers.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from mesh import codec
from mesh.client import Client
from mesh.messages import ClientKind
from mesh.transport import Pump

REQUESTS = (ClientKind.INFER, ClientKind.STREAM)
FINAL = (ClientKind.RESULT, ClientKind.END, ClientKind.ERROR)


class Ledger:
    """Requests sent and answers received, per request id (a retry or a resumed stream is a
    request of its own)."""

    def __init__(self) -> None:
        self.requests: set[Any] = set()  # ids of the infer and stream requests sent
        self.answers: Counter[Any] = Counter()  # final answers (result, end, error) per id
        self.chunks: Counter[Any] = Counter()  # stream chunks per id
        self.codes: Counter[str] = Counter()  # final answers by code: "ok" or the error's code
        self.late: Counter[Any] = Counter()  # final answers that came when nobody waited

    def on_sent(self, req_id: Any) -> None:
        self.requests.add(req_id)

    def on_chunk(self, req_id: Any) -> None:
        self.chunks[req_id] += 1

    def on_final(self, req_id: Any, code: str, *, awaited: bool) -> None:
        """A final answer; ``awaited``: its caller was still waiting for it (not past its
        deadline on the client's side, not an abandoned stream)."""
        self.answers[req_id] += 1
        self.codes[code] += 1
        if not awaited:
            self.late[req_id] += 1

    @property
    def sent(self) -> int:
        return len(self.requests)

    @property
    def answered(self) -> int:
        """Requests answered at least once."""
        return len(self.answers)

    @property
    def lost(self) -> int:
        """Requests sent that no final answer came back for."""
        return len(self.requests - self.answers.keys())

    @property
    def duplicates(self) -> int:
        """Final answers beyond the first, over all requests."""
        return sum(n - 1 for n in self.answers.values() if n > 1)

    @property
    def answered_twice(self) -> int:
        """Requests answered more than once."""
        return sum(1 for n in self.answers.values() if n > 1)

    @property
    def failed(self) -> dict[str, int]:
        """Error answers received, by code."""
        return {code: n for code, n in self.codes.items() if code != "ok"}

    def summary(self) -> dict[str, Any]:
        return {"sent": self.sent, "answered": self.answered, "lost": self.lost,
                "duplicates": self.duplicates, "late": sum(self.late.values()),
                "codes": dict(self.codes)}


class LedgerClient(Client):
    """A real client whose ``ledger`` counts every request as it leaves and every answer as it
    arrives, alone in a message or in a batch of them."""

    def __init__(self, endpoint: str, **options: Any) -> None:
        super().__init__(endpoint, **options)
        self.ledger = Ledger()

    def _send(self, pump: Pump, frames: list[Any]) -> None:
        # Frame 0 of everything this client sends is its own msgpack header.
        header = codec.unpack_header(codec.frame_buffer(frames[0]))
        if header.get("kind") in REQUESTS:
            self.ledger.on_sent(header["id"])
        super()._send(pump, frames)

    def _on_header(self, header: dict[str, Any], req_id: Any, kind: Any,
                   frames: list[Any]) -> None:
        if kind == ClientKind.CHUNK:
            self.ledger.on_chunk(req_id)
        elif kind in FINAL and req_id not in self._pings:
            call = self._calls.get(req_id)
            awaited = (call is not None and not call.done()) or req_id in self._streams
            code = str(header.get("code")) if kind == ClientKind.ERROR else "ok"
            self.ledger.on_final(req_id, code, awaited=awaited)
        super()._on_header(header, req_id, kind, frames)
