"""Where a pipeline model is cut into stages: by the measured time of its children, and the
same cut on every rank of a world.

An ``nn.Sequential`` served in ``stages`` ranks is cut along its children. Cut by parameter
count, a ResNet put nearly all of its compute on stage 0 (its last layer and classifier hold
most of the weights and little of the work), so stage 1 idled while stage 0 was the pipeline.
The cut is chosen by cost instead:

* **Measured**, once per deployment on a worker, at its first load there. The worker builds
  the model and makes an example batch from the handler's input spec (``input_spec``: the
  dtype and one row's shape of ``x``), ``rows`` rows: one micro-batch of a full batch, at
  most ``PROFILE_MAX_ROWS``. It runs the children on the device they will serve on, each on
  the previous child's output: ``WARMUP`` passes, then up to ``REPEATS`` timed ones (at least
  one, no more once they took ``BUDGET_S``), keeping each child's least time
  (``measure_children``: on a shared machine noise only ever adds time, and the worker's
  peers are often still starting while it measures). The whole model is on the device while
  it is measured. ``balance`` then picks the cut whose slowest stage is fastest (a dynamic
  programme over prefix sums); among the cuts within ``TOLERANCE`` of that, the one nearest
  the parameter-count cut, so that a model already balanced by weight (the ``mlp``) keeps
  that cut rather than one or its neighbour by noise.
* **By parameter count**, logged as a warning, when no example batch can be built (an input
  that is not one tensor ``x``, a spec without a row shape) or measuring fails (a child that
  raises, a model that does not fit the device).
* **As configured**: ``split_points``, when the deployment names them, always.

Every rank of a world must hold the same cut, and two measurements (two workers, or one
worker twice) never quite agree. So rank 0 alone decides, and its cut travels in the world's
rendezvous (worker/agent.py ``_load_and_form``):

1. Rank 0 loads its stage (measuring, unless its worker cut this deployment before), then
   publishes the stage's ``Split`` (msgpack) in the world's rendezvous store, which its worker
   hosts, under ``split/<world>/<epoch>/<token>``, and forms the group.
2. A later rank of a deployment whose ``split_points`` are not configured connects to that
   store first, waits for the key (within the formation's deadline, and ended at once by an
   abort, like the rest of the formation: worker/formation.py), and then loads its stage at
   exactly those points. Its load therefore follows rank 0's instead of running beside it; a
   rank 0 whose stage is already loaded publishes at once.
3. A worker remembers the first cut it measured or received for each deployment
   (``SplitMemo``): the stages it builds later, and the worlds it is rank 0 of, reuse it, so
   the cuts of a deployment's worlds converge on one. Its stage cache holds a stage under its
   cut's points, so a stage cut otherwise is never taken for it.

A handler that is not a plain module cuts itself in ``setup`` (with ``split_points`` or by
parameter count); rank 0 then publishes no cut and the later ranks load as configured.
The measured stage costs travel with the join (``Handler.describe()["split"]``); the
controller shows rank 0's per deployment in ``describe`` and ``status``.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

log = logging.getLogger(__name__)

WARMUP = 1
REPEATS = 20
BUDGET_S = 1.0  # timed passes stop once they took this long (one runs in any case)
PROFILE_MAX_ROWS = 16
TOLERANCE = 0.05  # cuts whose slowest stage is within 5% of the best count as equally good
# Deployments whose cut a worker remembers (the first it measured or received for each).
MEMO_KEPT = 256


@dataclass(frozen=True, slots=True)
class Split:
    """A cut of ``children`` children into ``len(points) + 1`` stages: ``points`` are the
    child indices where stages 1.. begin; ``basis`` says how it was chosen ("measured",
    "parameters" or "config"); ``child_ms`` the measured forward time of each child on a
    batch of ``rows`` rows (empty unless measured)."""

    points: tuple[int, ...]
    children: int
    basis: str
    child_ms: tuple[float, ...] = ()
    rows: int = 0

    def ranges(self) -> list[tuple[int, int]]:
        """Each stage's children as [start, stop)."""
        bounds = [0, *self.points, self.children]
        return list(itertools.pairwise(bounds))

    def stage_ms(self) -> list[float | None]:
        if len(self.child_ms) != self.children:
            return [None for _ in self.ranges()]
        return [sum(self.child_ms[a:b]) for a, b in self.ranges()]

    def describe(self) -> dict[str, Any]:
        """For ``describe`` and status: each stage's first and last child (inclusive) and its
        measured milliseconds (null when not measured)."""
        return {"basis": self.basis, "rows": self.rows,
                "stages": [{"children": [a, b - 1],
                            "ms": None if ms is None else round(ms, 3)}
                           for (a, b), ms in zip(self.ranges(), self.stage_ms(), strict=True)]}


def encode(split: Split | None) -> bytes:
    return msgspec.msgpack.encode(split)


