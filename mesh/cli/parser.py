"""meshctl's argument parser: the global options (accepted after the command too) and each
group's verbs, which their own modules add (server.py, admin.py, client.py, bench.py)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from mesh.cli import admin, apply, bench, client, server
from mesh.cli.common import DEFAULT_ADMIN


class _Help(argparse.HelpFormatter):
    """Every option's default in --help; options without one (None, off) say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or not action.option_strings or default is None \
                or default is False or default == "" or default == [] \
                or default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def _global_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--admin", default=default(os.environ.get("MESH_ADMIN", DEFAULT_ADMIN)),
                   help="the controller's admin endpoint (env MESH_ADMIN)")
    p.add_argument("--admin-timeout-s", type=float, default=default(10.0),
                   help="how long an admin command waits for the controller's answer")
    p.add_argument("--log-level", default=default(os.environ.get("MESH_LOG_LEVEL", "INFO")),
                   help="DEBUG, INFO, WARNING or ERROR (env MESH_LOG_LEVEL)")
    p.add_argument("--key", dest="global_key", metavar="FILE",
                   default=default(os.environ.get("MESH_KEY", "")),
                   help="CURVE: this caller's key pair (NAME.key_secret), for a controller with "
                        "[security] curve = true (env MESH_KEY)")
    p.add_argument("--controller-key", dest="global_controller_key", metavar="FILE",
                   default=default(os.environ.get("MESH_CONTROLLER_KEY", "")),
                   help="CURVE: the controller's public key (NAME.key) "
                        "(env MESH_CONTROLLER_KEY)")


def _subparser(common: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    class Sub(argparse.ArgumentParser):
        def __init__(self, **kwargs: Any) -> None:
            kwargs.setdefault("formatter_class", _Help)
            words = kwargs.get("prog", "").split()
            # Not for 'worker' (it has its own --key), nor for 'keys' (no controller).
            if not {"worker", "keys"} & set(words[1:]):
                kwargs["parents"] = [*kwargs.get("parents", []), common]
            super().__init__(**kwargs)
    return Sub


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshctl", description="meshserve: serve PyTorch models "
                                "over ZeroMQ in elastic, fault-tolerant worlds",
                                formatter_class=_Help)
    _global_options(p, defaults=True)
    # The same options after the command too ('meshctl status --admin ...'): they only set
    # what is given there, the defaults stay the top level's.
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=_subparser(common))
    for group in (server, admin, apply, client, bench):
        group.add_commands(sub)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags anywhere: the global ones after the command too, and infer's inputs after its
    flags ('meshctl infer mlp --stream x=...')."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "infer" and all("=" in a and not a.startswith("-")
                                                  for a in extra):
        args.inputs += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args
