"""What a restarted controller resumes from, with ``[controller] state_dir``.

What was applied (``meshctl apply``, SIGHUP: deployments and routes) and what operators changed
at run time (``meshctl scale``, ``meshctl slo``: the world count, its bounds, the latency
target), with each deployment's revision, kept in ``STATE_FILE`` in that folder. It is
written whole and atomically (a temporary file, fsync, rename, fsync of the folder) after each
such change, so a crash leaves the previous state or the new one, never half of either. A
controller that starts with a state file serves what it says, whatever its own config file's
deployments and routes are (it says so in its log); without ``state_dir`` nothing is kept and
a restart serves what the config file says. The autoscaler's own moves are not kept: it
measures again from the load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from controller.catalog import parse_catalog
from controller.config import Config
from mesh.errors import ConfigError
from mesh.logs import speaker

log = speaker(logging.getLogger(__name__), "controller")

STATE_FILE = "meshserve-state.json"
VERSION = 1


def save(state_dir: str, state: dict[str, Any]) -> None:
    folder = Path(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"version": VERSION, **state}, indent=1, sort_keys=True).encode()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".state-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(state_dir: str) -> dict[str, Any] | None:
    """The kept state, or None when there is none yet."""
    path = Path(state_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the kept state ({exc}); move it away to "
                          "start from the config file") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise ConfigError(f"{path}: not a meshserve state file of version {VERSION}")
    return state


def resume(config: Config) -> tuple[Config, dict[str, dict[str, Any]]]:
    """The config with the kept deployments and routes in place of the file's, and each
    deployment's kept live settings; the config as it is where nothing is kept."""
    state_dir = config.controller.state_dir
    state = load(state_dir) if state_dir else None
    if state is None:
        return config, {}
    try:
        catalog = parse_catalog({"deployments": state.get("deployments", []),
                                 "routes": state.get("routes", [])})
    except ConfigError as exc:
        raise ConfigError(f"{Path(state_dir) / STATE_FILE}: {exc}") from None
    if (catalog.deployments, catalog.routes) != (config.deployments, config.routes):
        log.warning("serving what %s keeps (%s), not the config file's deployments and "
                    "routes: apply the file (meshctl apply, or SIGHUP) to serve those",
                    Path(state_dir) / STATE_FILE,
                    ", ".join(d.name for d in catalog.deployments) or "nothing")
    live = state.get("live", {})
    return (dataclasses.replace(config, deployments=catalog.deployments, routes=catalog.routes),
            live if isinstance(live, dict) else {})