def decode(data: bytes) -> Split | None:
    return msgspec.msgpack.decode(data, type=Split | None)


# -- the choice: a pure function of the costs ----------------------------------------------


def _stage_costs(prefix: Sequence[float], points: Sequence[int]) -> list[float]:
    bounds = [0, *points, len(prefix) - 1]
    return [prefix[b] - prefix[a] for a, b in itertools.pairwise(bounds)]


def _minimax(prefix: Sequence[float], n: int, stages: int) -> float:
    """The least possible cost of the slowest stage, cutting n children into stages."""
    inf = math.inf
    # best[k][i]: the slowest stage's least cost over children [0, i) in k stages.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            best[k][i] = min(max(best[k - 1][j], prefix[i] - prefix[j])
                             for j in range(k - 1, i))
    return best[stages][n]


def balance(costs: Sequence[float], stages: int, *, prefer: Sequence[int] = (),
            tolerance: float = TOLERANCE) -> list[int]:
    """The split points (child indices where stages 1.. begin) that cut ``costs`` into
    ``stages`` non-empty contiguous stages with the slowest stage as fast as possible.

    Of the cuts whose slowest stage is within ``tolerance`` of the best: the one nearest
    ``prefer`` (the sum of the points' distances; empty: no preference), then the most even
    (the least sum of squared stage costs), then the first: the answer is a function of its
    arguments alone."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} children into {stages} stages")
    if any(not math.isfinite(c) or c < 0 for c in costs):
        raise ValueError(f"costs must be finite and non-negative, got {list(costs)}")
    if stages == 1:
        return []
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    bound = _minimax(prefix, n, stages) * (1.0 + tolerance) + 1e-12
    want = list(prefer) if len(prefer) == stages - 1 else []

    def distance(stage: int, start: int) -> float:  # of the point where ``stage`` starts
        return float(abs(start - want[stage - 1])) if want else 0.0

    def ends(stage: int, start: int) -> range:  # where a stage starting at ``start`` may end
        last = n - (stages - stage - 1)
        return range(last, last + 1) if stage == stages - 1 else range(start + 1, last + 1)

    def step(s: int, i: int, j: int) -> tuple[float, float]:
        """Stage s over children [i, j): the distance of the next stage's point, and the
        square of its cost (less is more even)."""
        return (distance(s + 1, j) if s + 1 < stages else 0.0, (prefix[j] - prefix[i]) ** 2)

    # rest[s][i]: the best (distance of the points of stages s+1.., sum of squared stage
    # costs) over cuts of children [i, n) into stages s.., every stage within ``bound``.
    none = (math.inf, math.inf)
    rest = [[none] * (n + 1) for _ in range(stages + 1)]
    rest[stages][n] = (0.0, 0.0)
    for s in range(stages - 1, -1, -1):
        for i in range(s, n - (stages - s) + 1):
            for j in ends(s, i):
                if prefix[j] - prefix[i] <= bound and rest[s + 1][j] != none:
                    d, q = step(s, i, j)
                    rest[s][i] = min(rest[s][i], (rest[s + 1][j][0] + d, rest[s + 1][j][1] + q))
    points: list[int] = []
    start = 0
    for s in range(stages - 1):  # the first best end of each stage in turn
        best = (math.inf, math.inf, n)
        for j in ends(s, start):
            if prefix[j] - prefix[start] <= bound and rest[s + 1][j] != none:
                d, q = step(s, start, j)
                best = min(best, (rest[s + 1][j][0] + d, rest[s + 1][j][1] + q, j))
        start = best[2]
        points.append(start)
    return points


def stage_costs(costs: Sequence[float], points: Sequence[int]) -> list[float]:
    """Each stage's summed cost under ``points``."""
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    return _stage_costs(prefix, points)


# -- measuring ------------------------------------------------------------------------------


def example_batch(spec: dict[str, Any], rows: int) -> Any:
    """A tensor of ``rows`` rows for the one input ``x`` that ``spec`` (a handler's
    ``input_spec``) describes, or None when it describes anything else or no row shape.
    Random floats from a generator of its own (the process's RNG is left alone), zeros for
    integer inputs (valid indices for an embedding)."""
    import torch

    desc = spec.get("x") if set(spec) == {"x"} else None
    if not isinstance(desc, dict):
        return None
    shape, dtype = desc.get("shape"), getattr(torch, str(desc.get("dtype", "")), None)
    if not isinstance(shape, list) or len(shape) < 2 or not isinstance(dtype, torch.dtype) \
            or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return None
    size = [rows, *shape[1:]]
    if dtype.is_floating_point:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(size, generator=generator).to(dtype)
    return torch.zeros(size, dtype=dtype)


