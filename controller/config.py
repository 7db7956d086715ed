"""The controller's configuration: one typed object, parsed and validated once.

Sources, in order of precedence: command-line flags, then the TOML file, then defaults. Every
key is checked for type and range when it is decoded (the ranges are in the types, as msgspec
``Meta``; mesh/typed.py), cross-field rules are enforced here (min <= worlds <= max), and an
unknown key is rejected by its dotted name so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from msgspec import Meta

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

from controller.autoscaler_config import AutoscalerConfig
from controller.catalog import RouteConfig, parse_catalog, typed_table
from controller.probes import READINESS_RULES
from mesh.errors import ConfigError
from mesh.messages import DEFAULT_MAX_IDLE_STAGES
from mesh.spec import DeploymentSpec

T = TypeVar("T", bound="DataclassInstance")
# The deployment part of the config is exactly what workers receive (mesh/spec.py).
DeploymentConfig = DeploymentSpec

# The tables a config file may have.
TABLES = frozenset({"controller", "deployments", "routes", "security", "kubernetes", "gateway",
                    "autoscaler"})
_ENDPOINT_PATTERN = r"^(tcp://[^:/\s]+:\d+|ipc://\S+|inproc://\S+)$"
_ENDPOINT_RE = re.compile(_ENDPOINT_PATTERN)
# A ZeroMQ address the controller binds.
Endpoint = Annotated[str, Meta(pattern=_ENDPOINT_PATTERN)]


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    client_endpoint: Endpoint = "tcp://127.0.0.1:5555"
    admin_endpoint: Endpoint = "tcp://127.0.0.1:5556"
    worker_endpoint: Endpoint = "tcp://127.0.0.1:5557"
    metrics_port: Annotated[int, Meta(ge=0, le=65535)] = 9464  # 0 disables the metrics endpoint
    metrics_host: str = "127.0.0.1"
    # When /readyz says ready: "all" deployments have a serving world, "any" has, or as
    # soon as the controller is "listening".
    readiness: str = "all"
    max_request_bytes: Annotated[int, Meta(ge=1024, le=2**40)] = 64 * 1024 * 1024
    # Client connections held at once; one accepted beyond this is closed at once (logged,
    # counted). Each holds a descriptor: keep it well under the process's descriptor limit.
    max_client_connections: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000
    heartbeat_interval_ms: Annotated[int, Meta(ge=10, le=60000)] = 200
    # A worker silent this long is declared hung: its worlds break and it is killed.
    heartbeat_timeout_ms: Annotated[int, Meta(ge=50, le=600000)] = 1500
    # A worker exits when it hears nothing from the controller for this long (at least 3 s:
    # the controller pings every second, anything shorter than a few pings is a false alarm).
    controller_timeout_ms: Annotated[int, Meta(ge=3000, le=3600000)] = 10000
    # How long SIGINT/SIGTERM waits for in-flight requests before stopping workers.
    drain_timeout_ms: Annotated[int, Meta(ge=0, le=3600000)] = 10000
    # How long a world may take to form (worker start + model load) before it is abandoned.
    world_form_timeout_ms: Annotated[int, Meta(ge=100, le=3600000)] = 120000
    # Local launcher: device for spawned workers ("auto", "cpu", "cuda") and torch threads.
    worker_device: Annotated[str, Meta(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    worker_threads: Annotated[int, Meta(ge=0, le=1024)] = 0  # 0: torch's default
    # Local launcher: fork workers from a fork server that imported torch once (tens of
    # milliseconds a worker, not seconds); false: every worker is a plain `python -m worker`.
    # Linux only; elsewhere, or when the server fails, workers start plainly (logged once).
    fork_workers: bool = True
    # Local launcher: how many workers this host may run at once.
    max_local_workers: Annotated[int, Meta(ge=1, le=4096)] = 16
    # Formation failures in a row (a model that fails to load, a worker that crashes while
    # loading) before a deployment is quarantined: no more attempts until 'meshctl scale'.
    max_load_failures: Annotated[int, Meta(ge=1, le=1000)] = 3
    # Times one request may be sent to a world (first try plus re-sends after failures).
    max_attempts: Annotated[int, Meta(ge=1, le=100)] = 4
    # Scale each deployment's worlds between its bounds to hold its latency target.
    autoscale: bool = True
    autoscale_tick_ms: Annotated[int, Meta(ge=50, le=60000)] = 500
    # Idle, started workers kept ready (torch imported) so a new world forms without paying
    # for a process start; refilled in the background.
    warm_workers: Annotated[int, Meta(ge=0, le=1024)] = 1
    # Idle workers load every stage of every deployment ahead of time (memory for speed).
    preload_warm: bool = True
    # Stages a worker keeps loaded that none of its worlds uses (for reuse: re-forming a
    # world, preloading), least recently used dropped first; stages in use always stay.
    max_idle_stages: Annotated[int, Meta(ge=0, le=1024)] = DEFAULT_MAX_IDLE_STAGES
    # Bytes the stages a worker holds may take (parameters and buffers, in use and idle)
    # before idle ones are dropped, least recently used first; stages in use always stay.
    # 0: no bound (a rolling update may hold both revisions' stages).
    max_stage_bytes: Annotated[int, Meta(ge=0, le=2**50)] = 0
    # Who starts workers: "local" (subprocesses of the controller) or "none" (workers join
    # with 'meshctl worker').
    launcher: Literal["local", "none", "kubernetes"] = "local"
    # Microseconds the controller's loop keeps polling, instead of sleeping, after each
    # message it receives: lower latency at low concurrency for up to that much CPU per
    # quiet spell (controller/busy_poll.py). 0: off.
    busy_poll_us: Annotated[int, Meta(ge=0, le=100_000)] = 0
    # A folder where what was applied (deployments, routes) and what operators changed at run
    # time (scale, latency targets) is kept, so a restarted controller resumes from it even
    # when started on its original file ("": nothing is kept; docs/operations.md).
    state_dir: str = ""
    # Re-read the config file when it changes (as SIGHUP does), e.g. a Kubernetes ConfigMap.
    watch_config: bool = False


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """ZeroMQ CURVE on every socket (mesh/security.py). Relative paths are read from the config
    file's folder."""

    curve: bool = False
    # The controller's key pair (NAME.key_secret from 'meshctl keys generate').
    controller_key: str = ""
    # Folders of the public keys (NAME.key) allowed on each port; re-read on SIGHUP and when
    # a folder changes, so revoking a key is deleting its file.
    client_keys: str = ""
    worker_keys: str = ""
    admin_keys: str = ""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The HTTP gateway (``meshctl gateway``, and the one ``meshctl up`` starts): OpenAI-
    compatible ``/v1`` and KServe v2 ``/v2`` for clients that speak HTTP (mesh/gateway/)."""

    # HOST:PORT it listens on; "" turns off the one meshctl up starts.
    listen: str = "127.0.0.1:8000"
    # Processes sharing the port (SO_REUSEPORT), where one core is not enough.
    processes: Annotated[int, Meta(ge=1, le=256)] = 1
    # CURVE: the gateway's own key pair (NAME.key_secret), allowed on the client port; "" with
    # meshctl up: the controller's own (allowed there for it).
    key: str = ""
    # Bearer tokens, one per line ("" : none needed); TLS certificate and key (PEM).
    api_keys_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # Limits: a request's body and header bytes, how long a client may take to send its
    # headers and its body, idle keep-alive, open connections; the deadline of a request that
    # names none.
    max_body_bytes: Annotated[int, Meta(ge=1024, le=2**40)] = 64 * 1024 * 1024
    max_header_bytes: Annotated[int, Meta(ge=1024, le=1024 * 1024)] = 16 * 1024
    header_timeout_s: Annotated[float, Meta(ge=0.1, le=3600.0)] = 10.0
    body_timeout_s: Annotated[float, Meta(ge=0.1, le=3600.0)] = 30.0
    keepalive_timeout_s: Annotated[float, Meta(ge=0.1, le=3600.0)] = 5.0
    max_connections: Annotated[int, Meta(ge=1, le=1_000_000)] = 4096
    request_timeout_s: Annotated[float, Meta(ge=0.001, le=86400.0)] = 60.0


@dataclass(frozen=True, slots=True)
class KubernetesConfig:
    """``launcher = "kubernetes"``: one pod per worker (controller/kube_launcher.py)."""

    # The API server: "" for the in-cluster service account (the controller runs in a pod),
    # else a URL (`kubectl proxy`'s http://127.0.0.1:8001, or a test's fake).
    api_server: str = ""
    # Where worker pods are created; "" for the controller pod's own namespace.
    namespace: str = ""
    # The controller's worker endpoint as pods reach it (its Service).
    controller_address: str = "tcp://meshserve-controller:5557"
    max_workers: Annotated[int, Meta(ge=1, le=100_000)] = 16
    # The worker pods: image and command, and whatever Kubernetes needs to place them.
    image: str = "meshserve:cpu"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    command: tuple[str, ...] = ("meshctl",)
    # The workers' --device: cpu, cuda (one GPU per pod) or auto.
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    threads: Annotated[int, Meta(ge=0, le=1024)] = 1
    # Container resources, as in a pod spec:
    # {requests = {cpu = "1"}, limits = {"nvidia.com/gpu" = 1}}
    resources: dict[str, dict[str, str | int]] = dataclasses.field(default_factory=dict)
    node_selector: dict[str, str] = dataclasses.field(default_factory=dict)
    tolerations: tuple[dict[str, str | int], ...] = ()
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)
    service_account: str = ""
    # With security.curve: the Secret mounted into every worker pod, holding the workers' key
    # pair (worker.key_secret, its public half in security.worker_keys) and the controller's
    # public key (controller.key); docs/kubernetes.md says how to make it.
    keys_secret: str = ""
    # Seconds a worker pod gets to stop when it is released (scale-down, shutdown). At least
    # 1: a grace of 0 is a force delete (the pod object goes before its container stops).
    termination_grace_s: Annotated[int, Meta(ge=1, le=3600)] = 15


@dataclass(frozen=True, slots=True)
class Config:
    controller: ControllerConfig
    deployments: tuple[DeploymentConfig, ...]
    security: SecurityConfig = SecurityConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()
    gateway: GatewayConfig = GatewayConfig()
    autoscaler: AutoscalerConfig = dataclasses.field(default_factory=AutoscalerConfig)
    routes: tuple[RouteConfig, ...] = ()

    def deployment(self, name: str) -> DeploymentConfig:
        for dep in self.deployments:
            if dep.name == name:
                return dep
        raise KeyError(name)


def demo_config() -> Config:
    """The built-in demo deployments served by ``meshctl up`` with no config file."""
    return Config(
        controller=ControllerConfig(),
        deployments=(
            DeploymentConfig(
                name="mlp",
                model="worker.models.mlp:build",
                stages=1,
                worlds=1,
                min_worlds=1,
                max_worlds=4,
                slo_p99_ms=50.0,
            ),
            DeploymentConfig(
                name="tinygpt",
                model="worker.models.tinygpt:build",
                stages=2,
                worlds=1,
                min_worlds=1,
                max_worlds=2,
                slo_p99_ms=2000.0,
                slo_ttft_p99_ms=500.0,
            ),
        ),
    )


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file; raises ConfigError naming the bad field."""
    path = Path(path)
    return parse_config(_read_toml(path), path.resolve().parent)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None


