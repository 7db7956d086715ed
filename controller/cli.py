"""``meshctl``: run the controller or a worker, and administer a running controller.

Flags, environment (MESH_ADMIN, MESH_ENDPOINT, MESH_LOG_LEVEL) and the config file are turned
into one validated Config before anything starts; a bad value exits 2 with a message naming it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any

from mesh.errors import ConfigError, MeshError
from mesh.loop import run as run_loop

DEFAULT_ADMIN = "tcp://127.0.0.1:5556"
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    return run_loop(coro)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _load(args: argparse.Namespace, *, demo_if_missing: bool) -> Any:
    from controller.config import demo_config, load_config

    if args.config:
        return load_config(args.config)
    if demo_if_missing:
        return demo_config()
    raise ConfigError("--config FILE is required")


def cmd_up(args: argparse.Namespace) -> int:
    import dataclasses

    from controller.serve import serve

    config = _load(args, demo_if_missing=True)
    # 'up' always brings its own local worker pool.
    config = dataclasses.replace(config, controller=dataclasses.replace(config.controller,
                                                                         launcher="local"))
    return _run(serve(config, with_gateway=True, log_level=args.log_level))


def cmd_controller(args: argparse.Namespace) -> int:
    from controller.serve import serve

    return _run(serve(_load(args, demo_if_missing=False)))


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import run_from_args

    # `meshctl --key F worker` and `meshctl worker --key F` both work.
    args.key = args.key or args.global_key
    args.controller_key = args.controller_key or args.global_controller_key
    return run_from_args(args)


def cmd_gateway(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from controller.config import GatewayConfig, check_gateway, load_gateway_config
    from mesh.errors import ConfigError
    from mesh.gateway.serve import run

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
    return run(cfg, args.controller, key=args.global_key, controller_key=args.global_controller_key,
               reuse_port=args.reuse_port)


def cmd_keys(args: argparse.Namespace) -> int:
    from mesh.security import generate

    public, secret = generate(args.name, args.dir)
    print(f"wrote {public} (public: give it to the controller's key folder) and {secret} "
          "(secret: keep it, mode 600)")
    return 0


def _curve(args: argparse.Namespace) -> Any:
    from mesh.security import client_keys

    return client_keys(args.global_key, args.global_controller_key)


def _admin(args: argparse.Namespace, command: str, call_args: dict[str, Any]) -> Any:
    from controller.admin_client import admin_call
    from mesh.ports import require_listening

    require_listening(args.admin, "--admin or MESH_ADMIN")
    return _run(admin_call(args.admin, command, call_args, timeout_s=args.admin_timeout_s,
                           curve=_curve(args)))


def cmd_status(args: argparse.Namespace) -> int:
    from controller.status import render_status

    status = _admin(args, "status", {})
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    if args.worlds is None and args.min is None and args.max is None:
        raise ConfigError("scale needs --worlds N, or --min N and/or --max M")
    result = _admin(args, "scale", {"deployment": args.model, "worlds": args.worlds,
                                    "min_worlds": args.min, "max_worlds": args.max})
    print(json.dumps(result))
    return 0


def cmd_slo(args: argparse.Namespace) -> int:
    print(json.dumps(_admin(args, "slo", {"deployment": args.model, "p99_ms": args.p99_ms})))
    return 0


def cmd_fault(args: argparse.Namespace) -> int:
    if args.worker == "controller":
        if args.stall_ms is None:
            raise ConfigError("fault controller needs --stall-ms MS")
        call = {"worker": "controller", "stall_ms": args.stall_ms}
    elif args.delay_ms is None:
        raise ConfigError("fault WORKER needs --delay-ms MS")
    else:
        call = {"worker": args.worker, "delay_ms": args.delay_ms}
    print(json.dumps(_admin(args, "fault", call)))
    return 0


def cmd_form(args: argparse.Namespace) -> int:
    print(json.dumps(_admin(args, "form", {"deployment": args.model, "workers": args.workers})))
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    print(json.dumps(_admin(args, "drain", {"target": args.target})))
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    print(json.dumps(_admin(args, "kill", {"worker": args.worker})))
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from controller.inputs import outputs_to_json, parse_assignments
    from mesh.client import Client
    from mesh.ports import require_listening

    inputs = parse_assignments(args.inputs)
    params = {key: value for key, value in (
        ("max_tokens", args.max_tokens), ("temperature", args.temperature),
        ("top_p", args.top_p), ("top_k", args.top_k), ("seed", args.seed),
        ("stop", args.stop or None)) if value is not None} or None
    require_listening(args.endpoint, "--endpoint or MESH_ENDPOINT")

    async def go() -> Any:
        # A controller that stops answering fails the call in about 2 s, not at its timeout.
        async with Client(args.endpoint, key=args.global_key or None,
                          controller_key=args.global_controller_key or None,
                          heartbeat_s=0.5, controller_timeout_s=2.0) as client:
            if not args.stream:
                return await client.infer(args.model, inputs, timeout_s=args.timeout_s,
                                          params=params)
            async for chunk in client.stream(args.model, inputs, timeout_s=args.timeout_s,
                                             params=params):
                if isinstance(chunk.get("text"), str):
                    sys.stdout.write(chunk["text"])
                    if "finish_reason" in chunk:  # a generative stream's last chunk
                        sys.stderr.write(f"\n[{chunk['finish_reason']}: "
                                         f"{chunk.get('prompt_tokens')} prompt tokens, "
                                         f"{chunk.get('completion_tokens')} generated]")
                else:
                    sys.stdout.write(json.dumps(outputs_to_json(chunk)) + "\n")
                sys.stdout.flush()
            return None

    result = _run(go())
    if args.stream:
        sys.stdout.write("\n")
    else:
        print(json.dumps(outputs_to_json(result)))
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from mesh.client import Client
    from mesh.ports import require_listening

    require_listening(args.endpoint, "--endpoint or MESH_ENDPOINT")

    async def go() -> Any:
        async with Client(args.endpoint, key=args.global_key or None,
                          controller_key=args.global_controller_key or None,
                          heartbeat_s=0.5, controller_timeout_s=2.0) as client:
            return await client.describe(args.model)

    result = _run(go())
    print(json.dumps(result, indent=2) if args.json else render_description(result))
    return 0


def render_description(d: dict[str, Any]) -> str:
    lines = [f"protocol version {d.get('protocol_version')}"]
    for m in d.get("models", []):
        state = "ready" if m.get("ready") else "not serving"
        kind = "streams" if m.get("streaming") else "answers once"
        lines.append(f"\n{m['name']} ({state}; {m.get('stages', 1)} stage(s); {kind})")
        if not m.get("described"):
            lines.append("  inputs and outputs: not known until a world has formed")
            continue
        for side in ("inputs", "outputs"):
            for t in m.get(side, []):
                extra = {k: v for k, v in t.items() if k not in ("name", "datatype", "shape")}
                lines.append(f"  {side[:-1]:6} {t['name']}: {t['datatype']} {t['shape']}"
                             + (f"  {json.dumps(extra)}" if extra else ""))
        for name, p in (m.get("parameters") or {}).items():
            lines.append(f"  param  {name}: {json.dumps(p)}")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    from controller.bench import run_bench_cli

    return run_bench_cli(args)


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
    from worker.main import add_arguments as add_worker_arguments

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

    s = sub.add_parser("status", help="deployments, worlds, workers, latency and load")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("scale", help="set a deployment's world count or its bounds")
    s.add_argument("model", help="the deployment")
    s.add_argument("--worlds", type=int, help="the desired number of worlds")
    s.add_argument("--min", type=int, help="the autoscaler's lower bound (min_worlds)")
    s.add_argument("--max", type=int, help="the autoscaler's upper bound (max_worlds)")
    s.set_defaults(func=cmd_scale)

    s = sub.add_parser("slo", help="set a deployment's latency target")
    s.add_argument("model", help="the deployment")
    s.add_argument("--p99-ms", type=float, required=True,
                   help="the p99 latency target in milliseconds")
    s.set_defaults(func=cmd_slo)

    s = sub.add_parser("form", help="form a world on chosen workers, in rank order (a worker "
                       "may already serve other worlds)")
    s.add_argument("model", help="the deployment")
    s.add_argument("workers", nargs="+", metavar="WORKER", help="worker ids, rank 0 first")
    s.set_defaults(func=cmd_form)

    s = sub.add_parser("drain", help="stop routing to a worker or world, finish, release it")
    s.add_argument("target", help="worker id or world id")
    s.set_defaults(func=cmd_drain)

    s = sub.add_parser("kill", help="SIGKILL a worker through its launcher (fault injection)")
    s.add_argument("worker", help="the worker id (meshctl status lists them)")
    s.set_defaults(func=cmd_kill)

    s = sub.add_parser("fault", help="fault injection: slow a worker's computations down, or "
                       "stall the controller's loop ('fault controller --stall-ms MS')")
    s.add_argument("worker", help="a worker id, or 'controller'")
    s.add_argument("--delay-ms", type=float, help="worker: added per batch; 0 clears")
    s.add_argument("--stall-ms", type=float,
                   help="controller: block its event loop this long, once")
    s.set_defaults(func=cmd_fault)

    s = sub.add_parser("infer", help="one request from the shell: KEY=JSON ...")
    s.add_argument("model", help="the deployment")
    s.add_argument("inputs", nargs="*", metavar="KEY[:DTYPE]=JSON|@FILE",
                   help="numeric lists become float32 tensors unless a dtype is given; "
                        "@FILE reads a .npy, .npz or JSON file, @- JSON from stdin")
    s.add_argument("--endpoint", default=os.environ.get("MESH_ENDPOINT", DEFAULT_ENDPOINT),
                   help="the controller's client endpoint (env MESH_ENDPOINT)")
    s.add_argument("--timeout-s", dest="timeout_s", type=float, default=30.0,
                   help="the request's deadline")
    s.add_argument("--stream", action="store_true",
                   help="stream the answer chunk by chunk (text chunks print as they come)")
    s.add_argument("--max-tokens", type=int, help="tokens to generate (generative models)")
    s.add_argument("--temperature", type=float,
                   help="sampling temperature (generative models; 0: greedy, the default)")
    s.add_argument("--top-p", dest="top_p", type=float, help="nucleus sampling: keep the "
                   "likeliest tokens up to this probability, in (0, 1]")
    s.add_argument("--top-k", dest="top_k", type=int, help="sample from the k likeliest")
    s.add_argument("--seed", type=int, help="seed of the sampler: the same text every time")
    s.add_argument("--stop", action="append", metavar="TEXT",
                   help="end the text before this (repeatable)")
    s.set_defaults(func=cmd_infer)

    s = sub.add_parser("describe", help="what each deployment takes and gives: inputs, "
                       "outputs, parameters, streaming (protocol section 3.8)")
    s.add_argument("model", nargs="?", help="one deployment (default: all)")
    s.add_argument("--endpoint", default=os.environ.get("MESH_ENDPOINT", DEFAULT_ENDPOINT),
                   help="the controller's client endpoint (env MESH_ENDPOINT)")
    s.add_argument("--json", action="store_true", help="print the answer as JSON")
    s.set_defaults(func=cmd_describe)

    s = sub.add_parser("bench", help="closed-loop load with latency percentiles")
    s.add_argument("model", help="the deployment")
    s.add_argument("--concurrency", type=int, default=16, help="closed-loop callers")
    s.add_argument("--duration-s", type=float, default=10.0, help="how long to measure")
    s.add_argument("--warmup-s", type=float, default=1.0,
                   help="load before the measurement starts (not counted)")
    s.add_argument("--input", action="append", default=[], metavar="KEY[:DTYPE]=JSON",
                   help="request inputs (default: zeros shaped as the deployment's inputs)")
    s.add_argument("--endpoint", default=os.environ.get("MESH_ENDPOINT", DEFAULT_ENDPOINT),
                   help="the controller's client endpoint (env MESH_ENDPOINT)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("--request-timeout-s", type=float, default=30.0,
                   help="each request's deadline")
    s.add_argument("--profile", choices=["step", "ramp", "spike", "diurnal"],
                   help="open-loop Poisson load following a profile instead of a closed loop")
    s.add_argument("--base-rps", type=float, default=20.0, help="profile: the 1x rate")
    s.add_argument("--peak-x", type=float, default=4.0, help="profile: peak as a multiple")
    s.add_argument("--plot", help="profile: draw latency vs SLO and live worlds to this PNG")
    s.set_defaults(func=cmd_bench)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command != "worker":
        _setup_logging(args.log_level)
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


if __name__ == "__main__":
    sys.exit(main())
