"""launcher = "kubernetes" against a fake API server over real HTTP (tests/fake_kube.py), with
the real client library (lightkube): pods created, watched, deleted; their ends reported as
worker exits; and a controller that serves through workers launched this way."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controller.config import KubernetesConfig
from controller.kube_launcher import (
    API_VERBS,
    LABEL_CONTROLLER,
    KubernetesLauncher,
    pod_name,
    worker_pod,
)
from mesh.testing.waits import until
from tests.fake_kube import FakeKube

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def kube(tmp_path: Path) -> AsyncIterator[FakeKube]:
    fake = FakeKube(tmp_path)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


def test_a_worker_pod_carries_its_id_owner_resources_and_placement() -> None:
    k = KubernetesConfig(image="meshserve:cuda", device="cuda", threads=4,
                         resources={"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}},
                         node_selector={"gpu": "h200"},
                         tolerations=({"key": "gpu", "operator": "Exists"},),
                         env={"HF_HOME": "/cache"})
    pod = worker_pod(k, "W_7", instance="meshserve-ctl-0", owner=("meshserve-ctl-0", "u-1"))
    assert pod["metadata"]["name"] == "meshserve-worker-w-7" == pod_name("W_7")
    assert pod["metadata"]["labels"][LABEL_CONTROLLER] == "meshserve-ctl-0"
    assert pod["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "meshserve-ctl-0", "uid": "u-1",
         "controller": True}]
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never" and spec["nodeSelector"] == {"gpu": "h200"}
    assert spec["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    container = spec["containers"][0]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}}
    args = container["args"]
    assert args[:5] == ["worker", "--controller", "tcp://meshserve-controller:5557",
                        "--worker-id", "W_7"]
    assert args[args.index("--advertise-host") + 1] == "$(POD_IP)"
    assert args[args.index("--device") + 1] == "cuda"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["OMP_NUM_THREADS"]["value"] == "4" and env["HF_HOME"]["value"] == "/cache"
    import kubernetes_validate

    kubernetes_validate.validate(pod, "1.31", strict=True)


@pytest.mark.integration
async def test_pods_are_created_watched_and_deleted_through_the_api(kube: FakeKube) -> None:
    exits: list[tuple[str, int]] = []
    # A stand-in worker: the pod's command, run by the fake kubelet.
    k = KubernetesConfig(api_server=kube.url, namespace="meshserve",
                         command=(sys.executable, "-c", "import time, sys; time.sleep(600)"),
                         max_workers=3, termination_grace_s=5)
    launcher = KubernetesLauncher(k, on_exit=lambda w, rc: exits.append((w, rc)))
    try:
        for wid in ("w1", "w2", "w3"):
            assert await launcher.spawn(wid) == 0
        assert launcher.room() == 0 and sorted(launcher.pids()) == ["w1", "w2", "w3"]
        await until(lambda: len(kube.pids()) == 3, 10.0, "3 pods running")
        from controller.launcher import LaunchError

        with pytest.raises(LaunchError, match="limit reached"):
            await launcher.spawn("w4")
        # The node kills w1's container: reported once, as SIGKILL; the pod is cleaned up.
        kube.node_kill(pod_name("w1"))
        await until(lambda: exits == [("w1", -signal.SIGKILL)], 10.0, "w1's exit")
        await until(lambda: pod_name("w1") not in kube.pods, 10.0, "w1's pod deleted")
        # meshctl kill: a delete with a short grace; this stand-in ends on the SIGTERM.
        assert launcher.kill("w2") and not launcher.kill("nobody")
        await until(lambda: ("w2", -signal.SIGTERM) in exits, 10.0, "w2's exit")
        # The watch's connection dies silently, a pod is force-deleted meanwhile, and the
        # API server's history no longer reaches back (410 Gone on resuming): the DELETED
        # event went to nobody, and still its end is reported (from a list on reopening).
        kube.deafen_watches()
        w3 = kube.procs[pod_name("w3")]
        kube.delete_now(pod_name("w3"))
        # Not yet known: the API server's DELETED event went to the dead watch, and the node
        # has seen w3's container end (all that could ever tell of it has happened).
        await until(lambda: ("DELETED", pod_name("w3")) in kube.swallowed
                    and w3.returncode is not None, 10.0, "w3's end swallowed")
        assert ("w3", -signal.SIGKILL) not in exits
        lists = kube.lists
        kube.break_watches()
        await until(lambda: ("w3", -signal.SIGKILL) in exits, timeout_s=5,
                    what="w3's end found by the reopened watch")
        assert kube.lists > lists  # found by listing again, as the watch reopened
        await launcher.spawn("w3b")
        await until(lambda: len(kube.pids()) == 1, 10.0, "w3b running")
        # Scale-down: a delete with grace; the worker stops on SIGTERM.
        await launcher.stop("w3b", timeout_s=5.0)
        assert [w for w, _ in exits] == ["w1", "w2", "w3", "w3b"]
        assert launcher.room() == 3 and kube.live() == []
        deletes = [name for method, name in kube.calls if method == "DELETE"]
        assert set(deletes) == {pod_name(w) for w in ("w1", "w2", "w3b")}
    finally:
        await launcher.aclose(timeout_s=5.0)
    assert kube.pids() == {}
    # Every call the launcher made in its life (adopt, create, watch and list again after a
    # break, kill, stop, clean up, close) is one its Role grants, and it uses every verb the
    # Role grants: the Role (deploy/kubernetes/launcher/rbac.yaml) is checked against
    # API_VERBS in tests/test_deploy.py.
    assert kube.verbs == set(API_VERBS)


@pytest.mark.integration
async def test_a_killed_worker_ends_with_its_pod_and_is_reported_once_its_process_is_gone(
        kube: FakeKube) -> None:
    # meshctl kill, or a hung worker: a force delete (grace 0) would remove the pod object at
    # once while its container still runs, and a replacement could be scheduled onto the GPU
    # the old worker still holds. So a kill deletes with a short grace, the object stays
    # until the container has stopped, and the end is reported only then.
    from controller.kube_launcher import KILL_GRACE_S

    exits: list[tuple[str, int]] = []
    alive_when_reported: list[bool] = []

    def on_exit(worker_id: str, code: int) -> None:
        exits.append((worker_id, code))
        alive_when_reported.append(kube.procs[pod_name(worker_id)].returncode is None)

    # A hung worker: it ignores SIGTERM, so only the kubelet's SIGKILL after the grace ends it.
    hung = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(600)")
    k = KubernetesConfig(api_server=kube.url, namespace="meshserve",
                         command=(sys.executable, "-c", hung), max_workers=2,
                         termination_grace_s=5)
    launcher = KubernetesLauncher(k, on_exit=on_exit)
    try:
        await launcher.spawn("w1")
        await until(lambda: ready(kube, "w1"), 10.0, "w1 running, SIGTERM ignored")
        assert launcher.kill("w1")
        await until(lambda: exits, timeout_s=10, what="w1's end")
        assert exits == [("w1", -signal.SIGKILL)]
        assert alive_when_reported == [False], "its end was reported while it still ran"
        assert kube.deletes == [(pod_name("w1"), KILL_GRACE_S)] and KILL_GRACE_S >= 1
        # A stop (scale-down, shutdown) deletes with the configured grace.
        await launcher.spawn("w2")
        await until(lambda: ready(kube, "w2"), 10.0, "w2 running, SIGTERM ignored")
        await launcher.stop("w2", timeout_s=8.0)
        assert kube.deletes[-1] == (pod_name("w2"), 5)
        assert [w for w, _ in exits] == ["w1", "w2"] and alive_when_reported == [False, False]
    finally:
        await launcher.aclose(timeout_s=5.0)
    assert kube.pids() == {}


@pytest.mark.integration
async def test_a_pod_deleted_between_the_list_and_the_watch_is_still_reported(
        kube: FakeKube) -> None:
    # After a broken watch the launcher lists its pods, then watches again. It must watch from
    # the list's resourceVersion: a watch from "now" starts with the pods that exist, so a pod
    # deleted between the two would never be reported ended.
    exits: list[tuple[str, int]] = []
    k = KubernetesConfig(api_server=kube.url, namespace="meshserve",
                         command=(sys.executable, "-c", "import time; time.sleep(600)"),
                         max_workers=3, termination_grace_s=5)
    launcher = KubernetesLauncher(k, on_exit=lambda w, rc: exits.append((w, rc)))
    try:
        for wid in ("w1", "w2"):
            await launcher.spawn(wid)
        await until(lambda: len(kube.pids()) == 2, 10.0, "2 pods running")
        # The watch misses a few events, then the API server's history no longer reaches
        # back (410 Gone on resuming): the launcher has to list.
        kube.deafen_watches()
        await launcher.spawn("w3")
        await until(lambda: len(kube.pids()) == 3, 10.0, "w3 running")
        lists = sum(1 for m, name in kube.calls if m == "GET" and not name)
        kube.after_next_list(lambda: kube.delete_now(pod_name("w2")))
        kube.break_watches()
        await until(lambda: ("w2", -signal.SIGKILL) in exits, timeout_s=10,
                    what="w2's end, deleted between the list and the watch")
        assert sum(1 for m, name in kube.calls if m == "GET" and not name) >= lists + 2, \
            kube.calls
        # The reopened watch goes on: a later end is reported too.
        kube.node_kill(pod_name("w1"))
        await until(lambda: ("w1", -signal.SIGKILL) in exits, 10.0, "w1's end")
        assert sorted(w for w, _ in exits) == ["w1", "w2"]
    finally:
        await launcher.aclose(timeout_s=5.0)
    assert kube.pids() == {}


def create_pod(kube: FakeKube, manifest: dict[str, Any]) -> None:
    """What a previous run of the controller sent to create a pod."""
    request = urllib.request.Request(
        f"{kube.url}/api/v1/namespaces/{kube.namespace}/pods", method="POST",
        data=json.dumps(manifest).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 201


@pytest.mark.integration
async def test_a_restarted_launcher_adopts_its_pods_before_it_creates_any_and_keeps_them(
        kube: FakeKube) -> None:
    from controller.launcher import LaunchError

    k = KubernetesConfig(api_server=kube.url, namespace="meshserve",
                         command=(sys.executable, "-c", "import time; time.sleep(600)"),
                         max_workers=4, termination_grace_s=5)
    # What the previous run of this controller (same pod, same label) left: w1 and w3 still
    # running, w2's container ended while no controller was there to see it.
    for wid in ("w1", "w2", "w3"):
        manifest = worker_pod(k, wid, instance="meshserve", owner=None)
        if wid == "w2":
            manifest["spec"]["containers"][0]["command"] = [sys.executable, "-c",
                                                            "raise SystemExit(3)"]
        await asyncio.to_thread(create_pod, kube, manifest)
    await until(lambda: len(kube.pids()) == 2 and
                kube.pods[pod_name("w2")]["status"]["phase"] == "Failed",
                timeout_s=10.0, what="the previous run's pods")
    exits: list[tuple[str, int]] = []
    launcher = KubernetesLauncher(k, on_exit=lambda w, rc: exits.append((w, rc)))
    first_call = len(kube.calls)
    try:
        assert await launcher.adopt(timeout_s=10) == ["w1", "w3"]
        assert kube.calls[first_call] == ("GET", "")  # a list, before anything else
        assert exits == [("w2", 3)]  # its end reported once, its pod cleaned up
        await until(lambda: pod_name("w2") not in kube.pods, 10.0, "w2's pod deleted")
        assert launcher.room() == 2 and sorted(launcher.pids()) == ["w1", "w3"]
        # An id that has a pod is refused, before the API is asked and without losing the
        # pod: its end is still seen.
        with pytest.raises(LaunchError, match="w1"):
            await launcher.spawn("w1")
        assert kube.conflicts == 0 and sum(1 for m, _ in kube.calls if m == "POST") == 3
        kube.node_kill(pod_name("w1"))
        await until(lambda: ("w1", -signal.SIGKILL) in exits, 10.0, "w1's end")
        await launcher.spawn("w4")
        await until(lambda: pod_name("w4") in kube.pids(), 10.0, "w4 running")
    finally:
        await launcher.aclose(timeout_s=5.0)
    assert kube.pids() == {} and kube.conflicts == 0


def ready(kube: FakeKube, worker_id: str) -> bool:
    """Whether the stand-in worker of this pod printed ``ready``."""
    log = kube.logs / f"{pod_name(worker_id)}.log"
    return log.exists() and "ready" in log.read_text()


MLP = """
[[deployments]]
name = "mlp"
model = "worker.models.mlp:build"
factory_kwargs = { hidden = 64 }
worlds = 1
max_worlds = 3
"""


def delete_pod(kube: FakeKube, name: str) -> None:
    """What `kubectl delete pod NAME` sends."""
    request = urllib.request.Request(
        f"{kube.url}/api/v1/namespaces/{kube.namespace}/pods/{name}", method="DELETE",
        data=json.dumps({"kind": "DeleteOptions", "apiVersion": "v1"}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def serving(n: int) -> Any:
    return lambda s: s["deployments"][0]["worlds_current"] == n and \
        sum(w["state"] == "serving" for w in s["worlds"]) == n


@pytest.mark.integration
async def test_a_controller_scales_through_pods_and_replaces_a_killed_one(
        kube: FakeKube, tmp_path: Path) -> None:
    from mesh.testing.cluster import Cluster
    from mesh.testing.configs import write_config
    from mesh.testing.ledger import LedgerClient
    from mesh.testing.ports import free_ports
    from mesh.testing.processes import alive
    from tests.cluster import start_controller
    from tests.load import Load

    ports = free_ports("client", "admin", "worker")
    config = tmp_path / "kube.toml"
    write_config(config, ports, MLP + f"""
