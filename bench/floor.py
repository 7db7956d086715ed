"""The transport floor: the least a ZeroMQ relay path can cost on this machine.

meshserve's data path is client -> controller -> worker -> controller -> client, four ZeroMQ
hops. This program builds the same shape with as little Python as a program can have: a
relay process forwards frames verbatim between a ROUTER for clients and a ROUTER for one
worker, and the worker process runs the ``mlp`` forward pass on the raw bytes it receives, no
header, no codec, no batching, no validation. A blocking client sends one request at a time.

What its p50 adds to the bare forward pass is what the four hops cost here (the I/O threads
of ZeroMQ, the kernel, the wake-ups of idle CPUs), before any of meshserve's own work.
``bench.overhead`` runs it in the same rounds as the served path, so the two can be compared.

``pause_penalty`` measures the other half of the story: how much slower the same piece of
Python (meshserve's own reply encoding) runs right after a pause as long as a forward pass
than back to back. On a host whose caches other tenants share, code that has not run for a
few milliseconds comes back cold, and a request path with more code pays more for that.

    python -m bench.floor relay --front PORT --back PORT
    python -m bench.floor worker --back PORT --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import zmq

from mesh.testing.ports import free_ports
from mesh.testing.processes import end_processes

IN_FEATURES = 64


def relay(front_port: int, back_port: int) -> None:
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    front.bind(f"tcp://127.0.0.1:{front_port}")
    back = ctx.socket(zmq.ROUTER)
    back.bind(f"tcp://127.0.0.1:{back_port}")
    worker, _ = back.recv_multipart()  # the worker says hello first
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            if sock is front:
                back.send_multipart([worker, *front.recv_multipart(copy=False)], copy=False)
            else:
                front.send_multipart(back.recv_multipart(copy=False)[1:], copy=False)


def worker(back_port: int, threads: int, hidden: int = 3072, layers: int = 3,
           device: str = "cpu") -> None:
    import torch

    from worker.models.mlp import build

    torch.set_num_threads(threads)
    model = build(hidden=hidden, layers=layers).to(device)
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{back_port}")
    sock.send(b"hello")
    with torch.inference_mode():
        while True:
            client, body = sock.recv_multipart(copy=False)
            x = torch.frombuffer(bytearray(body.buffer), dtype=torch.float32).view(-1, IN_FEATURES)
            y = model(x.to(device)).cpu()  # on a GPU: in and out, as a served pass does
            sock.send_multipart([client, y.numpy().tobytes()])


def pause_penalty(pause_s: float = 0.004, rounds: int = 300) -> dict[str, float]:
    """Median time of a fixed piece of Python back to back, and after ``pause_s`` of sleep."""
    import torch

    from mesh import codec
    from mesh.messages import result_header

    outputs = {"y": torch.zeros(1, 10)}

    def work() -> float:
        t0 = time.perf_counter()
        for i in range(10):
            codec.encode(result_header(i, outputs))
        return time.perf_counter() - t0

    work()
    hot = [work() for _ in range(rounds)]
    paused = []
    for _ in range(rounds):
        time.sleep(pause_s)
        paused.append(work())
    hot_us = statistics.median(hot) * 1e6
    paused_us = statistics.median(paused) * 1e6
    return {"pause_ms": pause_s * 1000.0, "hot_us": hot_us, "after_pause_us": paused_us,
            "ratio": paused_us / hot_us}


class FloorChain:
    """The relay and worker processes, and a blocking client to time them with."""

    def __init__(self, threads: int, mlp: dict[str, int] | None = None,
                 device: str = "cpu") -> None:
        self.mlp = mlp or {}
        self.device = device
        ports = free_ports("front", "back")  # distinct: both held while picked
        self.front, self.back = ports["front"], ports["back"]
        self.threads = threads
        self.procs: list[subprocess.Popen[bytes]] = []
        self._sock: Any = None

    def start(self, timeout_s: float = 120.0) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads),
               "MKL_NUM_THREADS": str(self.threads)}
        cmd = [sys.executable, "-m", "bench.floor"]
        self.procs.append(subprocess.Popen(
            [*cmd, "relay", "--front", str(self.front), "--back", str(self.back)],
            stdin=subprocess.DEVNULL))
        self.procs.append(subprocess.Popen(
            [*cmd, "worker", "--back", str(self.back), "--threads", str(self.threads),
             "--device", self.device,
             *[a for k, v in self.mlp.items() for a in (f"--{k}", str(v))]],
            stdin=subprocess.DEVNULL, env=env))
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(f"tcp://127.0.0.1:{self.front}")
        self._sock.setsockopt(zmq.RCVTIMEO, 1000)
        deadline = time.monotonic() + timeout_s
        while True:  # the worker has loaded its model once a request comes back
            self._sock.send(bytes(4 * IN_FEATURES))
            try:
                self._sock.recv()
                break
            except zmq.Again:
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    raise RuntimeError("the floor relay or worker did not come up") from None
        self._sock.setsockopt(zmq.RCVTIMEO, 10_000)
        while True:  # late answers to the probes above
            try:
                self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break

    def measure(self, duration_s: float, warmup_s: float = 0.5) -> dict[str, float]:
        """Closed loop at concurrency 1 for ``duration_s``: p50 latency in ms."""
        body = bytes(4 * IN_FEATURES)
        times = []
        started = time.perf_counter()
        end = started + warmup_s + duration_s
        while (t0 := time.perf_counter()) < end:
            self._sock.send(body)
            self._sock.recv()
            if t0 - started >= warmup_s:
                times.append(time.perf_counter() - t0)
        return {"p50_ms": statistics.median(times) * 1000.0, "requests": len(times)}

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        end_processes(self.procs, 10.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="role", required=True)
    r = sub.add_parser("relay")
    r.add_argument("--front", type=int, required=True)
    r.add_argument("--back", type=int, required=True)
    w = sub.add_parser("worker")
    w.add_argument("--back", type=int, required=True)
    w.add_argument("--threads", type=int, default=1)
    w.add_argument("--hidden", type=int, default=3072, help="the mlp's width (default 3072)")
    w.add_argument("--layers", type=int, default=3, help="the mlp's layers (default 3)")
    w.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()
    try:
        if args.role == "relay":
            relay(args.front, args.back)
        else:
            worker(args.back, args.threads, args.hidden, args.layers, args.device)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
