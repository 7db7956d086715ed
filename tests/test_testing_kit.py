"""The test and benchmark kit (mesh/testing): its clock, ports, config writer, waits and
ledger, checked without starting a process (a scripted controller on a real ROUTER socket
stands in for the real one)."""

from __future__ import annotations

import asyncio
import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from controller.config import load_config
from mesh import codec
from mesh.errors import DeadlineExceeded, Overloaded
from mesh.messages import PROTOCOL_VERSION, error_header, result_header
from mesh.testing.clock import FakeClock
from mesh.testing.configs import deployment, write_config
from mesh.testing.ledger import Ledger, LedgerClient
from mesh.testing.ports import free_port, free_ports
from mesh.testing.waits import (
    TimedOut,
    http_ready,
    status_excerpt,
    until,
    until_blocking,
    wait_status,
)

pytestmark = pytest.mark.timeout(30)

MLP = deployment("mlp", "worker.models.mlp:build", factory_kwargs={"hidden": 64}, worlds=2)

# -- clock and ports ---------------------------------------------------------------------------


def test_a_fake_clock_reads_what_advance_made_it_and_never_goes_back() -> None:
    clock = FakeClock(5.0)
    assert clock() == clock.now_s == 5.0
    assert clock.advance(0.25) == 5.25 and clock() == 5.25
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1.0)
    assert clock() == 5.25


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports("client", "admin", "worker")
    assert len(set(ports.values())) == 3
    for port in [*ports.values(), free_port()]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


# -- configs -----------------------------------------------------------------------------------


def test_a_written_config_is_quiet_unless_asked_and_the_controller_loads_it(
        tmp_path: Path) -> None:
    ports = free_ports("client", "admin", "worker")
    path = write_config(tmp_path / "a.toml", ports, MLP)
    raw = tomllib.loads(path.read_text())
    assert raw["controller"] == {
        "client_endpoint": f"tcp://127.0.0.1:{ports['client']}",
        "admin_endpoint": f"tcp://127.0.0.1:{ports['admin']}",
        "worker_endpoint": f"tcp://127.0.0.1:{ports['worker']}",
        "metrics_port": 0, "warm_workers": 0, "autoscale": False}
    assert raw["gateway"] == {"listen": ""}
    cfg = load_config(path)
    assert cfg.controller.warm_workers == 0 and cfg.controller.autoscale is False
    ((name, kwargs, worlds),) = [(d.name, d.factory_kwargs, d.worlds) for d in cfg.deployments]
    assert (name, kwargs, worlds) == ("mlp", {"hidden": 64}, 2)


def test_what_a_caller_names_replaces_the_quiet_default_once(tmp_path: Path) -> None:
    ports = {"client": "ipc:///tmp/c", "admin": 7001, "worker": "tcp://10.0.0.1:5557"}
    text = write_config(tmp_path / "b.toml", ports, MLP + '\n[gateway]\nlisten = "127.0.0.1:1"\n',
                        "warm_workers = 2\nautoscale = true", worker_threads=1,
                        launcher="none").read_text()
    raw = tomllib.loads(text)  # a key twice would not parse
    ctl = raw["controller"]
    assert ctl["client_endpoint"] == "ipc:///tmp/c"
    assert ctl["admin_endpoint"] == "tcp://127.0.0.1:7001"
    assert ctl["worker_endpoint"] == "tcp://10.0.0.1:5557"
    assert (ctl["warm_workers"], ctl["autoscale"], ctl["metrics_port"]) == (2, True, 0)
    assert (ctl["worker_threads"], ctl["launcher"]) == (1, "none")
    assert raw["gateway"] == {"listen": "127.0.0.1:1"}  # the caller's own table only


def test_a_key_given_both_ways_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="warm_workers"):
        write_config(tmp_path / "c.toml", free_ports("client", "admin", "worker"), MLP,
                     "warm_workers = 2", warm_workers=1)


# -- waits -------------------------------------------------------------------------------------


async def test_until_returns_once_a_plain_or_async_predicate_holds() -> None:
    looks = [0]

    def third_look() -> bool:
        looks[0] += 1
        return looks[0] >= 3

    await until(third_look, 5.0, "the third look", interval_s=0.001)
    assert looks[0] == 3

    async def soon() -> bool:
        await asyncio.sleep(0)
        return True

    await until(soon, 5.0, "an async yes")


async def test_until_fails_after_its_deadline_naming_what_and_the_detail() -> None:
    with pytest.raises(TimedOut, match=r"after 0.05 s waiting for the moon\nstill dark"):
        await until(lambda: False, 0.05, "the moon", interval_s=0.01,
                    detail=lambda: "still dark")
    with pytest.raises(AssertionError, match="waiting for never"):  # a failed check in a test
        until_blocking(lambda: False, 0.05, "never", interval_s=0.01)


async def test_wait_status_rides_over_unreadable_statuses_and_returns_the_one_that_holds(
        ) -> None:
    answers: list[Any] = [OSError("not up"), {"deployments": []},
                          {"deployments": [{"name": "m", "worlds_current": 1}]}]

    async def fetch() -> dict[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)

    # The predicate raises on the status without the deployment: not yet, not a failure.
    status = await wait_status(fetch, lambda s: s["deployments"][0]["worlds_current"] >= 1,
                               5.0, "m serving", interval_s=0.001)
    assert status["deployments"][0]["name"] == "m" and answers == []


