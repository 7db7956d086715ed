"""A fork server's child becoming a worker: what runs between ``fork`` and ``worker.main``.

The child must be the process that ``python -m worker ARGS`` would be, so it undoes what it
inherited from the server and is not a worker's:

- its session: a session of its own, as the launcher's plain starts (``start_new_session``);
- the server's descriptors (its socket to the launcher, its signal pipe) closed, and the
  signal handlers the server installed put back as they were before it did;
- its command line (``/proc/PID/cmdline``) rewritten to the worker's (worker/proctitle.py);
  ``sys.argv`` too;
- random generators re-seeded: a plain start seeds Python's, numpy's and torch's from the
  OS, while every copy of the server would draw the same numbers;
- the parent-death signal, tied to its parent, the server, which dies with the controller
  (worker/forkserver.py says why a SIGKILL).

What it keeps is what a plain start would have built the same: the modules imported, the
environment (the server checked it is the one asked for), stdin, stdout and stderr (those the
launcher gave the server: the controller's output, no input), the working directory (set
again from the request).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import traceback
from typing import Any, NoReturn

from mesh.fork_protocol import Spawn
from worker import lifeline, proctitle

# What a fork server's child exits with when it cannot become a worker (EX_SOFTWARE).
SETUP_FAILED = 70


def become_worker(request: Spawn, *, server_pid: int, close_fds: list[int],
                  handlers: dict[signal.Signals, Any]) -> NoReturn:
    """Turn this freshly forked child into the worker ``request.argv`` names, run it, and
    end the process with its exit code; never returns."""
    try:
        signal.set_wakeup_fd(-1)
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
        for fd in close_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        os.setsid()
        os.chdir(request.cwd)
        proctitle.set_argv(request.argv)
        sys.argv = [os.path.join(os.path.dirname(__file__), "__main__.py"), *request.argv[3:]]
        sys.orig_argv = list(request.argv)
        reseed()
        # SIGKILL: worker/forkserver.py says why.
        lifeline.follow(server_pid, signal.SIGKILL, "fork server")
        from worker.main import main

        code = main(request.argv[3:], forked=True)
    except SystemExit as exc:  # what a plain start's parse error or parent check exits with
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = SETUP_FAILED
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def reseed() -> None:
    """Fresh seeds from the OS for the generators a plain start seeds so (Python's own is
    re-seeded by CPython's fork hook too; once more costs nothing)."""
    random.seed()
    if "numpy" in sys.modules:
        import numpy

        numpy.random.seed()
    if "torch" in sys.modules:
        import torch

        torch.seed()  # CUDA's generators are seeded lazily, when CUDA starts: not here
