"""deploy/: the Dockerfile lints clean (hadolint), the Kubernetes manifests validate against
the Kubernetes schemas offline (kubernetes-validate), and they agree with the code: the
config in the ConfigMap is one this controller accepts, and the ports, probe paths and the
workers' controller address match it. No image is built and no cluster runs here (README,
"Kubernetes", says what was and was not run)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controller.config import Config, KubernetesConfig, parse_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_VERSION = "1.31"

pytestmark = pytest.mark.timeout(60)


OVERLAYS = ("joined", "launcher")


def manifests(overlay: str) -> list[dict[str, Any]]:
    """An overlay's objects, as `kubectl kustomize` would emit them (the generated ConfigMap
    included, namespaces and labels left to kustomize), read without kubectl."""
    return _read(K8S / overlay)


def _read(folder: Path) -> list[dict[str, Any]]:
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kust["resources"]:
        path = (folder / name).resolve()
        docs += _read(path) if path.is_dir() else \
            [d for d in yaml.safe_load_all(path.read_text()) if d]
    for gen in kust.get("configMapGenerator", []):
        docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": gen["name"]},
                     "data": {Path(f).name: (folder / f).read_text() for f in gen["files"]}})
    return docs


def by_kind(overlay: str, kind: str, name: str) -> dict[str, Any]:
    return next(d for d in manifests(overlay)
                if d["kind"] == kind and d["metadata"]["name"] == name)


def controller_config(overlay: str, root: Path) -> Config:
    """The overlay's controller config, parsed as the controller parses it. Its CURVE key
    paths must lie in the Secret volumes the controller's Deployment mounts (checked here);
    they are made under ``root``, as the mounts would make them, so that the config's own
    checks (the files exist) run too."""
    raw = tomllib.loads(by_kind(overlay, "ConfigMap", "meshserve-config")["data"][
        "meshserve.toml"])
    pod = by_kind(overlay, "Deployment", "meshserve-controller")["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    mounts = {m["mountPath"]: secrets[m["name"]] for m in pod["containers"][0]["volumeMounts"]
              if m["name"] in secrets}
    security = raw["security"]
    for name in ("controller_key", "client_keys", "worker_keys", "admin_keys"):
        path = Path(security[name])
        holder = path.parent if name == "controller_key" else path
        assert str(holder) in mounts, f"security.{name} ({path}) is in no mounted Secret"
        local = root / path.relative_to("/")
        if name == "controller_key":
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text("")
        else:
            local.mkdir(parents=True, exist_ok=True)
        security[name] = str(local)
    return parse_config(raw)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    docs = manifests(overlay)
    kinds = {d["kind"] for d in docs}
    assert kinds >= {"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service",
                     "PodDisruptionBudget", "NetworkPolicy"}
    assert ("StatefulSet" in kinds) == (overlay == "joined")  # workers: joined, or launched
    assert ({"Role", "RoleBinding"} <= kinds) == (overlay == "launcher")
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def kubectl() -> str:
    """kubectl's path; CI must have it (.ci/run installs it), elsewhere the test skips."""
    found = shutil.which("kubectl")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is not installed, and CI must render every overlay with it")
        pytest.skip("kubectl is not installed (.ci/run installs it)")
    return found


