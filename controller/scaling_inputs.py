"""What the autoscaler's policy sees: one ``Context`` per deployment and tick, built from the
router's latency and arrival figures, the Fleet's records and the host's busy cores.

The service-rate figures come from one estimate, the workers' smoothed load (controller/
records.py ``WorkerLoad``: compute time per request, busy fraction, CPU cores), which worker-
granular sharing uses too:

* one world's service rate: the rate of its slowest stage, 1 / the highest compute time per
  request among its workers, averaged over the serving worlds;
* capacity: per stage, the summed rates of the distinct workers serving it (a worker shared by
  worlds counts once), and the slowest stage; it does not grow when workers only take turns
  on the same hardware, which is what the autoscaler's probe checks.

The latency the policy holds is the end-to-end p99 against ``slo_p99_ms``, except for a
generative deployment, whose whole streams last as long as they generate: there it is the
time to first token (p99, against ``slo_ttft_p99_ms``, or ``slo_p99_ms`` when that is 0) and,
when ``slo_tpot_p50_ms`` is set, the time per output token (p50), whichever is further over
its target (``generative_pressure``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from controller.autoscaler import Context
from controller.host_cpu import HostCpu
from controller.records import WorkerInfo, WorldInfo, WorldState

if TYPE_CHECKING:
    from controller.fleet import Fleet
    from controller.router import Router


def world_rps(serving: list[WorldInfo], workers: Mapping[str, WorkerInfo]) -> float:
    """Answers per second one busy world delivers (its slowest stage), averaged over these
    worlds; 0 while any of their workers' costs is unknown."""
    rates = []
    for world in serving:
        costs = [workers[w].load.cost_ms for w in world.workers if w in workers]
        if not costs or min(costs) <= 0.0:
            return 0.0
        rates.append(1000.0 / max(costs))
    return sum(rates) / len(rates) if rates else 0.0


def capacity_rps(serving: list[WorldInfo], workers: Mapping[str, WorkerInfo]) -> float:
    """What these worlds can deliver together: per stage, the summed rates of the distinct
    workers serving it, and the slowest stage. 0 while any stage's cost is unknown."""
    stages: dict[int, set[str]] = {}
    for world in serving:
        for rank, wid in enumerate(world.workers):
            stages.setdefault(rank, set()).add(wid)
    if not stages:
        return 0.0
    rates = []
    for members in stages.values():
        costs = [workers[w].load.cost_ms for w in members if w in workers]
        if not costs or min(costs) <= 0.0:
            return 0.0
        rates.append(sum(1000.0 / c for c in costs))
    return min(rates)


def generative_pressure(ttft: tuple[int, float], tpot: tuple[int, float], slo_ttft_ms: float,
                        slo_tpot_ms: float) -> tuple[int, float, float]:
    """(samples, latency, target) for the policy from a generative deployment's TTFT p99 and
    TPOT p50 (each ``(samples, ms)``): the one further over its target, as a latency against
    the TTFT target (a TPOT at 1.5x its target reads as a TTFT at 1.5x)."""
    samples, ttft_ms = ttft
    ratio = ttft_ms / slo_ttft_ms
    if slo_tpot_ms > 0 and tpot[0] > 0:
        tpot_ratio = tpot[1] / slo_tpot_ms
        if tpot_ratio > ratio or samples == 0:
            samples, ratio = tpot[0], tpot_ratio
    return samples, ratio * slo_ttft_ms, slo_ttft_ms


def world_cpu(serving: list[WorldInfo], workers: Mapping[str, WorkerInfo]) -> float:
    """Cores one busy world keeps busy: its workers' CPU use over their busy fraction (the
    busiest world, so a half-idle one does not look cheap); 0 when none is busy enough."""
    per_world = 0.0
    for world in serving:
        members = [workers[w] for w in world.workers if w in workers]
        util = max((m.load.util for m in members), default=0.0)
        if util >= 0.2:
            per_world = max(per_world, sum(m.load.cpu_cores for m in members) / util)
    return per_world


class ScalingInputs:
    """Builds the autoscaler's Context; samples the host's CPU once per tick."""

    def __init__(self, fleet: Fleet, routers: Mapping[str, Router], host_cores: int) -> None:
        self._fleet = fleet
        self._routers = routers
        self._host = HostCpu(host_cores) if host_cores else None
        self._sampled_s = -1.0

    def context(self, name: str, now: float) -> Context | None:
        wm = self._fleet
        dep = wm.deployments.get(name)
        if dep is None or dep.quarantined or dep.removing:
            return None
        router = self._routers[name]
        window_s = max(2.0, dep.config.upscale_delay_s)
        samples, p99 = router.stats.recent(now, window_s)
        slo = dep.slo_p99_ms
        if router.generative:
            ttft_n, ttft_ms, tpot_n, tpot_ms = router.gen.recent(now, window_s)
            config = dep.config
            samples, p99, slo = generative_pressure(
                (ttft_n, ttft_ms), (tpot_n, tpot_ms),
                config.slo_ttft_p99_ms or dep.slo_p99_ms, config.slo_tpot_p50_ms)
        mine = [w for w in wm.worlds.values() if w.deployment == name]
        serving = [w for w in mine if w.state == WorldState.SERVING]
        forming = sum(1 for w in mine if w.state == WorldState.FORMING)
        cores, busy = self._host_cpu(now)
        return Context(
            now_s=now, slo_p99_ms=slo, p99_ms=p99, samples=samples,
            arrival_rps=router.arrivals.rate(now, window_s), queued=router.queued,
            serving=len(serving), forming=forming, desired=dep.desired,
            min_worlds=dep.min_worlds, max_worlds=dep.max_worlds,
            world_rps=world_rps(serving, wm.workers),
            capacity_rps=capacity_rps(serving, wm.workers),
            host_cores=cores, host_busy_cores=busy,
            world_cpu=world_cpu(serving, wm.workers) if cores else 0.0,
            upscale_delay_s=dep.config.upscale_delay_s,
            downscale_delay_s=dep.config.downscale_delay_s)

    def _host_cpu(self, now: float) -> tuple[int, float]:
        """(cores, busy cores) of the local launcher's host; (0, 0) where unknown."""
        if self._host is None:
            return 0, 0.0
        if now != self._sampled_s:  # once per tick, for every deployment
            self._sampled_s = now
            self._host.sample()
        busy = self._host.busy_cores
        return (0, 0.0) if busy is None else (self._host.cores, busy)