def measure_children(module: Any, x: Any, device: str, *, warmup: int = WARMUP,
                     repeats: int = REPEATS, budget_s: float = BUDGET_S,
                     clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """The forward time of each child of ``module`` (an ``nn.Sequential``, in eval mode) in
    milliseconds on ``device``, each child run on the previous one's output: ``warmup``
    untimed passes over the children, then up to ``repeats`` timed ones (at least one,
    and no more once ``budget_s`` is spent), each child's least time.
    Passes interleave the children, and the least time is the one least disturbed, so a burst
    of load from other processes inflates no child's cost. The module is on ``device`` for
    the passes and back where it was after them."""
    import torch

    cuda = device.startswith("cuda")
    home = next((t.device for t in module.parameters()), None)
    best = [math.inf] * len(module)
    spent_s = 0.0
    module.to(device)
    try:
        with torch.inference_mode():
            for done in range(warmup + repeats):
                if done > warmup and spent_s >= budget_s:
                    break
                y = x.to(device)
                for i, child in enumerate(module):
                    if cuda:
                        torch.cuda.synchronize(device)
                    started = clock()
                    y = child(y)
                    if cuda:
                        torch.cuda.synchronize(device)
                    took = clock() - started
                    if done >= warmup:
                        best[i] = min(best[i], took)
                        spent_s += took
    finally:
        if home is not None:
            module.to(home)
    return [b * 1000.0 for b in best]


def profile_rows(max_batch_size: int, micro_batches: int) -> int:
    """Rows of the example batch: what one micro-batch of a full batch holds, at most
    PROFILE_MAX_ROWS (the cost of a child grows about linearly beyond a few rows, and a
    measurement must stay short)."""
    return max(1, min(PROFILE_MAX_ROWS, -(-max_batch_size // max(1, micro_batches))))


def choose(module: Any, stages: int, *, configured: Sequence[int], inputs: dict[str, Any],
           device: str, rows: int, label: str = "") -> Split:
    """The cut of ``module`` (an ``nn.Sequential`` of at least ``stages`` children) into
    ``stages``: the configured points, else by measured cost, else by parameter count."""
    from worker.stages import split_points_for

    n = len(module)
    if configured:
        return Split(tuple(split_points_for(module, stages, list(configured))), n, "config")
    by_weight = split_points_for(module, stages)
    x = example_batch(inputs, rows)
    why = "no example input: its input spec is not one tensor 'x' with a row shape " \
          f"({inputs})"
    if x is not None:
        try:
            module.eval()  # as it will serve: batch norm must not learn from the example
            costs = measure_children(module, x, device)
        except Exception as exc:
            why = f"measuring its children failed: {type(exc).__name__}: {exc}"
        else:
            points = balance(costs, stages, prefer=by_weight)
            split = Split(tuple(points), n, "measured", tuple(costs), rows)
            log.info("%s: split %s by measured cost on %s (%d rows), stages %s ms", label,
                     points, device, rows, [round(ms, 2) for ms in split.stage_ms() if ms])
            return split
    log.warning("%s: split %s by parameter count: %s", label, by_weight, why)
    return Split(tuple(by_weight), n, "parameters")


# -- one cut per deployment on a worker, and the exchange between ranks ----------------------


class SplitMemo:
    """The cut a worker first measured or received for each deployment (the last
    ``MEMO_KEPT`` deployments): the stages it builds later, and the worlds it is rank 0 of,
    use it again. ``None`` remembers a deployment whose handler cuts itself."""

    def __init__(self, kept: int = MEMO_KEPT) -> None:
        self._kept = kept
        self._splits: OrderedDict[str, Split | None] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._splits

    def get(self, key: str) -> Split | None:
        self._splits.move_to_end(key)
        return self._splits[key]

    def remember(self, key: str, split: Split | None) -> None:
        """Keep ``split`` for ``key`` unless one is kept already (the first wins)."""
        if key not in self._splits:
            self._splits[key] = split
            while len(self._splits) > self._kept:
                self._splits.popitem(last=False)


def store_key(world_id: int, epoch: int, token: str) -> str:
    return f"split/{world_id}/{epoch}/{token}"


def publish(store: Any, key: str, split: Split | None) -> None:
    """Rank 0: the world's cut, for its later ranks. A store that fails raises a CommError."""
    from worker.comm import classify

    try:
        store.set(key, encode(split))
    except Exception as exc:
        raise classify(exc) from exc


def receive(store: Any, key: str, wait: Callable[[Callable[[], bool]], None]) -> Split | None:
    """A later rank: rank 0's cut, once published; ``wait(ready)`` polls ``ready`` until it
    holds, or raises (a deadline, an abort: worker/formation.py ``Formation.wait``). A store
    that fails, or a cut that does not decode, raises a CommError."""
    from worker.comm import CommError, classify

    try:
        wait(lambda: bool(store.check([key])))
        data = bytes(store.get(key))
    except Exception as exc:
        raise classify(exc) from exc
    try:
        return decode(data)
    except msgspec.DecodeError as exc:
        raise CommError(f"rank 0's cut of the model does not decode: {exc}") from exc
