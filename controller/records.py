"""The fleet's records: workers, worlds and deployments, and their states.

The Fleet owns these records and is the only one to change them (controller/fleet.py).
Everything else sees them through a read-only snapshot (controller/view.py) or the status
JSON. States are ``StrEnum``s: their values are the strings of the status contract
(docs/reference.md, Status JSON), compared as members, never as bare strings.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgspec

from controller.config import DeploymentConfig
from mesh.messages import Heartbeat, Join, runner_identity


class WorkerState(StrEnum):
    STARTING = "starting"  # started by the launcher, not registered yet
    IDLE = "idle"  # registered, in no world
    SERVING = "serving"  # in at least one world
    DRAINING = "draining"  # told to finish its worlds, then to stop
    DEAD = "dead"  # exited, or declared dead and fenced


class WorldState(StrEnum):
    FORMING = "forming"  # Join sent, not every rank joined yet
    SERVING = "serving"  # routed to
    DRAINING = "draining"  # not routed to; released once its in-flight requests are answered
    BROKEN = "broken"  # a member failed; gone from the map, kept only in events


LIVE_WORLD = (WorldState.FORMING, WorldState.SERVING)


@dataclass
class WorkerLoad:
    """What a worker's heartbeats say about its load, smoothed (one estimate, used for sharing
    decisions and for the autoscaler's capacity)."""

    util: float = 0.0  # busy fraction of its compute
    cost_ms: float = 0.0  # compute time per request (which stage is the bottleneck)
    cpu_cores: float = 0.0  # cores its process keeps busy

    def update(self, previous: Heartbeat, hb: Heartbeat, elapsed_s: float,
               smoothing: float = 0.3) -> None:
        keep = 1.0 - smoothing
        d_busy = hb.busy_s - previous.busy_s
        busy = max(0.0, min(1.0, d_busy / elapsed_s))
        self.util = keep * self.util + smoothing * busy
        cores = max(0.0, (hb.cpu_s - previous.cpu_s) / elapsed_s)
        self.cpu_cores = keep * self.cpu_cores + smoothing * cores
        d_req = hb.requests - previous.requests
        if d_req > 0 and d_busy > 0:
            cost = d_busy * 1000.0 / d_req
            self.cost_ms = cost if self.cost_ms == 0.0 else keep * self.cost_ms + smoothing * cost


@dataclass
class WorkerInfo:
    id: str
    since_s: float  # when it entered its current state
    state: WorkerState = WorkerState.STARTING
    pid: int = 0
    host: str = ""
    device: str = ""
    device_uuid: str = ""
    store_addr: str = ""
    worlds: set[int] = field(default_factory=set)
    spawned_by_us: bool = False
    # Started by a previous run of this controller and taken back after a restart (its
    # launcher still ran it): its end before it registers is no launch failure.
    adopted: bool = False
    retiring: bool = False
    joined_once: bool = False
    preloaded: bool = False  # it loaded a model at least once (a later crash is no load fault)
    # Set when a world of this worker broke by someone else's report: the worker may be the
    # one that died, so it is not reused until it heartbeats again after this time.
    suspect_since_s: float = 0.0
    reason: str = ""
    # Times its worlds broke on a stall (a world holding requests that answered nothing), and
    # why it was quarantined ("" while it is not): a worker that keeps stalling its worlds
    # (a blackhole) is not given new ones.
    stalls: list[float] = field(default_factory=list)
    deaths: list[float] = field(default_factory=list)  # when it was declared dead, recently
    quarantined: str = ""
    heartbeat: Heartbeat | None = None
    heartbeat_s: float = 0.0
    load: WorkerLoad = field(default_factory=WorkerLoad)

    @property
    def suspect(self) -> bool:
        return self.heartbeat_s < self.suspect_since_s

    def heard(self, hb: Heartbeat, now_s: float) -> None:
        """A heartbeat: update the load estimate and the liveness marks."""
        if self.heartbeat is not None and now_s > self.heartbeat_s:
            self.load.update(self.heartbeat, hb, now_s - self.heartbeat_s)
        self.heartbeat = hb
        self.heartbeat_s = now_s