@pytest.mark.integration
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_renders_the_same_objects(overlay: str) -> None:
    out = subprocess.run([kubectl(), "kustomize", str(K8S / overlay)], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    rendered = list(yaml.safe_load_all(out))
    for doc in rendered:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"].get("namespace", "meshserve") == "meshserve"
    assert sorted((d["kind"], d["metadata"]["name"].split("-")[0]) for d in rendered) == \
        sorted((d["kind"], d["metadata"]["name"].split("-")[0]) for d in manifests(overlay))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_manifests_agree_with_the_controller_they_run(overlay: str, tmp_path: Path
                                                          ) -> None:
    config = controller_config(overlay, tmp_path)  # the controller accepts it as it is
    assert config.security.curve  # closed by default
    c = config.controller
    assert c.launcher == ("none" if overlay == "joined" else "kubernetes")
    assert c.metrics_host == "0.0.0.0"
    deployment = by_kind(overlay, "Deployment", "meshserve-controller")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for name, endpoint in (("client", c.client_endpoint), ("admin", c.admin_endpoint),
                           ("worker", c.worker_endpoint)):
        assert endpoint == f"tcp://0.0.0.0:{ports[name]}", name
    assert ports["metrics"] == c.metrics_port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    mount = container["volumeMounts"][0]["mountPath"]
    assert container["args"] == ["controller", "--config", f"{mount}/meshserve.toml"]
    # The HTTP gateway beside it: the controller's client port over loopback, the
    # controller's own key pair (allowed on the client port), the [gateway] table's port.
    gateway = next(c for c in pod["containers"] if c["name"] == "gateway")
    http = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    args = gateway["args"]
    command = args.index("gateway")
    assert args[command + 1:command + 3] == ["--controller", f"tcp://127.0.0.1:{ports['client']}"]
    assert args[args.index("--config") + 1] == f"{mount}/meshserve.toml"
    assert args[args.index("--key") + 1] == args[args.index("--controller-key") + 1] == \
        "/etc/meshserve-keys/own/controller.key_secret"
    assert config.gateway.listen == f"0.0.0.0:{http['http']}"
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    service = by_kind(overlay, "Service", "meshserve-controller")
    assert {p["port"] for p in service["spec"]["ports"]} == set(ports.values()) | set(
        http.values())
    account = by_kind(overlay, "ServiceAccount", pod["serviceAccountName"])
    if overlay == "joined":
        args = by_kind(overlay, "StatefulSet", "meshserve-worker")["spec"]["template"][
            "spec"]["containers"][0]["args"]
        assert args[args.index("--controller") + 1] == \
            f"tcp://meshserve-controller:{ports['worker']}"
        assert args[args.index("--advertise-host") + 1] == "$(POD_IP)"
        assert account["automountServiceAccountToken"] is False  # no API access at all
        # CURVE: each worker's key pair and the controller's public key, from the Secret the
        # kubernetes launcher mounts into its pods too.
        from controller.kube_launcher import KEYS_PATH

        workers = by_kind(overlay, "StatefulSet", "meshserve-worker")["spec"]["template"][
            "spec"]
        [mount] = workers["containers"][0]["volumeMounts"]
        [volume] = [v for v in workers["volumes"] if v["name"] == mount["name"]]
        assert mount["mountPath"] == KEYS_PATH
        assert volume["secret"]["secretName"] == "meshserve-worker-key"
        assert args[args.index("--key") + 1] == f"{KEYS_PATH}/worker.key_secret"
        assert args[args.index("--controller-key") + 1] == f"{KEYS_PATH}/controller.key"
    else:
        k = config.kubernetes
        assert k.controller_address == f"tcp://meshserve-controller:{ports['worker']}"
        assert k.keys_secret == "meshserve-worker-key"  # the worker pods' CURVE keys
        assert account["automountServiceAccountToken"] is True
        role = by_kind(overlay, "Role", "meshserve-launcher")
        # Pods only, and exactly the verbs the launcher calls (API_VERBS; tests/
        # test_kubernetes.py checks those against the calls it makes to a fake API server).
        from controller.kube_launcher import API_VERBS

        assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                                  "verbs": list(API_VERBS)}]
        env = {e["name"] for e in container["env"]}
        assert {"MESHSERVE_POD_NAME", "MESHSERVE_POD_UID"} <= env  # owner references
        # The budget selects the pods the launcher makes.
        from controller.kube_launcher import worker_pod

        labels = worker_pod(k, "w1", instance="x", owner=None)["metadata"]["labels"]
        budget = by_kind(overlay, "PodDisruptionBudget", "meshserve-worker")
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_launcher_overlays_budget_is_one_kubernetes_can_honour_for_pods_a_pod_owns(
        tmp_path: Path) -> None:
    # The launcher's pods are owned by the controller's Pod, not by a workload controller
    # with a scale: for them Kubernetes honours only an integer minAvailable (with
    # maxUnavailable or a percentage it cannot count the expected pods, every eviction is
    # refused, and a node drain hangs).
    budget = by_kind("launcher", "PodDisruptionBudget", "meshserve-worker")["spec"]
    assert "maxUnavailable" not in budget
    assert isinstance(budget["minAvailable"], int)
    # At the fleet's floor (every deployment at min_worlds, plus the warm workers) a drain
    # can still evict one worker, so it never waits on a scale-up that no load will cause.
    config = controller_config("launcher", tmp_path)
    floor = sum(d.min_worlds * d.stages for d in config.deployments) + \
        config.controller.warm_workers
    assert 1 <= budget["minAvailable"] <= floor - 1, (budget, floor)
    # The joined overlay's workers are a StatefulSet (it has a scale): one at a time.
    assert by_kind("joined", "PodDisruptionBudget", "meshserve-worker")["spec"][
        "maxUnavailable"] == 1


OWN_PODS = [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "meshserve"}}}]


def selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    return policy["podSelector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_open_meshserves_ports_to_its_own_pods_and_clients_to_those_named(
        overlay: str) -> None:
    from controller.kube_launcher import worker_pod

    policies = [d["spec"] for d in manifests(overlay) if d["kind"] == "NetworkPolicy"]
    deployment = by_kind(overlay, "Deployment", "meshserve-controller")["spec"]["template"]
    controller_labels = deployment["metadata"]["labels"]
    worker_labels = (by_kind("joined", "StatefulSet", "meshserve-worker")["spec"]["template"][
        "metadata"]["labels"] if overlay == "joined" else
        worker_pod(KubernetesConfig(), "w1", instance="x", owner=None)["metadata"]["labels"])
    [ctrl] = [p for p in policies if selects(p, controller_labels)]
    [workers] = [p for p in policies if selects(p, worker_labels)]
    assert ctrl["policyTypes"] == ["Ingress"] and workers["policyTypes"] == ["Ingress"]
    # The workers' ports (the rendezvous store, gloo, NCCL: ephemeral, unauthenticated) take
    # meshserve's own pods only, on every port.
    assert workers["ingress"] == [{"from": OWN_PODS}]
    # The controller: each port it has is in exactly one rule; worker and admin take
    # meshserve's own pods only (operators come through kubectl port-forward), client and
    # metrics whom the operator names, never everyone.
    rules = {p["port"]: rule for rule in ctrl["ingress"] for p in rule["ports"]}
    assert set(rules) == {p["name"] for c in deployment["spec"]["containers"]
                          for p in c["ports"]}
    assert rules["worker"]["from"] == OWN_PODS and rules["admin"]["from"] == OWN_PODS
    for port in ("client", "http", "metrics"):
        peers = rules[port].get("from")
        assert peers and all(peer.get("podSelector", {}).get("matchLabels") or
                             peer.get("ipBlock") for peer in peers), (port, peers)


@pytest.mark.integration
def test_the_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' installs it)")
    result = subprocess.run([hadolint, "--config", str(DEPLOY / ".hadolint.yaml"),
                             str(DEPLOY / "Dockerfile")], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    assert "AS cpu" in text and "AS cuda" in text
    assert text.count('ENTRYPOINT ["meshctl"]') == 2 and text.count("USER 10001") == 2
