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

from mesh.cli import DEFAULT_ADMIN
from mesh.cli.parser import build_parser, parse_args
from mesh.testing.ports import free_port
from mesh.transport import bind_socket

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


@pytest.mark.integration
@pytest.mark.parametrize("argv", [["status"], ["infer", "mlp", "x=[[1]]"],
                                  ["scale", "mlp", "--worlds", "1"]])
def test_no_controller_fails_in_about_a_second_with_a_hint(argv: list[str]) -> None:
    port = free_port()
    env = {**os.environ, "MESH_ADMIN": f"tcp://127.0.0.1:{port}",
           "MESH_ENDPOINT": f"tcp://127.0.0.1:{port}"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "mesh.cli", *argv], env=env,
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


@pytest.mark.integration
def test_bench_plot_is_checked_before_anything_runs() -> None:
    env = {**os.environ, "MESH_ADMIN": f"tcp://127.0.0.1:{free_port()}"}
    result = subprocess.run([sys.executable, "-m", "mesh.cli", "bench", "mlp", "--plot",
                             "x.png"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--plot draws an open-loop run" in result.stderr
    # Without matplotlib (hidden from the import system), the error says how to get it.
    hide = ("import sys, importlib.abc\n"
            "class No(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] == 'matplotlib': raise ImportError(name)\n"
            "sys.meta_path.insert(0, No())\n"
            "from mesh.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", hide, "bench", "mlp", "--profile", "step",
                             "--plot", "x.png"], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2, result.stderr
    assert "pip install 'meshserve[plot]'" in result.stderr and "Traceback" not in result.stderr


async def test_bench_callers_back_off_from_a_controller_that_refuses_everything() -> None:
    """A controller shutting down answers every request 'cancelled' at once: the callers must
    back off (they used to resend in a tight loop)."""
    import asyncio

    import zmq.asyncio

    from mesh import codec
    from mesh.client import Client
    from mesh.loadgen import closed_loop
    from mesh.messages import error_header

    port = free_port()
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    seen = {"infer": 0}

    async def refuse() -> None:
        while True:
            frames = await sock.recv_multipart()
            header = codec.unpack_header(frames[1])
            if header["kind"] == "infer":
                seen["infer"] += 1
            await sock.send_multipart([frames[0], codec.pack(error_header(
                header["id"], "cancelled", "controller is stopping", True))])

    task = asyncio.create_task(refuse())
    try:
        async with Client(f"tcp://127.0.0.1:{port}") as client:
            result = await closed_loop(client, "m", {}, concurrency=4, duration_s=1.5,
                                       warmup_s=0.0)
        assert result.errors.get("cancelled", 0) > 0
        # 4 callers backing off from 50 ms (doubling, with jitter): tens of requests, where
        # a tight loop sent thousands.
        assert seen["infer"] < 200, seen
    finally:
        task.cancel()
        sock.close()
        ctx.term()


async def test_a_bench_whose_callers_cannot_send_fails_instead_of_reporting_nothing() -> None:
    """A client used without connecting raises in every caller; the run used to report 0
    requests and no errors for its whole duration."""
    from mesh.client import Client
    from mesh.loadgen import closed_loop

    client = Client(f"tcp://127.0.0.1:{free_port()}")  # never connected
    with pytest.raises(RuntimeError, match="not connected"):
        await closed_loop(client, "m", {}, concurrency=2, duration_s=5.0, warmup_s=0.0)


def test_a_zero_default_is_shown_and_a_flag_default_is_not() -> None:
    sub = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    worker = sub["worker"].format_help()
    assert "(default: 0)" in " ".join(worker.split())  # --threads, --parent-pid
    assert "(default: False)" not in worker
