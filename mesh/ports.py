"""Who is on a port: the reachability check the CLI makes before it waits on a controller,
and the process that holds a port we could not bind (so the error names it)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from mesh.errors import Unavailable


def listening(endpoint: str, timeout_s: float = 1.0) -> bool:
    """Whether something accepts connections at a ``tcp://HOST:PORT`` or ``ipc://PATH``
    endpoint (other transports: assumed yes)."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout_s)
            s.connect(path)
            return True
        return False
    if not endpoint.startswith("tcp://"):
        return True
    url = urlsplit(endpoint)
    host = url.hostname or "127.0.0.1"
    if host in ("*", "0.0.0.0"):
        host = "127.0.0.1"
    try:
        with socket.create_connection((host, url.port or 0), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def require_listening(endpoint: str, flag: str) -> None:
    """Fail in about a second, with what to do, when no controller listens at ``endpoint``
    (instead of waiting out a request's timeout)."""
    if not listening(endpoint):
        raise Unavailable(f"no controller is listening at {endpoint} (is it running? "
                          f"'meshctl up' starts one; {flag} points elsewhere)")


def holder(port: int) -> str:
    """'pid N (command line)' of the process listening on TCP ``port`` here, or "" when it
    cannot be told (not Linux, another user's process, a container boundary)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # LISTEN
                    inodes.add(f"socket:[{inode}]")
    if not inodes:
        return ""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                        return f"pid {pid} ({cmd.decode(errors='replace').strip()[:80]})"
    return ""
