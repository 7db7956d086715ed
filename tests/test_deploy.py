"""deploy/: the Dockerfile lints clean (hadolint), the Kubernetes manifests validate against
the Kubernetes schemas offline (kubernetes-validate), and they agree with the code: the
config in the ConfigMap is one this controller accepts, and the ports, probe paths and the
workers' controller address match it. No image is built and no cluster runs here (README,
"Kubernetes", says what was and was not run)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controller.config import parse_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_VERSION = "1.31"

pytestmark = pytest.mark.timeout(60)


def manifests() -> list[dict[str, Any]]:
    """The kustomization's resources, as `kubectl kustomize` would emit them (the generated
    ConfigMap included), read without kubectl."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for name in kust["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    for gen in kust["configMapGenerator"]:
        docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": gen["name"]},
                     "data": {Path(f).name: (K8S / f).read_text() for f in gen["files"]}})
    return docs


def by_kind(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name)


def test_every_manifest_validates_against_the_kubernetes_schemas() -> None:
    docs = manifests()
    assert {d["kind"] for d in docs} >= {"Namespace", "ServiceAccount", "ConfigMap",
                                         "Deployment", "Service", "StatefulSet",
                                         "PodDisruptionBudget"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_same_objects() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    rendered = list(yaml.safe_load_all(out))
    for doc in rendered:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"].get("namespace", "meshserve") == "meshserve"
    assert sorted((d["kind"], d["metadata"]["name"].split("-")[0]) for d in rendered) == \
        sorted((d["kind"], d["metadata"]["name"].split("-")[0]) for d in manifests())


def test_the_manifests_agree_with_the_controller_they_run() -> None:
    toml = by_kind("ConfigMap", "meshserve-config")["data"]["meshserve.toml"]
    config = parse_config(tomllib.loads(toml))  # the controller accepts it as it is
    c = config.controller
    assert c.launcher == "none" and c.metrics_host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in by_kind(
        "Deployment", "meshserve-controller")["spec"]["template"]["spec"]["containers"][0]
        ["ports"]}
    for name, endpoint in (("client", c.client_endpoint), ("admin", c.admin_endpoint),
                           ("worker", c.worker_endpoint)):
        assert endpoint == f"tcp://0.0.0.0:{ports[name]}", name
    assert ports["metrics"] == c.metrics_port
    pod = by_kind("Deployment", "meshserve-controller")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    mount = container["volumeMounts"][0]["mountPath"]
    assert container["args"] == ["controller", "--config", f"{mount}/meshserve.toml"]
    service = by_kind("Service", "meshserve-controller")
    assert {p["port"] for p in service["spec"]["ports"]} == set(ports.values())
    args = by_kind("StatefulSet", "meshserve-worker")["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert args[args.index("--controller") + 1] == f"tcp://meshserve-controller:{ports['worker']}"
    assert args[args.index("--advertise-host") + 1] == "$(POD_IP)"


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
