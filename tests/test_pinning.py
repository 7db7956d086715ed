"""bench/pinning.py: cores of their own for a benchmark's processes, on a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench.pinning import available_cores, describe, pin, plan

pytestmark = pytest.mark.timeout(30)


def test_roles_get_disjoint_cores_in_order() -> None:
    placement = plan(list(range(16)), [("client", 1), ("controller", 2), ("worker", 3)])
    assert placement == {"client": [0], "controller": [1, 2], "worker": [3, 4, 5]}
    assert describe(placement, ["client", "controller", "worker"], list(range(16))) == (
        "pinned: client on core 0, controller on cores 1-2, worker on cores 3-5")


def test_too_few_cores_pin_nothing_and_say_what_shares() -> None:
    needs = [("client", 1), ("controller", 2)]
    assert plan([0, 1], needs) is None
    assert describe(None, ["client", "controller"], [0, 1]) == (
        "not pinned: client, controller share 2 cores (pinning needs more cores than this "
        "host has)")
    assert plan([4, 7, 9], needs) == {"client": [4], "controller": [7, 9]}  # any core ids


@pytest.mark.parametrize("needs", [[("a", 0)], [("a", 1), ("a", 1)]])
def test_a_role_needs_a_name_of_its_own_and_a_core(needs: list[tuple[str, int]]) -> None:
    with pytest.raises(ValueError):
        plan(list(range(8)), needs)


@pytest.mark.integration
def test_every_thread_of_a_running_process_is_pinned() -> None:
    core = available_cores()[-1]
    proc = subprocess.Popen([sys.executable, "-c", (
        "import threading, time\n"
        "for _ in range(3): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        assert pin(proc.pid, [core]) == 4  # the main thread and its three
        tids = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
        assert len(tids) == 4
        assert all(os.sched_getaffinity(tid) == {core} for tid in tids)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.integration
def test_a_process_that_is_gone_pins_nothing() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.DEVNULL)
    proc.wait()
    time.sleep(0.05)
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
    assert pin(proc.pid, available_cores()[:1]) == 0