async def test_wait_status_fails_with_the_last_status_and_at_once_when_the_controller_exited(
        ) -> None:
    status = {"deployments": [{"name": "m", "worlds_current": 0, "worlds_desired": 1,
                               "queued": 3, "in_flight": 0}],
              "worlds": [{"id": 4, "deployment": "m", "state": "forming"}],
              "workers": [{"id": "w1", "state": "loading"}], "events": []}

    async def fetch() -> dict[str, Any]:
        return status

    with pytest.raises(TimedOut) as failed:
        await wait_status(fetch, lambda s: False, 0.05, "m serving", interval_s=0.01,
                          detail=lambda: "log tail: nothing")
    text = str(failed.value)
    assert "waiting for m serving" in text and "log tail: nothing" in text
    assert "deployment m: worlds 0/1, queued 3" in text and "4 m forming" in text
    assert "w1 loading" in text
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimedOut, match="exited with code 3"):
        await wait_status(fetch, lambda s: False, 30.0, "m serving", exit_code=lambda: 3)
    assert loop.time() - started < 1.0  # not the 30 s: nothing will change any more


def test_a_status_excerpt_stays_short() -> None:
    assert status_excerpt({}) == "none read"
    many = {"workers": [{"id": f"w{i}", "state": "idle"} for i in range(1000)]}
    assert len(status_excerpt(many)) < 2100


async def test_http_ready_is_true_only_for_a_200() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        code = b"200 OK" if b"/ready" in line else b"503 Service Unavailable"
        writer.write(b"HTTP/1.1 " + code + b"\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        assert await http_ready(port, "/ready")
        assert not await http_ready(port, "/not-yet")
    assert not await http_ready(port, "/ready")  # nothing listens any more


# -- the ledger --------------------------------------------------------------------------------


def test_a_ledger_counts_lost_duplicated_late_and_failed_answers() -> None:
    ledger = Ledger()
    for rid in (1, 2, 3, 4):
        ledger.on_sent(rid)
    ledger.on_final(1, "ok", awaited=True)
    ledger.on_final(2, "ok", awaited=True)
    ledger.on_final(2, "ok", awaited=False)  # again, when nobody waited for it
    ledger.on_chunk(3)
    ledger.on_final(3, "overloaded", awaited=True)
    assert (ledger.sent, ledger.answered, ledger.lost) == (4, 3, 1)  # 4 never answered
    assert (ledger.duplicates, ledger.answered_twice) == (1, 1)
    assert ledger.failed == {"overloaded": 1} and ledger.chunks == {3: 1}
    assert ledger.summary() == {"sent": 4, "answered": 3, "lost": 1, "duplicates": 1,
                                "late": 1, "codes": {"ok": 3, "overloaded": 1}}


class ScriptedController:
    """Answers each infer as its model name says: ``ok``, ``twice``, ``refuse``, ``late``
    (after ``late_s``) or ``never``; pings are answered with a pong."""

    def __init__(self, port: int, late_s: float) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(f"tcp://127.0.0.1:{port}")
        self.late_s = late_s
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            peer, head, *_ = await self.sock.recv_multipart()
            header: dict[str, Any] = codec.unpack_header(head)
            rid, model = header["id"], header.get("model")
            if header["kind"] == "ping":
                await self.send(peer, {"v": PROTOCOL_VERSION, "kind": "pong", "id": rid,
                                       "incarnation": "one"})
            elif model in ("ok", "twice"):
                for _ in range(2 if model == "twice" else 1):
                    await self.send(peer, result_header(rid, {"y": 1}))
            elif model == "refuse":
                await self.send(peer, error_header(rid, "overloaded", "full", True))
            elif model == "late":
                await asyncio.sleep(self.late_s)
                await self.send(peer, result_header(rid, {"y": 1}))

    async def send(self, peer: bytes, header: dict[str, Any]) -> None:
        await self.sock.send_multipart([peer, codec.pack(header)])

    async def close(self) -> None:
        self.task.cancel()
        self.sock.close()
        self.ctx.term()


async def test_a_ledger_client_books_every_request_and_answer_as_seen_on_its_socket() -> None:
    port = free_port()
    fake = ScriptedController(port, late_s=0.5)
    try:
        async with LedgerClient(f"tcp://127.0.0.1:{port}", grace_s=0.05) as client:
            assert await client.infer("ok", {}, timeout_s=5) == {"y": 1}
            assert await client.infer("twice", {}, timeout_s=5) == {"y": 1}
            with pytest.raises(Overloaded):
                await client.infer("refuse", {}, timeout_s=5)
            with pytest.raises(DeadlineExceeded):
                await client.infer("late", {}, timeout_s=0.1)
            with pytest.raises(DeadlineExceeded):
                await client.infer("never", {}, timeout_s=0.1)
            ledger = client.ledger
            await until(lambda: ledger.answered == 4 and ledger.duplicates == 1, 5.0,
                        "the second answer and the late one")
    finally:
        await fake.close()
    assert ledger.sent == 5 and ledger.lost == 1  # "never": sent, never answered
    # Late: the second answer of "twice" and the answer after the client's deadline.
    assert ledger.answered_twice == 1 and sum(ledger.late.values()) == len(ledger.late) == 2
    assert ledger.codes == {"ok": 4, "overloaded": 1}  # pings and pongs are not requests
