"""Autoscaling on the latency users feel: a pure policy and the actor that ticks it.

A ``ScalingPolicy`` decides; the first one, ``LatencyPolicy``, is
``decide(ctx, state, thresholds) -> (desired_worlds, state, reason)``, a pure function of what
the router measured (end-to-end p99 over a sliding window, queue depth, arrival rate, each world's
service rate measured online) and of its own state (when a breach or a headroom began). The
``Autoscaler`` actor calls it on a tick with an injected clock and applies the answer through
the WorldManager; a policy error is logged and the loop carries on.

The policy:

The thresholds named below are ``[autoscaler]`` keys (defaults: target_util 0.75, down_util
0.5, down_fraction 0.5, min_samples 20, probe_s 3, min_gain 0.1, hold_s 300); the delays are
each deployment's.

* scale up fast: when p99 has breached the target for ``upscale_delay_s`` (default 2 s) with
  at least ``min_samples`` answers in the window, or when the arrival rate is predicted to
  exceed what the worlds can serve at ``target_util``;
  jump straight to the number of worlds the arrival rate needs (at least one more), counting
  worlds still forming as capacity on its way, so a slow start is not answered twice;
* scale down after a sustained headroom, straight to what the load needs: only after p99 has
  stayed under ``down_fraction`` of the target for ``downscale_delay_s`` (default 30 s) and
  one world fewer would still run below ``down_util``; then it gives back every world the
  measured arrival rate and per-world capacity say is not needed (the fewest worlds that stay
  under ``down_util``, ``enough_worlds``), never below ``min_worlds``; each step restarts the
  wait;
* the gap between the up and down thresholds is the hysteresis that keeps a steady load,
  noisy or not, from moving the count back and forth;
* a world that adds no service rate is not capacity: after every scale-up the policy measures
  the deployment's capacity (per stage, the summed rates of the distinct workers serving it;
  the slowest stage) once the new worlds have served for ``probe_s``. If it did not rise by
  ``min_gain`` (a host with no free cores or GPU time: more worlds only take turns on the same
  hardware), it goes back to the count it came from and holds that as a ceiling for
  ``hold_s``, saying so;
* and where the host is known (the local launcher's) and a world of the deployment keeps
  cores busy, no world is added that the host's free cores cannot run: that one is not even
  tried;
* always within [min_worlds, max_worlds].
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from controller.autoscaler_config import AutoscalerConfig
from mesh.logs import speaker

log = speaker(logging.getLogger(__name__), "controller")


@dataclass(frozen=True, slots=True)
class Context:
    """What the policy sees at one tick."""

    now_s: float
    slo_p99_ms: float
    p99_ms: float  # end-to-end (queue + service) over the recent window; 0 if no samples
    samples: int  # answers in that window
    arrival_rps: float  # requests arriving per second (accepted), recent window
    queued: int
    serving: int  # worlds serving now
    forming: int  # worlds on their way
    desired: int  # the current target
    min_worlds: int
    max_worlds: int
    world_rps: float  # answers per second one busy world delivers (0: unknown yet)
    # What the serving worlds can deliver together (0: unknown): for each stage, the summed
    # rates (1 / compute time per request) of the distinct workers serving it, and the
    # slowest stage of those. A worker shared by worlds counts once; workers that take turns
    # on the same cores each get slower, so the sum does not grow. Judges a scale-up.
    capacity_rps: float = 0.0
    # The host the worlds run on, where known (0 cores: unknown): its cores, how many are
    # busy (every process), and how many one busy world of this deployment keeps busy.
    host_cores: int = 0
    host_busy_cores: float = 0.0
    world_cpu: float = 0.0
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 30.0


@dataclass(frozen=True, slots=True)
class Probe:
    """A scale-up under test: did going from ``from_worlds`` add service rate?"""

    from_worlds: int
    to_worlds: int
    rate_before: float
    serving_since_s: float | None = None  # when every new world was serving


@dataclass(frozen=True, slots=True)
class State:
    breach_since_s: float | None = None
    headroom_since_s: float | None = None
    probe: Probe | None = None
    ceiling: int | None = None  # more worlds than this added nothing, until ceiling_until_s
    ceiling_until_s: float = 0.0
    ceiling_why: str = ""


S = TypeVar("S")
_DEFAULTS = AutoscalerConfig()


class ScalingPolicy(Protocol[S]):
    """What the Autoscaler ticks: a pure decision from what was measured (``Context``) and the
    policy's own state. ``LatencyPolicy`` is the first one; another (a schedule, a queue
    length target) only needs these two methods and a name in ``[autoscaler] policy``."""

    def initial(self) -> S: ...

    def decide(self, ctx: Context, state: S) -> tuple[int, S, str]:
        """The number of worlds to aim for, the next state, and why."""
        ...


class LatencyPolicy:
    """Hold the p99 target: the policy this module's docstring describes, with its
    thresholds from ``[autoscaler]`` (controller/config.py ``AutoscalerConfig``)."""

    def __init__(self, thresholds: AutoscalerConfig = _DEFAULTS) -> None:
        self.thresholds = thresholds

    def initial(self) -> State:
        return State()

    def decide(self, ctx: Context, state: State) -> tuple[int, State, str]:
        return decide(ctx, state, self.thresholds)


def policy_of(config: AutoscalerConfig) -> ScalingPolicy[Any]:
    """The policy ``[autoscaler] policy`` names."""
    if config.policy == "latency":
        return LatencyPolicy(config)
    raise ValueError(f"unknown scaling policy {config.policy!r}")  # the config refuses it


def enough_worlds(ctx: Context, t: AutoscalerConfig = _DEFAULTS) -> int:
    """After a headroom: the fewest worlds that keep the arrival rate under ``down_util`` of
    their measured capacity (the headroom the down rule asks for), within the bounds, and
    fewer than now. Nothing arriving: ``min_worlds``."""
    lo = ctx.min_worlds
    if ctx.arrival_rps <= 0:
        return lo
    if ctx.world_rps <= 0:
        return max(lo, ctx.desired - 1)  # capacity unknown: one world at a time, as before
    fewest = math.ceil(ctx.arrival_rps / (ctx.world_rps * t.down_util))
    return max(lo, 1, min(ctx.desired - 1, fewest))


def needed_worlds(ctx: Context, t: AutoscalerConfig = _DEFAULTS) -> int | None:
    """Worlds the arrival rate needs at the target utilisation (None: rate unknown)."""
    if ctx.world_rps <= 0 or ctx.arrival_rps <= 0:
        return None
    return max(1, math.ceil(ctx.arrival_rps / (ctx.world_rps * t.target_util)))


def decide(ctx: Context, state: State,
           t: AutoscalerConfig = _DEFAULTS) -> tuple[int, State, str]:
    """The latency policy: the number of worlds to aim for, the next state, and why."""
    lo, hi = ctx.min_worlds, ctx.max_worlds
    current = ctx.desired
    clamped = max(lo, min(hi, current))
    if clamped != current:
        return clamped, replace(state, probe=None), f"bounds [{lo}, {hi}] moved the target"
    if state.ceiling is not None and ctx.now_s >= state.ceiling_until_s:
        state = replace(state, ceiling=None, ceiling_why="")
    if state.probe is not None:
        verdict = _judge_probe(ctx, state, t)
        if verdict is not None:
            return verdict
        state = replace(state, probe=_advance_probe(ctx, state.probe))
    target, state, why = _decide(ctx, state, t)
    if target > current and state.probe is not None:
        if state.probe.serving_since_s is not None:
            # The last step's worlds serve and are being measured: judge them first.
            return current, state, (f"measuring the service rate of {current} worlds "
                                    f"(before: {state.probe.rate_before:.0f}/s)")
        state = replace(state, probe=replace(state.probe, to_worlds=target))
    elif target > current:
        room = cpu_room(ctx)
        if room is not None and target > current + room:
            target = current + room
            cpu = (f"the host's CPU is busy ({ctx.host_busy_cores:.1f} of {ctx.host_cores} "
                   f"cores); a world of this deployment keeps {ctx.world_cpu:.1f} busy")
            if target == current:
                return current, state, f"holding at {current}: {cpu}"
            why += f" (capped at {target}: {cpu})"
        if state.ceiling is not None and target > state.ceiling:
            target = max(current, state.ceiling)
            if target == current:
                return current, state, f"holding at {current}: {state.ceiling_why}"
            why += f" (capped at {state.ceiling}: {state.ceiling_why})"
        if ctx.capacity_rps > 0 and ctx.serving == current and ctx.forming == 0:
            state = replace(state, probe=Probe(current, target, ctx.capacity_rps))
    elif target < current:
        state = replace(state, probe=None)
    return target, state, why


def cpu_room(ctx: Context) -> int | None:
    """How many more busy worlds the host's free cores can run (None: unknown, or the
    deployment's worlds do not keep cores busy, as a model that waits on I/O)."""
    if ctx.host_cores <= 0 or ctx.world_cpu < 0.5:
        return None
    free = max(0.0, ctx.host_cores - ctx.host_busy_cores)
    return int((free + 0.25 * ctx.world_cpu) / ctx.world_cpu)


