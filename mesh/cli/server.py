"""meshctl's server commands: ``up``, ``controller``, ``worker``, ``gateway``, ``keys``. Each
imports its part of the product only when it runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from mesh.cli.common import DEFAULT_ENDPOINT, run
from mesh.errors import ConfigError


def _load(args: argparse.Namespace, *, demo_if_missing: bool) -> Any:
    from controller.config import demo_config, load_config

    if args.config:
        return load_config(args.config)
    if demo_if_missing:
        return demo_config()
    raise ConfigError("--config FILE is required")


def cmd_up(args: argparse.Namespace) -> int:
    from controller.serve import serve

    config = _load(args, demo_if_missing=True)
    # 'up' always brings its own local worker pool.
    config = dataclasses.replace(config, controller=dataclasses.replace(config.controller,
                                                                         launcher="local"))
    return run(serve(config, with_gateway=True, log_level=args.log_level,
                     config_path=args.config or ""))


def cmd_controller(args: argparse.Namespace) -> int:
    from controller.serve import serve

    return run(serve(_load(args, demo_if_missing=False), config_path=args.config))


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import run_from_args

    # `meshctl --key F worker` and `meshctl worker --key F` both work.
    args.key = args.key or args.global_key
    args.controller_key = args.controller_key or args.global_controller_key
    return run_from_args(args)


def cmd_gateway(args: argparse.Namespace) -> int:
    from controller.config import GatewayConfig, check_gateway, load_gateway_config
    from mesh.gateway.serve import run as run_gateway

    cfg = load_gateway_config(args.config) if args.config else GatewayConfig()
    if args.settings:  # meshctl up's own gateway: its [gateway] table, checked there already
        cfg = GatewayConfig(**json.loads(args.settings))
    flags = {"listen": args.listen, "processes": args.processes,
             "api_keys_file": args.api_keys_file, "tls_cert": args.tls_cert,
             "tls_key": args.tls_key, "request_timeout_s": args.request_timeout_s}
    cfg = check_gateway(dataclasses.replace(
        cfg, **{k: v for k, v in flags.items() if v is not None}), Path.cwd())
    if not cfg.listen:
        raise ConfigError("the gateway needs --listen HOST:PORT (or [gateway] listen)")
    return run_gateway(cfg, args.controller, key=args.global_key,
                       controller_key=args.global_controller_key, reuse_port=args.reuse_port)


def cmd_keys(args: argparse.Namespace) -> int:
    from mesh.security import generate

    public, secret = generate(args.name, args.dir)
    print(f"wrote {public} (public: give it to the controller's key folder) and {secret} "
          "(secret: keep it, mode 600)")
    return 0


def add_commands(sub: Any) -> None:
    from worker.main import add_arguments as add_worker_arguments

    s = sub.add_parser("up", help="controller plus a local worker pool (demo models by default)")
    s.add_argument("--config", help="TOML config file (default: the built-in demo deployments)")
    s.set_defaults(func=cmd_up)

    s = sub.add_parser("controller", help="the controller alone; workers come from its launcher")
    s.add_argument("--config", required=True, help="TOML config file")
    s.set_defaults(func=cmd_controller)

    s = sub.add_parser("gateway", help="an HTTP gateway: OpenAI-compatible /v1 and KServe v2 "
                       "/v2, a client of the controller")
    s.add_argument("--controller", default=os.environ.get("MESH_ENDPOINT", DEFAULT_ENDPOINT),
                   help="the controller's client endpoint (env MESH_ENDPOINT)")
    s.add_argument("--listen", help="HOST:PORT to serve HTTP on (default 127.0.0.1:8000)")
    s.add_argument("--config", help="a TOML file whose [gateway] table to use")
    s.add_argument("--processes", type=int, help="processes sharing the port (SO_REUSEPORT)")
    s.add_argument("--api-keys-file", dest="api_keys_file",
                   help="bearer tokens, one a line: every route but health and /metrics needs one")
    s.add_argument("--tls-cert", dest="tls_cert", help="TLS certificate (PEM)")
    s.add_argument("--tls-key", dest="tls_key", help="TLS private key (PEM)")
    s.add_argument("--request-timeout-s", dest="request_timeout_s", type=float,
                   help="deadline of a request that names none (default 60)")
    s.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--settings", help=argparse.SUPPRESS)  # meshctl up's [gateway], as JSON
    s.set_defaults(func=cmd_gateway)

    s = sub.add_parser("worker", help="one worker that joins a controller")
    add_worker_arguments(s)
    s.set_defaults(func=cmd_worker)

    s = sub.add_parser("keys", help="CURVE keys: 'keys generate NAME [--dir DIR]'")
    keys = s.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = keys.add_parser("generate", help="write NAME.key (public) and NAME.key_secret")
    k.add_argument("name", help="the key's name: NAME.key and NAME.key_secret")
    k.add_argument("--dir", default=".", help="folder to write to (default: here)")
    k.set_defaults(func=cmd_keys)
