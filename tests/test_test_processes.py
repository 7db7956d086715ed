"""What the tests start dies with pytest: a run killed before its teardown (CI's time limit, a
hung test's SIGKILL) leaves no controller behind holding ports and cores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.cluster import alive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stand-in for pytest: starts a long-lived child the way tests/cluster.py does, says its
# PID, then waits to be killed.
STAND_IN = """
import subprocess, sys, time
from tests.cluster import dies_with_pytest
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                         preexec_fn=dies_with_pytest if sys.argv[1] == "yes" else None)
print(child.pid, flush=True)
time.sleep(120)
"""


def orphan_after_parent_killed(follow: bool) -> tuple[int, bool]:
    parent = subprocess.Popen([sys.executable, "-c", STAND_IN, "yes" if follow else "no"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        # Ends at once when the signal works; 1 s is plenty to see that it did not come.
        deadline = time.monotonic() + (5.0 if follow else 1.0)
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        return child, alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if child and alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_process_started_with_dies_with_pytest_ends_when_pytest_is_killed() -> None:
    _, still_alive = orphan_after_parent_killed(follow=True)
    assert not still_alive


def test_without_it_the_same_process_outlives_its_parent() -> None:
    # The check above can fail: without the death signal the orphan lives on.
    _, still_alive = orphan_after_parent_killed(follow=False)
    assert still_alive