def parse_config(raw: dict[str, Any], base: Path | None = None) -> Config:
    """A validated Config from a parsed TOML document; ``base`` is the folder that relative
    paths (the security keys) are read from (the config file's; default: the current one)."""
    unknown = set(raw) - TABLES
    if unknown:
        raise ConfigError(f"unknown top-level key {sorted(unknown)[0]!r}")
    controller = _table(raw, "controller", ControllerConfig)
    _check_controller(controller)
    if controller.state_dir:
        controller = dataclasses.replace(controller, state_dir=str(
            ((base or Path.cwd()) / controller.state_dir).resolve()))
    catalog = parse_catalog(raw)
    security = _check_security(_table(raw, "security", SecurityConfig), base or Path.cwd())
    kubernetes = _table(raw, "kubernetes", KubernetesConfig)
    _check_kubernetes(kubernetes, controller.launcher == "kubernetes")
    if controller.launcher == "kubernetes" and security.curve and not kubernetes.keys_secret:
        raise ConfigError("kubernetes.keys_secret is required when security.curve is true: "
                          "the Secret with the worker pods' key pair (worker.key_secret) and "
                          "the controller's public key (controller.key)")
    gateway = check_gateway(_table(raw, "gateway", GatewayConfig), base or Path.cwd())
    autoscaler = _table(raw, "autoscaler", AutoscalerConfig)
    if autoscaler.down_util >= autoscaler.target_util:
        raise ConfigError(f"autoscaler.down_util ({autoscaler.down_util}) must be below "
                          f"target_util ({autoscaler.target_util}): the gap keeps a steady "
                          "load from moving the world count back and forth")
    return Config(controller=controller, deployments=catalog.deployments, security=security,
                  kubernetes=kubernetes, gateway=gateway, autoscaler=autoscaler,
                  routes=catalog.routes)


