"""The HTTP gateway with clients nobody here wrote: the official ``openai`` package and
``tritonclient[http]`` (sync and asyncio), unmodified, against a live gateway that ``meshctl up``
started beside its controller; a client that disconnects mid-stream; malformed HTTP by the
thousand; bearer tokens, TLS and several processes on one port."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mesh.client import Client
from mesh.testing.cluster import Cluster
from mesh.testing.ports import free_port
from mesh.testing.waits import http_ready, until, until_blocking
from tests.cluster import reap, start_cluster

openai = pytest.importorskip("openai")
tritonclient_http = pytest.importorskip("tritonclient.http")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DEPLOYMENTS = """
[[deployments]]
name = "tinygpt"
model = "worker.models.tinygpt:build"
stages = 2

[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
factory_kwargs = {{ hidden = 256 }}

[gateway]
listen = "127.0.0.1:{port}"
header_timeout_s = 1.0
body_timeout_s = 1.0
max_body_bytes = 1048576
{extra}
"""


def wait_ready(port: int, *, tls: bool = False) -> None:
    """Until the gateway on ``port`` answers its readiness path (from sync code)."""
    asyncio.run(until(lambda: http_ready(port, tls=tls), 30.0,
                      f"the gateway on port {port} ready", interval_s=0.2))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, int]]:
    port = free_port()
    tmp = tmp_path_factory.mktemp("gateway")
    cluster = asyncio.run(start_cluster(tmp, DEPLOYMENTS.format(port=port, extra="")))
    try:
        wait_ready(port)
        yield cluster, port
    finally:
        leaked = reap(cluster)
        assert not leaked, f"processes outlived the controller: {leaked}"


async def zeromq_text(cluster: Cluster, prompt: str, n: int, **params: Any) -> str:
    async with Client(cluster.client) as client:
        return "".join([c["text"] async for c in client.stream(
            "tinygpt", {"prompt": prompt}, max_tokens=n, params=params, timeout_s=60)])


def test_the_openai_package_lists_completes_and_chats_as_the_zeromq_client_streams(
        gateway: tuple[Cluster, int]) -> None:
    cluster, port = gateway
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                           max_retries=0)
    assert [m.id for m in client.models.list()] == ["tinygpt"]
    want = asyncio.run(zeromq_text(cluster, "hello world", 24))
    whole = client.completions.create(model="tinygpt", prompt="hello world", max_tokens=24,
                                      temperature=0)
    assert whole.choices[0].text == want and whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == 11 and whole.usage.completion_tokens == 24
    streamed = client.completions.create(model="tinygpt", prompt="hello world", max_tokens=24,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    events = list(streamed)
    assert "".join(e.choices[0].text for e in events if e.choices) == want
    assert events[-1].usage.completion_tokens == 24
    messages = [{"role": "user", "content": "hi there"}]
    chat_want = asyncio.run(zeromq_text(cluster, "user: hi there\nassistant:", 16))
    chat = client.chat.completions.create(model="tinygpt", messages=messages, max_tokens=16,
                                          temperature=0)
    assert chat.choices[0].message.content == chat_want
    chunks = client.chat.completions.create(model="tinygpt", messages=messages, max_tokens=16,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat_want
    seeded = [client.completions.create(model="tinygpt", prompt="roll", max_tokens=16,
                                        temperature=0.9, seed=7).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tinygpt", prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.completions.create(model="tinygpt", prompt="x", n=2)


async def test_sixteen_concurrent_openai_streams_are_each_exact(
        gateway: tuple[Cluster, int]) -> None:
    cluster, port = gateway
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                                max_retries=0)
    prompts = [f"stream number {i}" for i in range(16)]

    async def one(prompt: str) -> str:
        stream = await client.completions.create(model="tinygpt", prompt=prompt, max_tokens=32,
                                                 temperature=0, stream=True)
        return "".join([e.choices[0].text async for e in stream if e.choices])

    got = await asyncio.gather(*(one(p) for p in prompts))
    want = [await zeromq_text(cluster, p, 32) for p in prompts]
    assert got == want
    await client.close()


def test_tritonclient_sees_a_kserve_v2_server_and_infers_with_json_and_binary_tensors(
        gateway: tuple[Cluster, int]) -> None:
    cluster, port = gateway
    triton = tritonclient_http.InferenceServerClient(f"127.0.0.1:{port}")
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("mlp")
    meta = triton.get_model_metadata("mlp")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)

    async def zeromq() -> Any:
        async with Client(cluster.client) as client:
            return (await client.infer("mlp", {"x": x}))["y"]

    want = asyncio.run(zeromq())
    for binary in (False, True):
        tensor = tritonclient_http.InferInput("x", [3, 64], "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        out = tritonclient_http.InferRequestedOutput("y", binary_data=binary)
        answer = triton.infer("mlp", [tensor], outputs=[out])
        np.testing.assert_array_equal(answer.as_numpy("y"), want)
    from tritonclient.utils import InferenceServerException

    wrong = tritonclient_http.InferInput("x", [3, 63], "FP32")
    wrong.set_data_from_numpy(x[:, :63])
    with pytest.raises(InferenceServerException) as bad:
        triton.infer("mlp", [wrong])
    assert bad.value.status() == "400" and "shape" in bad.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        triton.infer("nope", [tensor])
    assert unknown.value.status() == "404"
    text = tritonclient_http.InferInput("prompt", [1], "BYTES")
    text.set_data_from_numpy(np.array(["hello"], dtype=object))
    answer = triton.infer("tinygpt", [text])
    assert answer.as_numpy("text")[0].decode() == asyncio.run(
        zeromq_text(cluster, "hello", 16))


async def test_a_thousand_async_tritonclient_requests_at_32_concurrent_are_all_exact(
        gateway: tuple[Cluster, int]) -> None:
    import tritonclient.http.aio as triton_aio

    cluster, port = gateway
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(1000)]
    async with Client(cluster.client) as zmq_client:
        want = await asyncio.gather(*(zmq_client.infer("mlp", {"x": x}) for x in xs))
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{port}", conn_limit=32)
    gate = asyncio.Semaphore(32)

    async def one(x: np.ndarray) -> Any:
        async with gate:
            tensor = triton_aio.InferInput("x", [1, 64], "FP32")
            tensor.set_data_from_numpy(x)
            return (await client.infer("mlp", [tensor])).as_numpy("y")

    try:
        got = await asyncio.gather(*(one(x) for x in xs))
    finally:
        await client.close()
    # Each answer is its own request's: equal to the ZeroMQ client's to float32 rounding (the
    # batches these requests met differ, and a batch's size changes the last bits of a GEMM),
    # and far from any other request's.
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w["y"], rtol=1e-4, atol=1e-6)
    assert len({np.round(g, 3).tobytes() for g in got}) > 990


async def test_a_client_that_disconnects_mid_stream_frees_its_sequence_within_a_second(
        gateway: tuple[Cluster, int]) -> None:
    cluster, port = gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"model": "tinygpt", "prompt": "a long one", "max_tokens": 256,
                       "temperature": 0, "stream": True}).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 + f"content-length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    seen = b""
    while seen.count(b"data: ") < 5:  # a few tokens in
        seen += await asyncio.wait_for(reader.read(4096), 10)

    def running(s: dict[str, Any]) -> int:
        dep = next(d for d in s["deployments"] if d["name"] == "tinygpt")
        return int(dep["generation"]["running"])

    await cluster.wait_for(lambda s: running(s) == 1, timeout_s=5, what="the stream decoding")
    writer.close()
    closed_s = time.monotonic()
    await cluster.wait_for(lambda s: running(s) == 0, timeout_s=5, what="its sequence gone")
    assert time.monotonic() - closed_s < 1.0 + 0.3  # 0.3 s: heartbeats and status polling


def _send_raw(port: int, data: bytes, *, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        if not read:
            return b""
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            out += chunk
        return out


# Each malformed request, and what may answer it: a 4xx, or, for a body cut short (the client
# shuts its side), the connection closed.
MALFORMED: list[tuple[bytes, set[bytes]]] = [
    (b"POST /v1/completions HTTP/1.1\r\ncontent-length: 9\r\n\r\n{not json", {b"400"}),
    (b"POST /v1/completions HTTP/1.1\r\ncontent-length: 14\r\n\r\n{\"model\": 123}", {b"400"}),
    (b"POST /v2/models/mlp/infer HTTP/1.1\r\ncontent-length: 25\r\n\r\n"
     b"{\"inputs\": [{\"name\": 1}]}", {b"400"}),
    (b"POST /v2/models/mlp/infer HTTP/1.1\r\ncontent-length: 100\r\n\r\n{\"inputs\":",
     {b"400", b"408", b"closed"}),
    (b"GET /v2/health/live HTTP/1.1\r\nx-big: " + b"a" * 40_000 + b"\r\n\r\n", {b"431"}),
    (b"POST /v1/completions HTTP/1.1\r\ncontent-length: 99999999999\r\n\r\n", {b"413"}),
    (b"NOT HTTP AT ALL\r\n\r\n", {b"400"}),
    (b"GET /nowhere HTTP/1.1\r\n\r\n", {b"404"}),
    (b"DELETE /v1/models HTTP/1.1\r\n\r\n", {b"405"}),
    (b"POST /v2/models/mlp/infer HTTP/1.1\r\ncontent-length: 60\r\n\r\n"
     b"{\"inputs\": [{\"name\": \"x\", \"shape\": [1], \"datatype\": \"FP9\"}]}", {b"400"}),
]


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _gateway_pid(port: int) -> int:
    out = subprocess.run(["pgrep", "-f", f"mesh.cli.* gateway .*{port}"],
                         capture_output=True, text=True).stdout.split()
    assert out, "no gateway process found"
    return int(out[0])


async def test_ten_thousand_malformed_requests_are_each_refused_and_good_clients_carry_on(
        gateway: tuple[Cluster, int]) -> None:
    _, port = gateway
    pid = _gateway_pid(port)
    x = np.ones((1, 64), dtype=np.float32)
    stop = asyncio.Event()
    good: list[Any] = []

    async def good_client() -> None:
        import tritonclient.http.aio as triton_aio

        client = triton_aio.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            while not stop.is_set():
                tensor = triton_aio.InferInput("x", [1, 64], "FP32")
                tensor.set_data_from_numpy(x)
                good.append((await client.infer("mlp", [tensor])).as_numpy("y").shape)
        finally:
            await client.close()

    # Slow senders: heads and bodies that never complete are cut off at their timeouts.
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    for i, s in enumerate(slow):
        s.sendall(b"POST /v1/completions HTTP/1.1\r\ncontent-length: 100\r\n\r\n{" if i % 2
                  else b"GET /v2/health/live HTTP/1.1\r\nx-slow: ")
    rss_before = _rss_kb(pid)
    runner = asyncio.create_task(good_client())
    answers: dict[tuple[int, bytes], int] = {}

    def flood(n: int) -> None:
        for i in range(n):
            kind = i % len(MALFORMED)
            reply = _send_raw(port, MALFORMED[kind][0])
            status = reply.split(b" ", 2)[1] if reply.startswith(b"HTTP/1.1 ") else b"closed"
            answers[kind, status] = answers.get((kind, status), 0) + 1

    await asyncio.gather(*(asyncio.to_thread(flood, 2500) for _ in range(4)))
    stop.set()
    await runner
    assert sum(answers.values()) == 10_000
    wrong = {(MALFORMED[k][0][:60], status): n for (k, status), n in answers.items()
             if status not in MALFORMED[k][1]}
    assert not wrong, wrong
    for s in slow:  # each was answered 408 and closed by the gateway
        s.settimeout(5)
        data = s.recv(4096)
        assert data.startswith(b"HTTP/1.1 408"), data[:80]
        s.close()
    assert len(good) > 50 and all(shape == (1, 10) for shape in good)
    assert _rss_kb(pid) - rss_before < 50_000, "the gateway's memory grew by over 50 MB"
    metrics = _send_raw(port, b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert b'meshserve_gateway_requests_total{code="200",route="v2_infer"}' in metrics


def test_bearer_tokens_tls_and_two_processes_on_one_port(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)
    (tmp_path / "tokens").write_text("# one per line\nsecret-token\n")
    port = free_port()
    extra = (f'api_keys_file = "{tmp_path / "tokens"}"\ntls_cert = "{tmp_path / "cert.pem"}"\n'
             f'tls_key = "{tmp_path / "key.pem"}"\nprocesses = 2\n')
    cluster = asyncio.run(start_cluster(tmp_path, DEPLOYMENTS.format(port=port, extra=extra)))
    try:
        wait_ready(port, tls=True)  # health needs no token
        anonymous = openai.OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key="wrong",
                                  max_retries=0,
                                  http_client=openai.DefaultHttpxClient(verify=False))
        with pytest.raises(openai.AuthenticationError):
            anonymous.models.list()
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key="secret-token",
                               max_retries=0, http_client=openai.DefaultHttpxClient(verify=False))
        assert [m.id for m in client.models.list()] == ["tinygpt"]
        pids = cluster.gateway_pids()
        assert len(pids) == 2  # the first process and its sibling on the same port

        def listening() -> str:
            return subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True,
                                  text=True).stdout

        # The port answered once the first process listened; its sibling may still be
        # starting (importing its HTTP stack on a busy host): both listen within seconds.
        until_blocking(lambda: all(f"pid={pid}," in listening() for pid in pids), 30.0,
                       "both gateway processes listening", detail=listening)
        assert client.completions.create(model="tinygpt", prompt="hi", max_tokens=4,
                                         temperature=0).choices[0].text
        client.close()
        anonymous.close()
    finally:
        leaked = reap(cluster)
        assert not leaked, f"processes outlived the controller: {leaked}"
    assert cluster.gateway_pids() == []
