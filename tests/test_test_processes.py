"""What the tests start: it dies with pytest (a run killed before its teardown, by CI's time
limit or a hung test's SIGKILL, leaves no controller behind holding ports and cores), and only
a test marked ``integration`` may start it (tests/process_guard.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mesh.testing.processes import alive
from tests.process_guard import ProcessWithoutMarker, refuse_processes

pytest_plugins = ["pytester"]

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


@pytest.mark.integration
def test_a_process_started_with_dies_with_pytest_ends_when_pytest_is_killed() -> None:
    _, still_alive = orphan_after_parent_killed(follow=True)
    assert not still_alive


@pytest.mark.integration
def test_without_it_the_same_process_outlives_its_parent() -> None:
    # The check above can fail: without the death signal the orphan lives on.
    _, still_alive = orphan_after_parent_killed(follow=False)
    assert still_alive


# -- the integration marker, enforced --------------------------------------------------------

# An inner pytest run, each test starting a process its own way; only the marked one may.
INNER_TESTS = """
import asyncio
import multiprocessing
import os
import subprocess
import sys

import pytest


def test_unmarked_popen():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_unmarked_that_swallows_the_error():
    try:
        subprocess.Popen([sys.executable, "-c", "pass"]).wait()
    except Exception:
        pass


async def test_unmarked_asyncio_subprocess():
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await proc.wait()


def test_unmarked_multiprocessing():
    p = multiprocessing.get_context("spawn").Process(target=print)
    p.start()
    p.join()


def test_unmarked_fork():
    if os.fork() == 0:
        os._exit(0)


def test_unmarked_without_a_process():
    assert sum([1, 2]) == 3


@pytest.mark.integration
def test_marked_popen():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
"""

INNER_SETUP = {
    "conftest.py": "pytest_plugins = ['tests.process_guard']\n",
    "pytest.ini": "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
                  "markers =\n    integration: starts processes\n",
}


def inner_run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    for name, text in INNER_SETUP.items():
        (pytester.path / name).write_text(text)
    pytester.makepyfile(test_inner=INNER_TESTS)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", *args)


def test_an_unmarked_test_that_starts_a_process_fails_even_if_it_swallows_the_error(
        pytester: pytest.Pytester) -> None:
    # No process starts here: every unmarked start is refused (and the marked test is left out).
    result = inner_run(pytester, "-m", "not integration")
    result.assert_outcomes(passed=1, failed=5, deselected=1)
    failed = {r.nodeid.split("::")[1]: r.longreprtext
              for r in result.reprec.getreports("pytest_runtest_logreport") if r.failed}
    assert all("not marked integration" in why for why in failed.values()), failed
    assert set(failed) == {"test_unmarked_popen", "test_unmarked_that_swallows_the_error",
                      "test_unmarked_asyncio_subprocess", "test_unmarked_multiprocessing",
                      "test_unmarked_fork"}
    result.stdout.fnmatch_lines(["*test_unmarked_that_swallows_the_error tried to start a "
                                 "process (subprocess.Popen) and is not marked integration*"])


@pytest.mark.integration
def test_a_marked_test_starts_its_process(pytester: pytest.Pytester) -> None:
    result = inner_run(pytester, "-m", "integration")
    result.assert_outcomes(passed=1, deselected=6)


def test_the_guard_puts_back_what_it_replaced() -> None:
    before = (subprocess.Popen._execute_child, os.fork, os.system)
    with refuse_processes("this test") as refused:
        with pytest.raises(ProcessWithoutMarker, match="this test started a process"):
            os.system("true")
        assert refused == ["os.system"]
    assert (subprocess.Popen._execute_child, os.fork, os.system) == before