def load_gateway_config(path: str | Path) -> GatewayConfig:
    """The ``[gateway]`` table of a config file alone (``meshctl gateway --config``); the rest
    of the file is not read."""
    path = Path(path)
    return check_gateway(_table(_read_toml(path), "gateway", GatewayConfig),
                         path.resolve().parent)


_LISTEN_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^:\s\[\]]+):(\d{1,5})$")


def check_gateway(g: GatewayConfig, base: Path) -> GatewayConfig:
    """Ranges and files checked; paths made absolute (from ``base``)."""
    if g.listen:
        found = _LISTEN_RE.match(g.listen)
        if not found or not 0 <= int(found.group(2)) <= 65535:
            raise ConfigError(f"gateway.listen must be HOST:PORT (or \"\" for none), got "
                              f"{g.listen!r}")
    if bool(g.tls_cert) != bool(g.tls_key):
        raise ConfigError("gateway.tls_cert and gateway.tls_key go together")
    paths: dict[str, Any] = {}
    for name in ("key", "api_keys_file", "tls_cert", "tls_key"):
        value = getattr(g, name)
        if value:
            path = (base / value).resolve()
            if not path.is_file():
                raise ConfigError(f"gateway.{name}: no file {str(path)!r}")
            paths[name] = str(path)
    return dataclasses.replace(g, **paths)


