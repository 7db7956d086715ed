"""How many of this host's cores are busy, from /proc/stat (every process: workers, clients,
the controller itself).

The local launcher's workers share this host. Before the autoscaler adds a world of a
deployment whose worlds burn CPU, it asks whether the host has the cores for it: on a 2-core
host a second busy torch process only makes both slower. Linux only; elsewhere the figure is
unknown and the autoscaler relies on measuring what a new world adds.
"""

from __future__ import annotations

from pathlib import Path

_STAT = Path("/proc/stat")


def read_jiffies(path: Path = _STAT) -> tuple[int, int] | None:
    """(busy, total) clock ticks of all cores since boot, or None if unreadable."""
    try:
        with path.open() as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


class HostCpu:
    def __init__(self, cores: int, *, smoothing: float = 0.5, path: Path = _STAT) -> None:
        self.cores = cores
        self._smoothing = smoothing
        self._path = path
        self._last: tuple[int, int] | None = None
        self.busy_cores: float | None = None  # smoothed; None until two samples

    def sample(self) -> float | None:
        """Busy cores since the previous sample, smoothed (None: unknown)."""
        now = read_jiffies(self._path)
        last, self._last = self._last, now
        if now is None or last is None or now[1] <= last[1]:
            return self.busy_cores
        busy = self.cores * (now[0] - last[0]) / (now[1] - last[1])
        self.busy_cores = busy if self.busy_cores is None else (
            (1.0 - self._smoothing) * self.busy_cores + self._smoothing * busy)
        return self.busy_cores
