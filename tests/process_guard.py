"""The integration marker, enforced: a test that is not marked ``integration`` may not start a
process. Unit tests (``python -m pytest -m "not integration"``) then run alone, fast, and
leave nothing behind; a process started by an unmarked test fails that test, even when the
test swallows the error.

Every way a test starts a process here ends in one of the functions ``refuse_processes``
replaces: ``subprocess.Popen`` (and so ``subprocess.run``, ``asyncio.create_subprocess_exec``
and ``os.popen``), ``multiprocessing`` (and so ``torch.multiprocessing``), ``os.fork``,
``os.posix_spawn`` and ``os.system``. A refused call raises ``ProcessWithoutMarker`` instead
of starting anything.
"""

from __future__ import annotations

import contextlib
import multiprocessing.process
import os
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

MARKER = "integration"


class ProcessWithoutMarker(AssertionError):
    """A test not marked ``integration`` tried to start a process."""


@contextlib.contextmanager
def refuse_processes(who: str) -> Iterator[list[str]]:
    """While inside, every process start raises ``ProcessWithoutMarker``; yields the list of
    what was refused (kept even when the caller swallows the error)."""
    refused: list[str] = []

    def refuse(what: str) -> Callable[..., Any]:
        def refused_call(*args: Any, **kwargs: Any) -> Any:
            refused.append(what)
            raise ProcessWithoutMarker(
                f"{who} started a process ({what}) but is not marked {MARKER}: add "
                f"@pytest.mark.{MARKER} (or pytestmark = pytest.mark.{MARKER} for the file)")
        return refused_call

    targets: list[tuple[Any, str, str]] = [
        (subprocess.Popen, "_execute_child", "subprocess.Popen"),
        (multiprocessing.process.BaseProcess, "start", "multiprocessing"),
        (os, "fork", "os.fork"),
        (os, "posix_spawn", "os.posix_spawn"),
        (os, "posix_spawnp", "os.posix_spawnp"),
        (os, "system", "os.system"),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
    try:
        for owner, name, what in targets:
            setattr(owner, name, refuse(what))
        yield refused
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


_REFUSED = pytest.StashKey[list[str]]()
_TOLD = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    # Setup, call and teardown, module-scoped fixtures set up for this item included.
    if item.get_closest_marker(MARKER) is not None:
        return (yield)
    with refuse_processes(item.nodeid) as refused:
        item.stash[_REFUSED] = refused
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> pytest.TestReport:
    report: pytest.TestReport = yield
    refused = item.stash.get(_REFUSED, [])
    if not refused or item.stash.get(_TOLD, False):
        return report
    if report.failed:
        item.stash[_TOLD] = True  # the refusal's own error, most likely
    elif report.when in ("call", "teardown"):
        # The test caught the error and passed anyway: it still tried to start a process.
        item.stash[_TOLD] = True
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} tried to start a process ({', '.join(refused)}) "
                           f"and is not marked {MARKER}")
    return report
