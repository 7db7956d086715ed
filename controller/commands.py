"""The WorldManager's mailbox: what the rest of the controller may ask of it or tell it.

Changes to the fleet flow one way, as these messages: from workers (through the Backend),
from Health (a worker is lost), from the routers (a world went idle, cannot be reached, or
stalled), from the Admin API and the autoscaler (scale, latency target, form, drain), and a
tick. The WorldManager handles one at a time and is the only one to change the fleet.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.messages import Message


@dataclass(frozen=True, slots=True)
class FromWorker:
    worker_id: str
    message: Message
    # When the Backend received it (the controller's monotonic clock; 0: when handled). A
    # heartbeat's load figures are rates over the time between two heartbeats: measured at
    # arrival, not after a wait in the mailbox, whose jitter would read as load.
    received_s: float = 0.0


@dataclass(frozen=True, slots=True)
class WorkerLost:
    """Health's verdict: the process exited, or went silent (then ``kill`` it)."""

    worker_id: str
    reason: str
    kill: bool = False


@dataclass(frozen=True, slots=True)
class WorldIdle:
    """A draining world answered its last request: release it."""

    world_id: int


@dataclass(frozen=True, slots=True)
class WorldUnreachable:
    """The router cannot send to the world's entry: break it."""

    world_id: int


@dataclass(frozen=True, slots=True)
class WorldStalled:
    """The router's verdict: the world holds requests and answered nothing for too long."""

    world_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Scale:
    deployment: str
    worlds: int | None = None
    min_worlds: int | None = None
    max_worlds: int | None = None
    by_operator: bool = True
    reason: str = ""


@dataclass(frozen=True, slots=True)
class SetSlo:
    deployment: str
    p99_ms: float


@dataclass(frozen=True, slots=True)
class FormWorld:
    """Form a world of ``deployment`` on exactly these workers (rank order); they may already
    serve other worlds: a worker shared between worlds is the MultiWorld idea."""

    deployment: str
    workers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DrainTarget:
    target: str


@dataclass(frozen=True, slots=True)
class Tick:
    pass