[kubernetes]
api_server = "{kube.url}"
namespace = "meshserve"
controller_address = "tcp://127.0.0.1:{ports['worker']}"
command = ["{sys.executable}", "-m", "mesh.cli"]
threads = 1
resources = {{ requests = {{ cpu = "1" }} }}
termination_grace_s = 5
""", 'launcher = "kubernetes"')
    log = tmp_path / "controller.log"
    ctrl = start_controller(config, log)
    cluster = Cluster(ctrl, f"tcp://127.0.0.1:{ports['client']}",
                      f"tcp://127.0.0.1:{ports['admin']}", f"tcp://127.0.0.1:{ports['worker']}",
                      config, log)
    try:
        await cluster.wait_for(serving(1), timeout_s=60, what="a world on a pod")
        assert len(kube.live()) == 1
        async with LedgerClient(cluster.client) as client:
            async with Load(client, callers=4, timeout_s=20.0) as load:
                # 1 -> 3 -> 1 under load: pods created, then deleted, through the API.
                proc = await asyncio.to_thread(cluster.meshctl, "scale", "mlp", "--worlds", "3")
                assert proc.returncode == 0, proc.stderr
                await cluster.wait_for(serving(3), timeout_s=60, what="3 worlds")
                assert len(kube.live()) == 3
                proc = await asyncio.to_thread(cluster.meshctl, "scale", "mlp", "--worlds", "1")
                assert proc.returncode == 0, proc.stderr
                await cluster.wait_for(serving(1), timeout_s=60, what="back to 1 world")
                await until(lambda: len(kube.live()) == 1, timeout_s=30,
                            what="the released pods deleted")
                # The node kills the serving worker's container: a worker crash.
                status = await cluster.status()
                [victim] = status["worlds"][0]["workers"]
                created = sum(1 for m, _ in kube.calls if m == "POST")
                kube.node_kill(pod_name(victim))
                after = await cluster.wait_for(
                    lambda s: serving(1)(s) and victim not in s["worlds"][0]["workers"],
                    timeout_s=60, what="a replacement world on a new pod")
                assert sum(1 for m, _ in kube.calls if m == "POST") == created + 1
                # Someone deletes the replacement's pod (kubectl delete pod, a node drain):
                # the same, a crash.
                [second] = after["worlds"][0]["workers"]
                await asyncio.to_thread(delete_pod, kube, pod_name(second))
                after = await cluster.wait_for(
                    lambda s: serving(1)(s) and second not in s["worlds"][0]["workers"],
                    timeout_s=60, what="a replacement for the deleted pod")
                assert sum(1 for m, _ in kube.calls if m == "POST") == created + 2
                await asyncio.sleep(0.5)
        assert load.errors == []
        load.assert_exactly_once()
        killed = next(w for w in after["workers"] if w["id"] == victim)
        assert killed["state"] == "dead" and "SIGKILL" in killed["reason"], killed
        deleted = next(w for w in after["workers"] if w["id"] == second)
        # SIGTERM in the pod's grace period: the worker stopped by itself, and still its
        # pod's end was a crash to the controller.
        assert deleted["state"] == "dead" and deleted["reason"].startswith("exited"), deleted
        assert [e for e in after["events"] if e["event"] == "world_broken"]
        assert sum(1 for m, _ in kube.calls if m == "DELETE") >= 3  # 2 released, 1 cleaned
    finally:
        if ctrl.poll() is None:
            ctrl.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(ctrl.wait, 30)
        except Exception:
            ctrl.kill()
            ctrl.wait()
    # The controller deleted its pods on the way out; nothing outlives the test.
    await until(lambda: kube.pids() == {}, timeout_s=15, what="every pod's process ended")
    assert not alive(ctrl.pid)


@pytest.mark.integration
async def test_a_restarted_controller_adopts_its_pods_and_never_asks_for_them_again(
        kube: FakeKube, tmp_path: Path) -> None:
    # A controller restarted in its pod (a crash: the container restarts, the pod and its
    # label stay) finds the pods it had created, takes their workers back, and starts new ones
    # under new ids: it never asks for a pod that exists, and it still sees the adopted pods'
    # ends.
    from mesh.testing.cluster import Cluster
    from mesh.testing.configs import write_config
    from mesh.testing.ports import free_ports
    from mesh.testing.processes import alive, end_processes
    from tests.cluster import start_controller

    ports = free_ports("client", "admin", "worker")
    config = tmp_path / "kube.toml"
    write_config(config, ports, MLP + f"""
