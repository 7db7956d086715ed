"""meshctl's client commands: ``infer`` (one request, or a stream) and ``describe``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mesh.cli.common import add_endpoint, client, run


def _params(args: argparse.Namespace) -> dict[str, Any] | None:
    return {key: value for key, value in (
        ("max_tokens", args.max_tokens), ("temperature", args.temperature),
        ("top_p", args.top_p), ("top_k", args.top_k), ("seed", args.seed),
        ("stop", args.stop or None)) if value is not None} or None


def _print_chunk(chunk: dict[str, Any]) -> None:
    from mesh.cli.inputs import outputs_to_json

    if isinstance(chunk.get("text"), str):
        sys.stdout.write(chunk["text"])
        if "finish_reason" in chunk:  # a generative stream's last chunk
            sys.stderr.write(f"\n[{chunk['finish_reason']}: {chunk.get('prompt_tokens')} "
                             f"prompt tokens, {chunk.get('completion_tokens')} generated]")
    else:
        sys.stdout.write(json.dumps(outputs_to_json(chunk)) + "\n")
    sys.stdout.flush()


def cmd_infer(args: argparse.Namespace) -> int:
    from mesh.cli.inputs import outputs_to_json, parse_assignments
    from mesh.ports import require_listening

    inputs = parse_assignments(args.inputs)
    params = _params(args)
    require_listening(args.endpoint, "--endpoint or MESH_ENDPOINT")

    async def go() -> Any:
        async with client(args) as c:
            if not args.stream:
                return await c.infer(args.model, inputs, timeout_s=args.timeout_s,
                                     params=params)
            async for chunk in c.stream(args.model, inputs, timeout_s=args.timeout_s,
                                        params=params):
                _print_chunk(chunk)
            return None

    result = run(go())
    if args.stream:
        sys.stdout.write("\n")
    else:
        print(json.dumps(outputs_to_json(result)))
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from mesh.ports import require_listening

    require_listening(args.endpoint, "--endpoint or MESH_ENDPOINT")

    async def go() -> Any:
        async with client(args) as c:
            return await c.describe(args.model)

    result = run(go())
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
        split = m.get("split") or {}
        for i, stage in enumerate(split.get("stages") or []):
            first, last = stage.get("children", ["?", "?"])
            cost = f", {stage['ms']} ms" if stage.get("ms") is not None else ""
            lines.append(f"  stage  {i}: children {first}-{last}{cost} ({split.get('basis')}"
                         + (f", {split.get('rows')} rows)" if split.get("rows") else ")"))
    return "\n".join(lines)


def add_commands(sub: Any) -> None:
    s = sub.add_parser("infer", help="one request from the shell: KEY=JSON ...")
    s.add_argument("model", help="the deployment")
    s.add_argument("inputs", nargs="*", metavar="KEY[:DTYPE]=JSON|@FILE",
                   help="numeric lists become float32 tensors unless a dtype is given; "
                        "@FILE reads a .npy, .npz or JSON file, @- JSON from stdin")
    add_endpoint(s)
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
    add_endpoint(s)
    s.add_argument("--json", action="store_true", help="print the answer as JSON")
    s.set_defaults(func=cmd_describe)