@dataclass
class WorldInfo:
    id: int
    deployment: str
    epoch: int
    workers: list[str]
    created_s: float
    state: WorldState = WorldState.FORMING
    joined: set[str] = field(default_factory=set)
    ready_s: float = 0.0
    reason: str = ""
    load_ms: float = 0.0
    form_ms: float = 0.0
    backend: str = "local"  # gloo | nccl | local (one rank), see controller.placement
    entry: str = ""  # identity of rank 0's runner socket, from its Joined
    packed_dispatches: bool = False  # that socket reads packed dispatch batches (its Joined)
    token: str = ""  # the world's secret (see mesh.messages Join.token)
    revision: int = 1  # of its deployment's spec: a rollout forms the next one's worlds
    split: dict[str, Any] | None = None  # how rank 0 cut the model (its Joined's "split")
    # Each member's join, as sent: re-sent unchanged to the members that have not answered
    # it (a join lost on a connection torn down would otherwise leave the world forming
    # until world_form_timeout_ms), when, and how often.
    joins: dict[str, Join] = field(default_factory=dict)
    joins_sent_s: float = 0.0
    join_resends: int = 0

    def member_sockets(self) -> frozenset[bytes]:
        """Routing ids of its members' runner sockets: the only senders of its answers."""
        return frozenset(runner_identity(w, self.id, self.epoch, self.token).encode()
                         for w in self.workers)


@dataclass
class DeploymentState:
    """A deployment's live settings and formation record. The one place for what an operator
    or the autoscaler changes at run time: the world count, its bounds, the latency target."""

    config: DeploymentConfig
    desired: int
    min_worlds: int
    max_worlds: int
    slo_p99_ms: float
    failures: int = 0
    retry_at_s: float = 0.0
    last_error: str = ""
    quarantined: str = ""  # why formation stopped being retried ("" = it is not)
    inputs: dict[str, Any] = field(default_factory=dict)
    # What clients are told by 'describe': rank 0's inputs, parameters and streaming, the
    # last rank's outputs (from their handlers, sent with their joins).
    description: dict[str, Any] = field(default_factory=dict)
    # Its spec's revision (one more with every applied change) and the spec's hash; the
    # rollout in progress or the last one (controller/fleet_apply.py); removing: applied
    # away, its worlds draining, its requests answered unknown_model.
    revision: int = 1
    top_revision: int = 1  # the highest it has had (a rolled-back revision is not reused)
    spec_hash: str = ""
    rollout: Rollout | None = None
    removing: bool = False

    @classmethod
    def of(cls, config: DeploymentConfig, revision: int = 1) -> DeploymentState:
        return cls(config, config.worlds, config.min_worlds, config.max_worlds,
                   config.slo_p99_ms, revision=revision, top_revision=revision,
                   spec_hash=spec_hash(config))


@dataclass
class Rollout:
    """A deployment moving from one spec to the next: the new spec's worlds form and serve,
    then the old ones drain. ``state``: rolling, done or failed (then the old spec is back)."""

    from_revision: int
    to_revision: int
    previous: DeploymentConfig  # the spec it rolls back to if the new one fails to load
    started_s: float
    changed: tuple[str, ...]  # the spec's fields that changed
    state: str = "rolling"
    reason: str = ""
    finished_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"from_revision": self.from_revision, "to_revision": self.to_revision,
                "state": self.state, "reason": self.reason, "changed": list(self.changed)}


def spec_hash(spec: DeploymentConfig) -> str:
    """A short hash of everything a deployment's spec says (its identity across restarts)."""
    return hashlib.sha256(msgspec.json.encode(spec.to_wire())).hexdigest()[:12]


class EventLog:
    """The last world, worker and scaling events, for status: what broke, when, and why."""

    def __init__(self, wall_clock: Callable[[], float], keep: int = 100) -> None:
        self._wall_clock = wall_clock
        self._events: deque[dict[str, Any]] = deque(maxlen=keep)

    def add(self, kind: str, **fields: Any) -> None:
        self._events.append({"t": round(self._wall_clock(), 3), "event": kind, **fields})

    def last(self) -> dict[str, Any]:
        """The event added last (to complete it when its figures come in)."""
        return self._events[-1]

    def __iter__(self) -> Any:
        return iter(self._events)

    def __len__(self) -> int:
        return len(self._events)