def _advance_probe(ctx: Context, probe: Probe) -> Probe | None:
    if ctx.desired != probe.to_worlds:
        return None  # someone else moved the target: nothing left to judge
    if probe.serving_since_s is None and ctx.serving >= probe.to_worlds and ctx.forming == 0:
        return replace(probe, serving_since_s=ctx.now_s)
    return probe


def _judge_probe(ctx: Context, state: State,
                 t: AutoscalerConfig) -> tuple[int, State, str] | None:
    """Once the bigger fleet has served for ``probe_s``: keep it, or go back and hold."""
    probe = state.probe
    assert probe is not None
    if (ctx.desired != probe.to_worlds or probe.serving_since_s is None
            or ctx.now_s - probe.serving_since_s < t.probe_s):
        return None
    rate = ctx.capacity_rps
    if rate <= 0.0 or rate >= probe.rate_before * (1.0 + t.min_gain):
        return ctx.desired, replace(state, probe=None), (
            f"{probe.to_worlds} worlds serve {rate:.0f}/s against {probe.rate_before:.0f}/s "
            f"with {probe.from_worlds}: kept")
    back = max(ctx.min_worlds, probe.from_worlds)
    why = (f"{probe.to_worlds} worlds served {rate:.0f}/s, no more than {probe.from_worlds} "
           f"served ({probe.rate_before:.0f}/s): the host has no room for more")
    held = replace(state, probe=None, breach_since_s=None, headroom_since_s=None, ceiling=back,
                   ceiling_until_s=ctx.now_s + t.hold_s, ceiling_why=why)
    return back, held, f"down: {why}; holding at {back} for {t.hold_s:.0f}s"


