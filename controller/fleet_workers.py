"""What the Fleet does with workers: what it hears of them (registrations, joins, leaves,
broken-world reports, heartbeats, losses), the records that quarantine one that keeps stalling
or dying, and their lifecycle (start, settle, retire, preload, adopt, stop). Functions of the
Fleet (controller/fleet.py), called from it only.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

from controller import fleet_apply
from controller.effects import (
    ForgetWorker,
    HoldRoute,
    KillWorker,
    StartWorker,
    StopWorker,
    WatchWorker,
)
from controller.records import WorkerInfo, WorkerState, WorldInfo, WorldState
from mesh.logs import speaker
from mesh.messages import (
    Heartbeat,
    Joined,
    JoinFailed,
    Leave,
    Left,
    Message,
    Ping,
    Register,
    Shutdown,
    Welcome,
    WorldBroken,
)
from mesh.messages import Preload as PreloadMsg

if TYPE_CHECKING:
    from controller.config import ControllerConfig
    from controller.fleet import Fleet

log = speaker(logging.getLogger(__name__), "controller")

MAX_STALLS = 3  # stalled worlds within STALL_WINDOW_S that quarantine a worker
STALL_WINDOW_S = 600.0
MAX_DEATHS = 3  # deaths within STALL_WINDOW_S after which a rejoining worker is quarantined


def from_worker(fleet: Fleet, worker_id: str, msg: Message) -> None:
    if isinstance(msg, Register):
        register(fleet, worker_id, msg)
        return
    worker = fleet.workers.get(worker_id)
    if worker is None or worker.state == WorkerState.STARTING:
        # Unknown, or adopted and not registered with this run yet: a previous run's.
        ask_to_register(fleet, worker_id)
        return
    if worker.state == WorkerState.DEAD:
        if (worker_id, worker.pid) in fleet.fenced:
            if worker.spawned_by_us:
                # Our own process, declared dead and replaced, spoke again (it was
                # stopped, now resumed): end it.
                fleet.send(worker_id, Shutdown(reason="fenced: declared dead earlier"))
            else:
                # A worker that joined by itself, silent for a while (a partition, a
                # long pause): its worlds are gone; it leaves them and registers again.
                ask_to_register(fleet, worker_id)
        return
    world = fleet.worlds.get(getattr(msg, "world_id", -1))
    if world is not None and worker_id not in world.workers:
        # A registered worker speaking of a world it is not in (a stranger, or a bug):
        # it can neither join, fail nor break it.
        fleet.foreign_messages += 1
        return
    match msg:
        case Joined():
            joined(fleet, worker, world, msg)
        case JoinFailed(world_id, epoch, error):
            if world is not None and world.epoch == epoch:
                formation_failed(fleet, world, error)
                fleet.break_world(world, f"join failed: {error}")
        case Left(world_id):
            worker.worlds.discard(world_id)
            settle_worker(fleet, worker)
        case WorldBroken(world_id, epoch, reason):
            if world is not None and world.epoch == epoch:
                now = fleet.clock()
                for wid in world.workers:
                    peer = fleet.workers.get(wid)
                    if wid != worker_id and peer is not None and peer.state != WorkerState.DEAD:
                        peer.suspect_since_s = now
                        fleet.send(wid, Ping(reply=True))  # alive? a heartbeat clears it
                fleet.break_world(world, f"reported by {worker_id}: {reason}")


def joined(fleet: Fleet, worker: WorkerInfo, world: WorldInfo | None, msg: Joined) -> None:
    """A member formed its part of a world; the world serves once every member has."""
    if world is None:
        # A join that arrived after the world was given up on (a repeat, or one delayed on a
        # connection): the worker holds a world nobody will use.
        fleet.send(worker.id, Leave(world_id=msg.world_id, epoch=msg.epoch, abort=True))
        return
    if world.epoch != msg.epoch or world.state != WorldState.FORMING:
        return  # a repeated answer to a repeated join
    world.joined.add(worker.id)
    if msg.entry and world.workers[0] == worker.id:
        world.entry = msg.entry
        world.packed_dispatches = msg.packed_dispatches
    worker.joined_once = True
    world.load_ms = max(world.load_ms, msg.load_ms)
    world.form_ms = max(world.form_ms, msg.form_ms)
    dep = fleet.deployments[world.deployment]
    rank = world.workers.index(worker.id)
    if rank == 0:  # what the model takes: rank 0's (a later stage takes activations)
        if msg.inputs:
            dep.inputs = dict(msg.inputs)
        for key in ("inputs", "parameters", "streaming", "generative", "max_context",
                    "vocab_size"):
            if key in msg.describe:
                dep.description[key] = msg.describe[key]
        world.split = msg.describe.get("split")  # this world's: a rollout's may differ
    if rank == len(world.workers) - 1 and "outputs" in msg.describe:
        dep.description["outputs"] = msg.describe["outputs"]  # the last stage's
    if world.joined == set(world.workers):
        fleet.world_serving(world)


def register(fleet: Fleet, worker_id: str, msg: Register) -> None:
    worker = fleet.workers.get(worker_id)
    if (worker_id, msg.pid) in fleet.fenced:
        if worker is None or worker.spawned_by_us:
            # One of ours we declared dead came back (e.g. SIGCONT): it was replaced.
            fleet.send(worker_id, Shutdown(reason="fenced: declared dead earlier"))
            return
        # A worker that joined by itself comes back after it was declared dead (its host
        # was cut off, or it paused): registering means it left every world, so it is
        # the same worker again. Its old worlds' traffic is fenced by world and epoch.
        fleet.fenced.discard((worker_id, msg.pid))
        log.warning("worker %s is back after it was declared dead (%s): rejoining",
                    worker_id, worker.reason)
        fleet.events.add("worker_rejoined", worker=worker_id, was=worker.reason)
    if worker is None or worker.state == WorkerState.DEAD:
        previous = worker
        worker = WorkerInfo(worker_id, since_s=fleet.clock())
        if previous is not None:
            # Its record outlives a death: a worker that keeps dying or stalling its
            # worlds stays quarantined however often it comes back.
            worker.stalls, worker.deaths = previous.stalls, previous.deaths
            worker.quarantined = previous.quarantined
            worker.reason = f"quarantined: {worker.quarantined}" if worker.quarantined \
                else ""
        fleet.workers[worker_id] = worker
    if worker.state == WorkerState.STARTING:
        worker.state = WorkerState.IDLE
        worker.since_s = fleet.clock()
        fleet.spawn_failures = 0
    worker.pid, worker.host, worker.device = msg.pid, msg.host, msg.device
    worker.device_uuid = msg.device_uuid
    worker.store_addr = msg.store_addr
    fleet.emit(WatchWorker(worker_id))
    fleet.send(worker_id, fleet.welcome)
    log.info("worker %s registered (pid %d, %s)", worker_id, msg.pid, msg.device)


def welcome(c: ControllerConfig) -> Welcome:
    """What a worker is told when it registers: how often to beat, when to give up on the
    controller, and the bounds of its stage cache (idle stages, bytes of all stages)."""
    return Welcome(heartbeat_interval_ms=c.heartbeat_interval_ms,
                   controller_timeout_ms=c.controller_timeout_ms,
                   max_idle_stages=c.max_idle_stages, max_stage_bytes=c.max_stage_bytes,
                   packed_replies=True)


def heartbeat(fleet: Fleet, worker_id: str, hb: Heartbeat, received_s: float) -> bool:
    """Note a heartbeat received at ``received_s``; True when it cleared a suspect (worth
    a plan)."""
    worker = fleet.workers.get(worker_id)
    if worker is None or worker.state == WorkerState.STARTING:
        # Unknown, or adopted and not registered with this run yet: a previous run's.
        ask_to_register(fleet, worker_id)
        return False
    was_suspect = worker.suspect
    worker.heard(hb, received_s)
    return was_suspect and worker.state == WorkerState.IDLE


def ask_to_register(fleet: Fleet, worker_id: str) -> None:
    """A worker this controller never registered speaks (it was a previous controller's,
    before a restart): ask it, at most once a second, to leave its old worlds and
    register, so the fleet is adopted rather than left to time out."""
    now = fleet.clock()
    if fleet.stopping or now - fleet.asked.get(worker_id, -1e9) < 1.0:
        return
    if len(fleet.asked) > 10_000:
        fleet.asked.clear()
    fleet.asked[worker_id] = now
    fleet.send(worker_id, Ping(register=True))


def worker_died(fleet: Fleet, worker_id: str, reason: str, *, kill: bool = False) -> None:
    worker = fleet.workers.get(worker_id)
    if worker is None:
        worker = WorkerInfo(worker_id, since_s=fleet.clock())
        fleet.workers[worker_id] = worker
    if worker.state == WorkerState.DEAD:
        return
    was_draining = worker.state == WorkerState.DRAINING
    if worker.state == WorkerState.STARTING and worker.spawned_by_us \
            and not worker.adopted and not fleet.stopping:
        spawn_failed(fleet, worker_id, reason)
    worker.state = WorkerState.DEAD
    worker.reason = reason
    worker.since_s = fleet.clock()
    fleet.fenced.add((worker_id, worker.pid))
    if not was_draining and not worker.retiring and not fleet.stopping:
        # A failure, not a release: it counts towards churn and a flapping quarantine.
        fleet.workers_died += 1
        count_death(fleet, worker)
    fleet.emit(ForgetWorker(worker_id))
    if kill:
        fleet.emit(KillWorker(worker_id))
    (log.info if was_draining or fleet.stopping else log.warning)(
        "worker %s is dead: %s", worker_id, reason)
    fleet.events.add("worker_dead", worker=worker_id, reason=reason)
    # A worker shared between worlds takes all of them down: stop routing to every one
    # first, so the requests re-sent from the first are not sent into the next (each such
    # send would spend one of their max_attempts on a world already known dead).
    for world_id in worker.worlds:
        world = fleet.worlds.get(world_id)
        if world is not None:
            fleet.emit(HoldRoute(world.deployment, world_id))
    for world_id in sorted(worker.worlds):
        world = fleet.worlds.get(world_id)
        if world is not None:
            if world.state == WorldState.FORMING and worker_id not in world.joined \
                    and not worker.joined_once:
                formation_failed(fleet, world, f"worker {worker_id} {reason} while loading")
            fleet.break_world(world, f"worker {worker_id} {reason}")
    worker.worlds.clear()


def count_stall(fleet: Fleet, world: WorldInfo) -> None:
    """Each member of a stalled world is charged with it; one charged MAX_STALLS times in
    STALL_WINDOW_S is quarantined (a worker that takes requests and never answers would
    otherwise be picked again after every break)."""
    now = fleet.clock()
    for wid in world.workers:
        worker = fleet.workers.get(wid)
        if worker is None or worker.quarantined:
            continue
        worker.stalls = [t for t in worker.stalls if now - t < STALL_WINDOW_S] + [now]
        if len(worker.stalls) >= MAX_STALLS:
            worker.quarantined = (f"{len(worker.stalls)} of its worlds stalled within "
                                  f"{STALL_WINDOW_S:.0f}s")
            worker.reason = f"quarantined: {worker.quarantined}"
            log.warning("worker %s quarantined: %s", wid, worker.quarantined)
            fleet.events.add("worker_quarantined", worker=wid, reason=worker.quarantined)


def count_death(fleet: Fleet, worker: WorkerInfo) -> None:
    """A worker declared dead MAX_DEATHS times in STALL_WINDOW_S (one that keeps dropping
    off its network, say) is quarantined if it comes back: each of its deaths broke
    worlds and cost re-sends."""
    now = fleet.clock()
    worker.deaths = [t for t in worker.deaths if now - t < STALL_WINDOW_S] + [now]
    if len(worker.deaths) >= MAX_DEATHS and not worker.quarantined \
            and not worker.spawned_by_us:
        worker.quarantined = (f"declared dead {len(worker.deaths)} times within "
                              f"{STALL_WINDOW_S:.0f}s")
        log.warning("worker %s quarantined: %s", worker.id, worker.quarantined)
        fleet.events.add("worker_quarantined", worker=worker.id, reason=worker.quarantined)


def spawn_failed(fleet: Fleet, worker_id: str, reason: str) -> None:
    fleet.spawn_failures += 1
    limit = fleet.config.controller.max_load_failures
    if fleet.spawn_failures >= limit:
        fleet.spawn_quarantined = (f"{fleet.spawn_failures} workers in a row died before "
                                   f"registering; last: {worker_id} {reason}")
        log.error("no more workers will be started: %s", fleet.spawn_quarantined)
        fleet.events.add("launcher_quarantined", reason=fleet.spawn_quarantined)
        return
    backoff_s = backoff(fleet.spawn_failures)
    fleet.spawn_retry_at_s = fleet.clock() + backoff_s
    log.error("worker %s died before registering (%s); next start in %.1fs", worker_id,
              reason, backoff_s)


def formation_failed(fleet: Fleet, world: WorldInfo, error: str) -> None:
    """Back off exponentially; after ``max_load_failures`` in a row, stop trying. A
    rollout's new spec that fails is rolled back instead (controller/fleet_apply.py)."""
    if fleet_apply.load_failed(fleet, world, error):
        return
    dep = fleet.deployments[world.deployment]
    dep.failures += 1
    dep.last_error = error
    limit = fleet.config.controller.max_load_failures
    if dep.failures >= limit:
        dep.quarantined = (f"{dep.failures} formation failures in a row; last: {error}. "
                           f"Fix the model, then 'meshctl scale {dep.config.name}' to retry")
        log.error("%s quarantined: %s", dep.config.name, dep.quarantined)
        fleet.events.add("deployment_quarantined", deployment=dep.config.name, reason=error,
                         failures=dep.failures)
        return
    backoff_s = backoff(dep.failures)
    dep.retry_at_s = fleet.clock() + backoff_s
    log.error("world %d/%d of %s failed to form: %s (retry %d/%d in %.1fs)", world.id,
              world.epoch, world.deployment, error, dep.failures, limit - 1, backoff_s)


def backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` in a row: 0.5, 1, 2, ... up to 60."""
    return float(min(60.0, 0.5 * 2 ** (failures - 1)))


# -- their lifecycle --------------------------------------------------------------------

def settle_worker(fleet: Fleet, worker: WorkerInfo) -> None:
    if worker.worlds or worker.state == WorkerState.DEAD:
        return
    if worker.state == WorkerState.DRAINING:
        if not worker.retiring:
            retire_worker(fleet, worker)
        return
    worker.state = WorkerState.IDLE
    worker.since_s = fleet.clock()


def retire_worker(fleet: Fleet, worker: WorkerInfo) -> None:
    worker.state = WorkerState.DRAINING
    worker.retiring = True
    worker.since_s = fleet.clock()
    if worker.spawned_by_us:
        # It goes quiet on purpose, and the launcher reports its exit: not a hang. A
        # worker that joined by itself has no launcher to report it, so Health keeps
        # watching and declares it dead once it has gone quiet.
        fleet.emit(ForgetWorker(worker.id))
    fleet.send(worker.id, Shutdown(reason="released"))
    if worker.spawned_by_us:
        fleet.emit(StopWorker(worker.id))


def start_worker(fleet: Fleet) -> None:
    worker_id = f"w{next(fleet.worker_ids)}"
    while worker_id in fleet.workers:  # one that joined by itself under this name
        worker_id = f"w{next(fleet.worker_ids)}"
    fleet.workers[worker_id] = WorkerInfo(worker_id, since_s=fleet.clock(), spawned_by_us=True)
    fleet.took_room()
    fleet.emit(StartWorker(worker_id))  # answered by Started or StartFailed


def start_failed(fleet: Fleet, worker_id: str, error: str) -> None:
    log.error("cannot start a worker: %s", error)
    worker = fleet.workers.get(worker_id)
    if worker is not None and worker.state == WorkerState.STARTING:
        worker.state = WorkerState.DEAD
        worker.reason = f"launch failed: {error}"


def adopt(fleet: Fleet, worker_ids: tuple[str, ...]) -> None:
    """The workers the launcher still runs from a previous run of this controller (a
    restart under the kubernetes launcher) are ours again, expected to register, and new
    ids start above theirs, so nothing is started for them and no new worker asks for an
    id, or a pod, that one of them holds."""
    now = fleet.clock()
    for worker_id in worker_ids:
        fleet.workers[worker_id] = WorkerInfo(worker_id, since_s=now, spawned_by_us=True,
                                             adopted=True)
    numbers = [int(w[1:]) for w in worker_ids if w[:1] == "w" and w[1:].isdigit()]
    fleet.worker_ids = itertools.count(max(numbers, default=0) + 1)


def preload(fleet: Fleet, worker: WorkerInfo) -> None:
    """A warm worker loads every stage it may be asked for, so a later join only forms
    the group: re-forming after a failure then costs milliseconds, not a model load.
    At most ``max_idle_stages`` of them (more would only be dropped again), in config
    order."""
    worker.preloaded = True
    budget = fleet.config.controller.max_idle_stages
    for dep in fleet.deployments.values():
        if dep.quarantined:
            continue
        for rank in range(dep.config.stages):
            if budget <= 0:
                return
            budget -= 1
            fleet.send(worker.id, PreloadMsg(deployment=dep.config, rank=rank,
                                            size=dep.config.stages))


def stop_all(fleet: Fleet) -> None:
    """Tell every worker to stop; the launcher then ends the ones it started."""
    fleet.stopping = True
    for worker in fleet.workers.values():
        if worker.state != WorkerState.DEAD:
            fleet.emit(ForgetWorker(worker.id))
            fleet.send(worker.id, Shutdown(reason="controller stopping"))
