"""``meshctl``: run the controller, a worker or the HTTP gateway, and administer, query and
load a running controller. A tool beside the server: the controller never imports it.

Flags, environment (MESH_ADMIN, MESH_ENDPOINT, MESH_LOG_LEVEL) and the config file are turned
into one validated Config before anything starts; a bad value exits 2 with a message naming it.
"""

from __future__ import annotations

import sys

from mesh.cli.common import DEFAULT_ADMIN, DEFAULT_ENDPOINT, setup_logging
from mesh.errors import ConfigError, MeshError

__all__ = ["DEFAULT_ADMIN", "DEFAULT_ENDPOINT", "main"]


def main(argv: list[str] | None = None) -> int:
    from mesh.cli.parser import parse_args

    args = parse_args(argv)
    if args.command != "worker":
        setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"meshctl: config error: {exc}", file=sys.stderr)
        return 2
    except MeshError as exc:
        print(f"meshctl: {type(exc).__name__} [{exc.code}]: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:  # a port in use, a config file that cannot be read
        print(f"meshctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
