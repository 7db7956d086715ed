"""Autoscaling on the latency users feel: a pure policy and the actor that ticks it.

``decide(ctx, state) -> (desired_worlds, state, reason)`` is a pure function of what the
router measured (end-to-end p99 over a sliding window, queue depth, arrival rate, each world's
service rate measured online) and of its own state (when a breach or a headroom began). The
``Autoscaler`` actor calls it on a tick with an injected clock and applies the answer through
the WorldManager; a policy error is logged and the loop carries on.

The policy:

* scale up fast: when p99 has breached the target for ``upscale_delay_s`` (default 2 s), or
  when the arrival rate is predicted to exceed what the worlds can serve at ``target_util``;
  jump straight to the number of worlds the arrival rate needs (at least one more), counting
  worlds still forming as capacity on its way, so a slow start is not answered twice;
* scale down slowly, one world at a time: only after p99 has stayed under
  ``down_fraction`` of the target for ``downscale_delay_s`` (default 30 s) and the remaining
  worlds would still run below ``down_util``; each step restarts the wait;
* the gap between the up and down thresholds is the hysteresis that keeps a steady load,
  noisy or not, from moving the count back and forth;
* always within [min_worlds, max_worlds].
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger(__name__)


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
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 30.0
    target_util: float = 0.75
    down_util: float = 0.5
    down_fraction: float = 0.5
    min_samples: int = 20


@dataclass(frozen=True, slots=True)
class State:
    breach_since_s: float | None = None
    headroom_since_s: float | None = None


def needed_worlds(ctx: Context) -> int | None:
    """Worlds the arrival rate needs at the target utilisation (None: rate unknown)."""
    if ctx.world_rps <= 0 or ctx.arrival_rps <= 0:
        return None
    return max(1, math.ceil(ctx.arrival_rps / (ctx.world_rps * ctx.target_util)))


def decide(ctx: Context, state: State) -> tuple[int, State, str]:
    """The number of worlds to aim for, the next state, and why."""
    lo, hi = ctx.min_worlds, ctx.max_worlds
    current = ctx.desired
    clamped = max(lo, min(hi, current))
    if clamped != current:
        return clamped, state, f"bounds [{lo}, {hi}] moved the target"
    # Worlds asked for but not yet forming count too: the manager acts on its next pass.
    if current == 0 and (ctx.queued > 0 or ctx.arrival_rps > 0) and hi > 0:
        # Scaled to zero and traffic came back: nothing can be measured without a world.
        target = max(1, lo)
        return target, replace(state, breach_since_s=None), "up: requests arrived with no world"
    capacity_on_the_way = max(ctx.serving + ctx.forming, current)
    need = needed_worlds(ctx)
    breaching = ctx.samples >= ctx.min_samples and ctx.p99_ms > ctx.slo_p99_ms
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
    low_latency = ctx.samples == 0 or ctx.p99_ms < ctx.down_fraction * ctx.slo_p99_ms
    fits_in_fewer = ctx.queued == 0 and (
        (need is None and ctx.arrival_rps == 0)
        or (need is not None and ctx.arrival_rps <= (current - 1) * ctx.world_rps * ctx.down_util))
    if current > lo and low_latency and fits_in_fewer and ctx.forming == 0:
        since = state.headroom_since_s if state.headroom_since_s is not None else ctx.now_s
        state = replace(state, headroom_since_s=since)
        waited = ctx.now_s - since
        if waited >= ctx.downscale_delay_s:
            target = current - 1
            return target, replace(state, headroom_since_s=None), \
                f"down: headroom for {waited:.0f}s (p99 {ctx.p99_ms:.1f} ms, " \
                f"arrival {ctx.arrival_rps:.0f}/s)"
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
    """Ticks ``decide`` for every deployment and applies its answers.

    ``context_of(name)`` builds a Context (or None to skip), ``apply(name, worlds, reason)``
    sets the target; both are injected, as is the clock, so tests drive it without sleeping.
    """

    def __init__(self, names: list[str], *, context_of: Callable[[str, float], Context | None],
                 apply: Callable[[str, int, str], None], tick_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._names = names
        self._context_of = context_of
        self._apply = apply
        self.tick_s = tick_s
        self._clock = clock
        self.states: dict[str, State] = {n: State() for n in names}
        self.last: dict[str, Decision] = {}
        self.reason: dict[str, str] = {}

    def tick(self) -> None:
        now = self._clock()
        for name in self._names:
            try:
                ctx = self._context_of(name, now)
                if ctx is None:
                    continue
                target, self.states[name], why = decide(ctx, self.states[name])
                self.reason[name] = why
                if target != ctx.desired:
                    decision = Decision(time.time(), name, ctx.desired, target, why)
                    self.last[name] = decision
                    log.info("[controller] autoscaler: %s %d -> %d worlds (%s)", name,
                             ctx.desired, target, why)
                    self._apply(name, target, why)
            except Exception:
                log.exception("[controller] autoscaler tick for %s failed", name)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self.tick()
