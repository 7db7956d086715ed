"""meshctl's first hour: flags anywhere, every option described, and no waiting on a
controller that is not there."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import pytest
import zmq

from controller.cli import DEFAULT_ADMIN, build_parser, parse_args
from mesh.transport import bind_socket
from tests.cluster import free_port

pytestmark = pytest.mark.timeout(60)


def test_global_flags_work_before_and_after_the_command() -> None:
    assert parse_args(["status", "--admin", "tcp://h:1"]).admin == "tcp://h:1"
    assert parse_args(["--admin", "tcp://h:2", "status"]).admin == "tcp://h:2"
    assert parse_args(["status"]).admin == os.environ.get("MESH_ADMIN", DEFAULT_ADMIN)
    assert parse_args(["scale", "mlp", "--worlds", "2", "--admin-timeout-s", "3"]
                      ).admin_timeout_s == 3.0


def test_infer_takes_its_inputs_before_or_after_its_flags() -> None:
    args = parse_args(["infer", "mlp", "--stream", "x=[[1]]", "--max-tokens", "4", "y=2"])
    assert args.inputs == ["x=[[1]]", "y=2"] and args.stream and args.max_tokens == 4
    with pytest.raises(SystemExit):
        parse_args(["status", "--bogus"])


def test_every_option_of_every_command_is_described() -> None:
    def undescribed(parser: argparse.ArgumentParser, name: str) -> list[str]:
        out = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    out += undescribed(child, f"{name} {sub}")
            elif not action.help and action.dest != "help":
                out.append(f"{name}: {action.dest}")
        return out

    assert undescribed(build_parser(), "meshctl") == []
    text = build_parser()._subparsers._group_actions[0].choices["bench"].format_help()
    assert "(default: 16)" in text  # defaults are shown


@pytest.mark.parametrize("argv", [["status"], ["infer", "mlp", "x=[[1]]"],
                                  ["scale", "mlp", "--worlds", "1"]])
def test_no_controller_fails_in_about_a_second_with_a_hint(argv: list[str]) -> None:
    port = free_port()
    env = {**os.environ, "MESH_ADMIN": f"tcp://127.0.0.1:{port}",
           "MESH_ENDPOINT": f"tcp://127.0.0.1:{port}"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "controller.cli", *argv], env=env,
                            capture_output=True, text=True, timeout=30)
    assert time.monotonic() - started < 5.0  # a process start plus a refused connect
    assert result.returncode == 1
    assert f"no controller is listening at tcp://127.0.0.1:{port}" in result.stderr
    assert "meshctl up" in result.stderr and "Traceback" not in result.stderr


def test_a_port_in_use_names_the_process_that_holds_it() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    context = zmq.Context()
    try:
        with pytest.raises(OSError) as err:
            bind_socket(context.socket(zmq.ROUTER), f"tcp://127.0.0.1:{port}")
        assert str(err.value).startswith(f"cannot bind tcp://127.0.0.1:{port}: the port is "
                                         f"in use by pid {os.getpid()} (")
    finally:
        holder.close()
        context.term()
