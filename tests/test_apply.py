"""Models change while traffic flows (``meshctl apply``, SIGHUP, ``state_dir``), tried as an
operator would: real controllers, workers and clients.

The weights are told apart by their answers: the ``mlp`` demo with another seed gives another
``y`` for the same ``x``.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mesh.client import Client
from mesh.errors import MeshError, UnknownModel
from mesh.testing.cluster import Cluster
from tests.cluster import start_controller
from tests.conftest import StartCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

X = {"x": np.linspace(-1.0, 1.0, 64, dtype=np.float32).reshape(1, 64)}


def mlp(name: str = "mlp", seed: int = 0, **extra: str) -> str:
    fields = "".join(f"\n{k} = {v}" for k, v in extra.items())
    return (f'[[deployments]]\nname = "{name}"\nmodel = "worker.models.mlp:build"\n'
            f"factory_kwargs = {{ hidden = 64, seed = {seed} }}{fields}\n")


async def meshctl(cluster: Cluster, *args: str, timeout_s: float = 120.0) -> tuple[int, str]:
    """meshctl, without holding up this test's event loop (its callers keep calling)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh.cli", "--admin", cluster.admin, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode()


async def answer(client: Client, model: str) -> np.ndarray:
    out = await client.infer(model, X, timeout_s=10)
    return np.asarray(out["y"])


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, rtol=1e-5, atol=1e-6))


async def test_apply_rolls_new_weights_in_under_load_and_a_bad_checkpoint_rolls_back(
        cluster_factory: StartCluster, tmp_path: Path) -> None:
    cluster = await cluster_factory(mlp(seed=0), controller="max_local_workers = 6")
    answers: list[tuple[float, np.ndarray]] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def caller(client: Client) -> None:
        while not stop.is_set():
            try:
                answers.append((time.monotonic(), await answer(client, "mlp")))
            except MeshError as exc:
                failures.append(exc)

    async with Client(cluster.client) as client:
        old = await answer(client, "mlp")
        callers = [asyncio.create_task(caller(client)) for _ in range(8)]
        await asyncio.sleep(1.0)
        new_file = tmp_path / "new.toml"
        new_file.write_text(mlp(seed=1))
        code, out = await meshctl(cluster, "apply", str(new_file))
        returned = time.monotonic()
        assert code == 0, out
        await asyncio.sleep(1.0)
        new = await answer(client, "mlp")
        # A checkpoint that does not load: the rollout stops, the seed-1 weights keep serving.
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"not a checkpoint")
        bad_file = tmp_path / "bad.toml"
        bad_file.write_text(mlp(seed=1, checkpoint=f'"{bad}"'))
        bad_code, bad_out = await meshctl(cluster, "apply", str(bad_file))
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*callers)
        after_bad = await answer(client, "mlp")
    assert not same(old, new)
    assert failures == []
    assert len(answers) > 100
    assert all(same(y, old) or same(y, new) for _, y in answers)
    late = [y for t, y in answers if t > returned]
    assert late and all(same(y, new) for y in late), "an old answer after apply returned"
    assert bad_code != 0 and "failed to load" in bad_out, bad_out
    assert same(after_bad, new)
    status = await cluster.status()
    [dep] = status["deployments"]
    assert dep["revision"] == 2 and dep["rollout"]["state"] == "failed"
    assert {w["revision"] for w in status["worlds"]} == {2}


async def test_a_route_splits_by_weight_and_an_applied_away_deployment_answers_unknown_model(
        cluster_factory: StartCluster, tmp_path: Path) -> None:
    cluster = await cluster_factory(mlp(seed=0), controller="max_local_workers = 6")
    both = tmp_path / "both.toml"
    both.write_text(mlp(seed=0) + mlp("mlp2", seed=1)
                    + '[[routes]]\nname = "scorer"\nto = { mlp = 80, mlp2 = 20 }\n')
    code, out = await meshctl(cluster, "apply", str(both))
    assert code == 0, out
    async with Client(cluster.client) as client:
        one, two = await answer(client, "mlp"), await answer(client, "mlp2")
        described = await client.describe("scorer")
        ys: list[np.ndarray] = []

        async def caller() -> None:
            for _ in range(100):
                ys.append(await answer(client, "scorer"))

        await asyncio.gather(*(caller() for _ in range(10)))
        share = sum(1 for y in ys if same(y, two)) / len(ys)
        assert len(ys) == 1000 and all(same(y, one) or same(y, two) for y in ys)
        assert abs(share - 0.2) <= 0.05, share
        assert described["models"][0]["route"] == {"to": {"mlp": 80, "mlp2": 20}}
        status = await cluster.status()
        assert status["routes"][0]["sent"] == {"mlp": 800, "mlp2": 200}
        only = tmp_path / "only.toml"
        only.write_text(mlp(seed=0))
        code, out = await meshctl(cluster, "apply", str(only))
        assert code == 0, out
        for model in ("mlp2", "scorer"):
            with pytest.raises(UnknownModel):
                await answer(client, model)
    status = await cluster.status()
    assert [d["name"] for d in status["deployments"]] == ["mlp"]
    assert {w["deployment"] for w in status["worlds"]} == {"mlp"} and status["routes"] == []


async def test_a_restart_on_the_original_file_resumes_what_was_applied_and_sighup_applies(
        cluster_factory: StartCluster, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    cluster = await cluster_factory(mlp(seed=0), controller=f'state_dir = "{state_dir}"')
    original = cluster.config_path.read_text()
    new_file = tmp_path / "new.toml"
    new_file.write_text(mlp(seed=1))
    async with Client(cluster.client) as client:
        old = await answer(client, "mlp")
    code, out = await meshctl(cluster, "apply", str(new_file))
    assert code == 0, out
    assert cluster.meshctl("scale", "mlp", "--max", "3").returncode == 0
    assert cluster.stop() == 0
    # Started again on its original file (seed 0): it serves what was applied (seed 1).
    cluster.proc = start_controller(cluster.config_path, cluster.log_path)
    status = await cluster.wait_for(lambda s: s["deployments"][0]["worlds_current"] >= 1,
                                    what="the restarted controller serving")
    assert status["deployments"][0]["revision"] == 2
    assert status["deployments"][0]["max_worlds"] == 3  # the operator's change, kept
    async with Client(cluster.client) as client:
        resumed = await answer(client, "mlp")
        assert not same(resumed, old)
        # SIGHUP: the edited file is applied as meshctl apply would.
        cluster.config_path.write_text(original.replace("seed = 0", "seed = 2"))
        cluster.proc.send_signal(signal.SIGHUP)
        await cluster.wait_for(lambda s: (s["deployments"][0]["rollout"] or {}).get("state")
                               == "done" and s["deployments"][0]["revision"] == 3,
                               what="the SIGHUP rollout done")
        assert not same(await answer(client, "mlp"), resumed)
