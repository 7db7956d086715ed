"""Statistics shared by the controller and the tools that measure it (pure functions)."""

from __future__ import annotations

import math


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in [0, 100])."""
    if not sorted_values:
        return 0.0
    # q * n first: q / 100 is inexact in binary (0.07 * 100 > 7) and would skip a rank.
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values) / 100.0) - 1))
    return sorted_values[k]