def _decide(ctx: Context, state: State, t: AutoscalerConfig) -> tuple[int, State, str]:
    lo, hi = ctx.min_worlds, ctx.max_worlds
    current = ctx.desired
    # Worlds asked for but not yet forming count too: the manager acts on its next pass.
    if current == 0 and (ctx.queued > 0 or ctx.arrival_rps > 0) and hi > 0:
        # Scaled to zero and traffic came back: nothing can be measured without a world.
        target = max(1, lo)
        return target, replace(state, breach_since_s=None), "up: requests arrived with no world"
    capacity_on_the_way = max(ctx.serving + ctx.forming, current)
    need = needed_worlds(ctx, t)
    breaching = ctx.samples >= t.min_samples and ctx.p99_ms > ctx.slo_p99_ms
    predicted = need is not None and need > capacity_on_the_way
    if breaching or predicted:
        since = state.breach_since_s if state.breach_since_s is not None else ctx.now_s
        state = replace(state, breach_since_s=since, headroom_since_s=None)
        waited = ctx.now_s - since
        if current >= hi:
            return current, state, f"at max_worlds {hi}; p99 {ctx.p99_ms:.1f} ms"
        if ctx.forming > 0 and not (need is not None and need > capacity_on_the_way):
            return current, state, "waiting for forming worlds"
        if predicted or waited >= ctx.upscale_delay_s:
            target = max(current + 1, need or 0)
            target = min(hi, target)
            why = (f"arrival {ctx.arrival_rps:.0f}/s needs {need} worlds at "
                   f"{ctx.world_rps:.0f}/s each" if predicted else
                   f"p99 {ctx.p99_ms:.1f} ms > target {ctx.slo_p99_ms:.1f} ms for "
                   f"{waited:.1f}s")
            return target, replace(state, breach_since_s=None), f"up: {why}"
        return current, state, f"breach for {waited:.1f}s (acting at {ctx.upscale_delay_s}s)"
    # No breach, none predicted: is there room to give a world back?
    state = replace(state, breach_since_s=None)
    low_latency = ctx.samples == 0 or ctx.p99_ms < t.down_fraction * ctx.slo_p99_ms
    fits_in_fewer = ctx.queued == 0 and (
        (need is None and ctx.arrival_rps == 0)
        or (need is not None and ctx.arrival_rps <= (current - 1) * ctx.world_rps * t.down_util))
    if current > lo and low_latency and fits_in_fewer and ctx.forming == 0:
        since = state.headroom_since_s if state.headroom_since_s is not None else ctx.now_s
        state = replace(state, headroom_since_s=since)
        waited = ctx.now_s - since
        if waited >= ctx.downscale_delay_s:
            target = enough_worlds(ctx, t)
            return target, replace(state, headroom_since_s=None), \
                f"down: headroom for {waited:.0f}s (p99 {ctx.p99_ms:.1f} ms, " \
                f"arrival {ctx.arrival_rps:.0f}/s: {target} world(s) enough)"
        return current, state, f"headroom for {waited:.0f}s (acting at {ctx.downscale_delay_s}s)"
    return current, replace(state, headroom_since_s=None), "steady"