[kubernetes]
api_server = "{kube.url}"
namespace = "meshserve"
controller_address = "tcp://127.0.0.1:{ports['worker']}"
command = ["{sys.executable}", "-m", "mesh.cli"]
threads = 1
termination_grace_s = 5
""", 'launcher = "kubernetes"\nwarm_workers = 1')
    endpoints = (f"tcp://127.0.0.1:{ports['client']}", f"tcp://127.0.0.1:{ports['admin']}",
                 f"tcp://127.0.0.1:{ports['worker']}")
    first = start_controller(config, tmp_path / "first.log")
    second = None
    try:
        cluster = Cluster(first, *endpoints, config, tmp_path / "first.log")
        before = await cluster.wait_for(
            lambda s: serving(1)(s) and sum(w["state"] == "idle" for w in s["workers"]) == 1,
            timeout_s=60, what="a world and a warm worker on pods")
        old = sorted(w["id"] for w in before["workers"])
        assert len(old) == 2 and kube.live() == sorted(pod_name(w) for w in old)
        first.kill()  # the controller crashes; its pods keep running
        first.wait(10)
        calls_before, created_before = len(kube.calls), len(kube.created)
        second = start_controller(config, tmp_path / "second.log")
        cluster = Cluster(second, *endpoints, config, tmp_path / "second.log")
        after = await cluster.wait_for(
            lambda s: serving(1)(s) and {w["id"] for w in s["workers"]
                                         if w["state"] in ("idle", "serving")} >= set(old),
            timeout_s=60, what="the old workers back and a world serving")
        calls = kube.calls[calls_before:]
        assert kube.conflicts == 0, calls  # no create for a pod that exists
        posts = [i for i, (m, _) in enumerate(calls) if m == "POST"]
        lists = [i for i, (m, name) in enumerate(calls) if m == "GET" and not name]
        assert lists and (not posts or lists[0] < posts[0]), calls  # listed before any create
        assert posts == [], calls  # the adopted workers were enough
        # An adopted pod's end is seen as a worker crash, and replaced under a new id.
        [victim] = after["worlds"][0]["workers"]
        kube.node_kill(pod_name(victim))
        final = await cluster.wait_for(
            lambda s: serving(1)(s) and victim not in s["worlds"][0]["workers"],
            timeout_s=60, what="a replacement world")
        dead = next(w for w in final["workers"] if w["id"] == victim)
        assert dead["state"] == "dead" and "SIGKILL" in dead["reason"], dead
        new = kube.created[created_before:]
        assert new, "no replacement pod was created"
        numbers = [int(w[1:]) for w in old]
        assert all(int(name.rsplit("-w", 1)[1]) > max(numbers) for name in new), new
        assert kube.conflicts == 0
    finally:
        end_processes([p for p in (first, second) if p is not None], timeout_s=30)
    await until(lambda: kube.pids() == {}, timeout_s=20, what="every pod's process ended")
    assert not alive(first.pid)


def test_a_worker_pod_under_curve_mounts_the_keys_secret_and_passes_its_keys() -> None:
    from controller.kube_launcher import KEYS_PATH

    k = KubernetesConfig(keys_secret="meshserve-worker-key")
    pod = worker_pod(k, "w1", instance="meshserve-ctl-0", owner=None)
    container = pod["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--key") + 1] == f"{KEYS_PATH}/worker.key_secret"
    assert args[args.index("--controller-key") + 1] == f"{KEYS_PATH}/controller.key"
    assert container["volumeMounts"] == [{"name": "keys", "mountPath": KEYS_PATH,
                                          "readOnly": True}]
    [volume] = pod["spec"]["volumes"]
    assert volume["secret"] == {"secretName": "meshserve-worker-key", "defaultMode": 0o440}
    import kubernetes_validate

    kubernetes_validate.validate(pod, "1.31", strict=True)
    assert "--key" not in worker_pod(KubernetesConfig(), "w1", instance="x", owner=None)[
        "spec"]["containers"][0]["args"]


@pytest.mark.integration
async def test_a_controller_under_curve_serves_through_pods_that_hold_the_workers_key(
        tmp_path: Path) -> None:
    # CURVE with the kubernetes launcher: the worker pods get their key pair and the
    # controller's public key from a Secret, and only that key is allowed on the worker port.
    import numpy as np

    from mesh.client import Client
    from mesh.security import ClientKeys, generate
    from mesh.testing.cluster import Cluster
    from mesh.testing.configs import write_config
    from mesh.testing.ports import free_ports
    from mesh.testing.processes import end_processes
    from tests.cluster import start_controller

    own, secret = tmp_path / "own", tmp_path / "secret"
    for name in ("controller", "worker", "alice", "ops"):
        generate(name, own)
    secret.mkdir()
    for name in ("worker.key_secret", "controller.key"):  # kubectl create secret ... --from-file
        (secret / name).write_bytes((own / name).read_bytes())
    for folder, name in (("clients", "alice"), ("workers", "worker"), ("admins", "ops")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"{name}.key").write_bytes((own / f"{name}.key").read_bytes())
    kube = FakeKube(tmp_path, secrets={"meshserve-worker-key": secret})
    await kube.start()
    ports = free_ports("client", "admin", "worker")
    config = tmp_path / "kube.toml"
    write_config(config, ports, MLP + f"""
