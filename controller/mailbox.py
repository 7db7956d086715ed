"""What the Fleet hears: the events the rest of the controller tells it, one at a time.

From workers (through the Backend), from Health (a worker is lost), from the routers (a world
went idle, cannot be reached, or stalled), from the autoscaler, from the launcher (what it
started, what a restarted controller takes back) and a tick. Operator commands arrive as their
admin arguments themselves (mesh/messages.py ``ADMIN_ARGS``), decoded and checked by the Admin
socket: there is no second copy of them here. The WorldManager feeds each to the Fleet
(controller/fleet.py), the only one to change the fleet's records.
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


RouterReport = WorldIdle | WorldUnreachable | WorldStalled


@dataclass(frozen=True, slots=True)
class AutoScale:
    """The autoscaler's new target for a deployment (within its bounds)."""

    deployment: str
    worlds: int
    reason: str


@dataclass(frozen=True, slots=True)
class Adopted:
    """The workers the launcher still runs from a previous run of this controller."""

    worker_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Started:
    """The launcher started a worker the Fleet asked for (``StartWorker``)."""

    worker_id: str
    pid: int


@dataclass(frozen=True, slots=True)
class StartFailed:
    worker_id: str
    error: str


@dataclass(frozen=True, slots=True)
class Unrouted:
    """A broken world's routes are gone; ``resent`` of its requests went to other worlds."""

    world_id: int
    resent: int


@dataclass(frozen=True, slots=True)
class Stopping:
    """The controller stops: every worker is told to stop, nothing new is planned."""


@dataclass(frozen=True, slots=True)
class Tick:
    pass