@dataclass
class Decision:
    t: float
    deployment: str
    from_worlds: int
    to_worlds: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"t": round(self.t, 3), "from": self.from_worlds, "to": self.to_worlds,
                "reason": self.reason}


class Autoscaler:
    """Ticks the policy for every deployment and applies its answers.

    ``context_of(name)`` builds a Context (or None to skip), ``apply(name, worlds, reason)``
    sets the target; both are injected, as is the clock, so tests drive it without sleeping.
    """

    def __init__(self, names: Iterable[str], *,
                 context_of: Callable[[str, float], Context | None],
                 apply: Callable[[str, int, str], None], tick_s: float = 0.5,
                 policy: ScalingPolicy[Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._names = names
        self._context_of = context_of
        self._apply = apply
        self.tick_s = tick_s
        self.policy: ScalingPolicy[Any] = policy or LatencyPolicy()
        self._clock = clock
        self.states: dict[str, Any] = {}
        self.last: dict[str, Decision] = {}
        self.reason: dict[str, str] = {}

    def tick(self) -> None:
        now = self._clock()
        names = list(self._names)  # a live view: deployments come and go (meshctl apply)
        for name in [n for n in self.states if n not in names]:
            del self.states[name]
        for name in names:
            try:
                ctx = self._context_of(name, now)
                if ctx is None:
                    continue
                state = self.states.get(name)
                if state is None:
                    state = self.policy.initial()
                target, self.states[name], why = self.policy.decide(ctx, state)
                self.reason[name] = why
                if target != ctx.desired:
                    decision = Decision(time.time(), name, ctx.desired, target, why)
                    self.last[name] = decision
                    log.info("autoscaler: %s %d -> %d worlds (%s)", name,
                             ctx.desired, target, why)
                    self._apply(name, target, why)
            except Exception:
                log.exception("autoscaler tick for %s failed", name)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self.tick()
