"""A process's command line, as ``/proc/PID/cmdline`` shows it, rewritten in place.

A forked worker is the fork server's copy, command line included; operators and tests find
workers by theirs (``pgrep -f "--worker-id w3"``, ``--controller ENDPOINT``), so each child
writes its own worker command line over the one it inherited. The kernel reads
``/proc/PID/cmdline`` from the memory the process's arguments were laid in at ``exec``
(``arg_start`` to ``arg_end`` in ``/proc/self/stat``); Python keeps copies of its arguments,
so that memory can be overwritten. A new command line cannot be longer than the first one
(the room the fork server reserves with a padding argument); the bytes left over are NULs,
which the kernel returns too (``pgrep`` and ``ps`` read them as spaces).

This is what the ``setproctitle`` package does in C, without its extra trick of moving the
environment to make room (the padding makes room here), so no dependency is needed for it.
"""

from __future__ import annotations

import ctypes

# Fields 48 and 49 of /proc/PID/stat, counted from 1; after the ")" that ends the command
# name, the first field is the third.
_ARG_START = 48 - 3
_ARG_END = 49 - 3


def room() -> int:
    """Bytes the command line may take, the NUL that must end it included."""
    start, end = _arg_area()
    return end - start


def set_argv(argv: list[str]) -> None:
    """Make ``/proc/self/cmdline`` read as ``argv`` (NUL-separated, as ``exec`` lays it).

    Raises ValueError when it does not fit: a truncated command line would hide what tools
    look for at its end, so the caller decides (the fork server refuses such a worker)."""
    start, end = _arg_area()
    title = b"\0".join(arg.encode() for arg in argv) + b"\0"
    if len(title) > end - start:
        raise ValueError(f"a command line of {len(title)} bytes does not fit in "
                         f"{end - start}")
    # The last byte stays NUL: the kernel then returns the area as it is, not as one string
    # running on into the environment (its rule for programs that overwrote that byte).
    ctypes.memmove(start, title.ljust(end - start, b"\0"), end - start)


def _arg_area() -> tuple[int, int]:
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    start, end = int(fields[_ARG_START]), int(fields[_ARG_END])
    if not 0 < start < end:
        raise OSError("this kernel does not show where the arguments are")
    return start, end