[security]
curve = true
controller_key = "{own / 'controller.key_secret'}"
client_keys = "{tmp_path / 'clients'}"
worker_keys = "{tmp_path / 'workers'}"
admin_keys = "{tmp_path / 'admins'}"

[kubernetes]
api_server = "{kube.url}"
namespace = "meshserve"
controller_address = "tcp://127.0.0.1:{ports['worker']}"
command = ["{sys.executable}", "-m", "mesh.cli"]
threads = 1
termination_grace_s = 5
keys_secret = "meshserve-worker-key"
""", 'launcher = "kubernetes"')
    ctrl = start_controller(config, tmp_path / "controller.log")
    try:
        cluster = Cluster(ctrl, f"tcp://127.0.0.1:{ports['client']}",
                          f"tcp://127.0.0.1:{ports['admin']}",
                          f"tcp://127.0.0.1:{ports['worker']}", config,
                          tmp_path / "controller.log",
                          admin_curve=ClientKeys.load(own / "ops.key_secret",
                                                      own / "controller.key"))
        await cluster.wait_for(serving(1), timeout_s=60, what="a world on a pod, under CURVE")
        async with Client(cluster.client, key=str(own / "alice.key_secret"),
                          controller_key=str(own / "controller.key")) as client:
            out = await client.infer("mlp", {"x": np.ones((1, 64), np.float32)}, timeout_s=10)
        assert out["y"].shape == (1, 10)
        [pod] = kube.live()
        args = kube.pods[pod]["spec"]["containers"][0]["args"]
        assert "--key" in args and "--controller-key" in args
    finally:
        end_processes([ctrl], timeout_s=30)
        await until(lambda: kube.pids() == {}, timeout_s=20, what="the pods ended")
        await kube.close()
