"""A real peer process for the communicator and stage-loop tests: rank 1 of a two-rank world.

Two ranks of one gloo world cannot live in one process (building a group holds the GIL while
it waits for its peers), so every pair test runs rank 1 here:

    python -m tests.gloo_peer PORT TIMEOUT_S SCENARIO [ARG]

joins world 1/1 through the TCPStore on PORT, prints ``joined``, then plays SCENARIO:

* ``echo``: send every message received back to rank 0, until a ``{"k": "x"}``;
* ``receive N``: take N messages (printing ``got N`` after each), then stop taking any;
* ``inner DEPLOYMENT_JSON``: serve stage 1 of that deployment with ``InnerStage`` until the
  world closes, then print each answer it sent as a JSON line (``reply {...}``);
* ``geninner DEPLOYMENT_JSON``: the same with a generative deployment's ``GenInner`` (each
  answer also carries the chunk header's ``seq`` and ``tokens``), then ``kv USED_BYTES``.

A comm failure prints ``error KIND`` and exits 3. The test owns the process and ends it by its
PID. MESH_PEER_DEVICE puts the peer on another device (cuda:0), MESH_PEER_BACKEND on nccl;
MESH_PEER_TOKEN gives it the world's token, MESH_PEER_CONNECT_S bounds its wait for rank 0.

``Peer`` is the test's side: it starts the process and holds rank 0's ``Comm``.
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Peer:
    """Rank 1 in a process of its own, and this process's rank 0 of the same world."""

    def __init__(self, *scenario: str, timeout_s: float = 5.0, device: str = "cpu",
                 peer_device: str = "cpu", backend: str = "gloo") -> None:
        import torch.distributed as dist

        from mesh.testing.ports import free_port
        from worker.comm import Comm

        port = free_port()
        store = dist.TCPStore("127.0.0.1", port, 1, True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=30))
        env = {**os.environ, "MESH_PEER_DEVICE": peer_device, "MESH_PEER_BACKEND": backend}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.gloo_peer", str(port), str(timeout_s), *scenario],
            stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.comm = Comm(world_id=1, epoch=1, rank=0, size=2, store=store, device=device,
                             timeout_s=timeout_s, backend=backend, connect_timeout_s=60.0)
            assert self.line() == "joined"
        except BaseException:
            self.kill()
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.strip())

    def line(self, timeout_s: float = 30.0) -> str:
        try:
            return self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"the peer said nothing within {timeout_s}s") from None

    def kill(self) -> None:
        from mesh.testing.processes import alive

        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        assert not alive(self.proc.pid)

    def close(self) -> None:
        self.kill()
        if hasattr(self, "comm"):
            self.comm.close()


def _inner(comm: Any, deployment: dict[str, Any], generative: bool = False) -> None:
    from mesh import codec, dataplane
    from mesh.spec import DeploymentSpec
    from worker.gen_stage import GenInner
    from worker.loader import load_handler
    from worker.stage_loop import InnerStage
    from worker.world import Compute, World

    spec = DeploymentSpec(**deployment)
    handler = load_handler(spec, "cpu", stage=1, stages=2)
    world = World(world_id=1, epoch=1, rank=1, size=2, deployment=spec, handler=handler,
                  comm=comm)
    sent: list[list[Any]] = []
    stage: InnerStage | GenInner
    if generative:
        stage = GenInner(world, send=sent.append, compute=Compute())
        stage.prepare()
    else:
        stage = InnerStage(world, send=sent.append, compute=Compute())
    while stage.serve_one():
        pass
    answers = [a for frames in sent for a in dataplane.replies(dataplane.unpack(frames[0]),
                                                              frames[1:])]
    assert len(answers) >= len(sent)
    for head, frames in answers:
        header = codec.decode([bytes(f) for f in frames], codec.to_numpy)
        outputs = {k: (v.tolist() if hasattr(v, "tolist") else v)
                   for k, v in (header.get("outputs") or {}).items()}
        print("reply " + json.dumps({"rid": head.rid, "status": head.status,
                                     "kind": header.get("kind"), "code": header.get("code"),
                                     "seq": header.get("seq"), "tokens": header.get("tokens"),
                                     "outputs": outputs}), flush=True)
    if isinstance(stage, GenInner):
        print(f"kv {stage.cache.used_bytes}", flush=True)


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    from worker.comm import Comm, CommError

    port, timeout_s, scenario = int(argv[0]), float(argv[1]), argv[2]
    store = dist.TCPStore("127.0.0.1", port, 2, False, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    comm = Comm(world_id=1, epoch=1, rank=1, size=2, store=store,
                device=os.environ.get("MESH_PEER_DEVICE", "cpu"), timeout_s=timeout_s,
                backend=os.environ.get("MESH_PEER_BACKEND", "gloo"),
                connect_timeout_s=float(os.environ.get("MESH_PEER_CONNECT_S", "60")),
                token=os.environ.get("MESH_PEER_TOKEN", ""))
    print("joined", flush=True)
    try:
        if scenario == "echo":
            while True:
                header, tensors = comm.recv(0)
                if header.get("k") == "x":
                    break
                comm.send(0, header, tensors)
        elif scenario == "receive":
            for n in range(int(argv[3])):
                comm.recv(0)
                print(f"got {n + 1}", flush=True)
            while True:
                time.sleep(1.0)
        elif scenario == "inner":
            _inner(comm, json.loads(argv[3]))
        elif scenario == "geninner":
            _inner(comm, json.loads(argv[3]), generative=True)
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
    except CommError as exc:
        print(f"error {exc.kind} {exc}", flush=True)
        return 3
    finally:
        comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
