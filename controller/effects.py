"""What the Fleet asks the world to do, as data: it returns these from every event it handles
(controller/fleet.py) and the WorldManager applies them in order (controller/world_manager.py).
Nothing here acts; a test reads them as the Fleet's answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from controller.catalog import RouteConfig
from mesh.messages import Message
from mesh.spec import DeploymentSpec


@dataclass(frozen=True, slots=True)
class SendTo:
    """A control message to a worker (join, leave, welcome, ping, shutdown, preload...)."""

    worker_id: str
    message: Message


@dataclass(frozen=True, slots=True)
class StartWorker:
    """Ask the launcher for a worker under this id; it answers ``Started`` or
    ``StartFailed`` (controller/mailbox.py)."""

    worker_id: str


@dataclass(frozen=True, slots=True)
class StopWorker:
    """The launcher ends a worker it started, after its Shutdown (in the background)."""

    worker_id: str


@dataclass(frozen=True, slots=True)
class KillWorker:
    """The launcher SIGKILLs a worker that went silent."""

    worker_id: str


@dataclass(frozen=True, slots=True)
class WatchWorker:
    """Health expects this worker's heartbeats from now on."""

    worker_id: str


@dataclass(frozen=True, slots=True)
class ForgetWorker:
    """Health stops watching it: it goes quiet on purpose, or it is dead."""

    worker_id: str


@dataclass(frozen=True, slots=True)
class RouteWorld:
    """A world serves: its deployment's router sends it requests from now on."""

    deployment: str
    world_id: int
    epoch: int
    entry: bytes  # rank 0's runner socket
    members: frozenset[bytes]  # every member's runner socket: the only senders of answers
    packed: bool  # the entry reads packed dispatch batches
    generative: bool


@dataclass(frozen=True, slots=True)
class DrainRoute:
    """No new requests for the world; ``WorldIdle`` once it answered what it holds."""

    deployment: str
    world_id: int


@dataclass(frozen=True, slots=True)
class HoldRoute:
    """Stop sending to a world about to break (its requests are re-sent when it does)."""

    deployment: str
    world_id: int


@dataclass(frozen=True, slots=True)
class UnrouteWorld:
    """The world is gone: its requests are re-sent elsewhere or answered; the router answers
    ``Unrouted`` with how many were re-sent."""

    deployment: str
    world_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class SetUnavailable:
    """Why no world of a deployment can form now ("": one can): requests that find no serving
    world are answered at once."""

    deployment: str
    reason: str


@dataclass(frozen=True, slots=True)
class Settled:
    """Every deployment serves its desired worlds or cannot; for the latter, why (once)."""

    down: dict[str, str]


@dataclass(frozen=True, slots=True)
class AddDeployment:
    """An applied deployment: a router for it, taking requests from now on."""

    spec: DeploymentSpec


@dataclass(frozen=True, slots=True)
class Reconfigure:
    """A deployment's spec changed (applied, or rolled back): its router reads the new one."""

    spec: DeploymentSpec


@dataclass(frozen=True, slots=True)
class RetireDeployment:
    """Applied away: its name answers unknown_model from now on; its router finishes what it
    holds while its worlds drain."""

    name: str


@dataclass(frozen=True, slots=True)
class RemoveDeployment:
    """Its last world is gone: its router goes."""

    name: str


@dataclass(frozen=True, slots=True)
class SetRoutes:
    routes: tuple[RouteConfig, ...]


@dataclass(frozen=True, slots=True)
class SaveState:
    """What is applied and what operators changed, to keep in ``state_dir``
    (controller/state.py)."""

    state: dict[str, Any]


Effect = (SendTo | StartWorker | StopWorker | KillWorker | WatchWorker | ForgetWorker
          | RouteWorld | DrainRoute | HoldRoute | UnrouteWorld | SetUnavailable | Settled
          | AddDeployment | Reconfigure | RetireDeployment | RemoveDeployment | SetRoutes
          | SaveState)


@dataclass
class Step:
    """The Fleet's answer to one message: a command's result, and the effects, in order."""

    result: Any = None
    effects: list[Effect] = field(default_factory=list)
