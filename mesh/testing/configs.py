"""The one config writer of tests and benchmarks: a ``[controller]`` table on the endpoints
given, then the deployments' TOML.

    write_config(path, free_ports("client", "admin", "worker"), DEPLOYMENTS,
                 'launcher = "none"', worker_threads=1)
    MLP = deployment("mlp", "worker.models.mlp:build", factory_kwargs={"hidden": 64}, worlds=2)

A controller started here is quiet unless it asks otherwise (``QUIET``): no metrics port, no
warm pool (tests count worker processes), no autoscaler (a test or benchmark that sets world
counts by hand would race it) and no HTTP gateway.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

Value = bool | int | float | str
Table = dict[str, Value]

QUIET: dict[str, Value] = {"metrics_port": 0, "warm_workers": 0, "autoscale": False}
NO_GATEWAY = '\n[gateway]\nlisten = ""\n'
ENDPOINTS = ("client", "admin", "worker")

_KEY = re.compile(r"^\s*([A-Za-z0-9_]+)\s*=", re.MULTILINE)


def toml_value(value: Value | Table) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def endpoint(where: int | str) -> str:
    """A port on loopback as ``tcp://127.0.0.1:PORT``; an endpoint string as it is."""
    return where if isinstance(where, str) else f"tcp://127.0.0.1:{where}"


def controller_table(endpoints: Mapping[str, int | str], controller: str = "",
                     **settings: Value) -> str:
    """The ``[controller]`` table: the client, admin and worker endpoints (each a loopback port
    or a whole endpoint), ``settings`` written as TOML, ``controller``'s own TOML lines as they
    are, and each ``QUIET`` key that neither names."""
    own = set(_KEY.findall(controller))
    twice = set(settings) & own
    if twice:
        raise ValueError(f"set both as settings and in the controller lines: {sorted(twice)}")
    table: dict[str, Value] = {f"{k}_endpoint": endpoint(endpoints[k]) for k in ENDPOINTS}
    table.update({k: v for k, v in QUIET.items() if k not in own | set(settings)})
    table.update(settings)
    lines = "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items())
    return f"[controller]\n{lines}{controller.strip()}\n" if controller.strip() \
        else f"[controller]\n{lines}"


def deployment(name: str, model: str, **settings: Value | Table) -> str:
    """One ``[[deployments]]`` table (a dict value is written as an inline table)."""
    lines = "".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items())
    return f'\n[[deployments]]\nname = {toml_value(name)}\nmodel = {toml_value(model)}\n{lines}'


def config_text(endpoints: Mapping[str, int | str], deployments: str = "",
                controller: str = "", **settings: Value) -> str:
    """A whole config: ``controller_table`` then ``deployments`` (TOML: ``[[deployments]]``
    and any other tables), with the gateway off unless ``deployments`` has a ``[gateway]``."""
    tail = "" if "[gateway]" in deployments else NO_GATEWAY
    return controller_table(endpoints, controller, **settings) + f"\n{deployments}\n{tail}"


def write_config(path: Path, endpoints: Mapping[str, int | str], deployments: str = "",
                 controller: str = "", **settings: Value) -> Path:
    """Write ``config_text(...)`` to ``path``; returns ``path``."""
    path.write_text(config_text(endpoints, deployments, controller, **settings))
    return path