def _check_kubernetes(k: KubernetesConfig, used: bool) -> None:
    if used and not k.command:
        raise ConfigError("kubernetes.command must name the worker image's meshctl")
    if used and not _ENDPOINT_RE.match(k.controller_address):
        raise ConfigError("kubernetes.controller_address must look like tcp://HOST:PORT, got "
                          f"{k.controller_address!r}")


def _check_security(s: SecurityConfig, base: Path) -> SecurityConfig:
    """With ``curve``: every path given, made absolute, and present."""
    if not s.curve:
        return s
    paths: dict[str, Any] = {}
    for name in ("controller_key", "client_keys", "worker_keys", "admin_keys"):
        value = getattr(s, name)
        if not value:
            raise ConfigError(f"security.{name} is required when security.curve is true")
        path = (base / value).resolve()
        if name == "controller_key" and not path.is_file():
            raise ConfigError(f"security.controller_key: no file {str(path)!r} (make one with "
                              "'meshctl keys generate controller')")
        if name != "controller_key" and not path.is_dir():
            raise ConfigError(f"security.{name}: no folder {str(path)!r}")
        paths[name] = str(path)
    return dataclasses.replace(s, **paths)


def _table(raw: dict[str, Any], name: str, cls: type[T]) -> T:
    """The ``[name]`` table of a config document as a ``cls`` (defaults when it is absent)."""
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"'{name}' must be a table")
    return typed_table(cls, table, name)


def _check_controller(c: ControllerConfig) -> None:
    """The rules between fields; each field's own range is in its type."""
    endpoints = [c.client_endpoint, c.admin_endpoint, c.worker_endpoint]
    if len(set(endpoints)) != 3:
        raise ConfigError("controller endpoints must be three different addresses")
    if c.heartbeat_timeout_ms < 2 * c.heartbeat_interval_ms:
        raise ConfigError(
            "controller.heartbeat_timeout_ms must be at least twice heartbeat_interval_ms"
        )
    if c.readiness not in READINESS_RULES:
        raise ConfigError(f"controller.readiness must be one of {list(READINESS_RULES)}, got "
                          f"{c.readiness!r}")
