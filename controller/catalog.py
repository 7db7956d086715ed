"""What is served: the deployments and the routes over them, parsed and checked together.

The same code reads them from the config file at start, from ``meshctl apply FILE`` and from
the config file again on SIGHUP (controller/fleet_apply.py), so a file that starts a controller
is a file that applies, with the same errors (``deployments[mlp].stages: ...``,
``routes[scorer].to: ...``).

A route is a name clients address instead of a deployment's; each request goes to one of its
deployments by weight (``[[routes]] name = "scorer"``, ``to = { "scorer-v1" = 90,
"scorer-v2" = 10 }``). A route and a deployment never share a name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any

from msgspec import Meta

from mesh.errors import ConfigError
from mesh.spec import NAME_PATTERN, DeploymentSpec
from mesh.typed import DecodeError, decode

Weight = Annotated[int, Meta(ge=1, le=1_000_000)]


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: Annotated[str, Meta(pattern=NAME_PATTERN)]
    # Deployment name -> weight: each request goes to one of them, in these proportions.
    to: dict[Annotated[str, Meta(pattern=NAME_PATTERN)], Weight]


@dataclass(frozen=True, slots=True)
class Catalog:
    deployments: tuple[DeploymentSpec, ...]
    routes: tuple[RouteConfig, ...] = ()

    def deployment(self, name: str) -> DeploymentSpec | None:
        return next((d for d in self.deployments if d.name == name), None)


def parse_catalog(raw: dict[str, Any]) -> Catalog:
    """The ``[[deployments]]`` and ``[[routes]]`` of a parsed TOML document, checked."""
    deployments = tuple(_deployments(raw.get("deployments", [])))
    routes = tuple(_routes(raw.get("routes", [])))
    names = {d.name for d in deployments}
    for route in routes:
        if route.name in names:
            raise ConfigError(f"routes[{route.name}].name: {route.name!r} names a deployment "
                              f"too (deployments[{route.name}]); a route and a deployment "
                              "cannot share a name")
        for target in route.to:
            if target not in names:
                raise ConfigError(f"routes[{route.name}].to: no deployment named {target!r}; "
                                  f"deployments: {sorted(names)[:20]}")
    return Catalog(deployments, routes)


def _deployments(raw: Any) -> list[DeploymentSpec]:
    if not isinstance(raw, list) or not all(isinstance(d, dict) for d in raw):
        raise ConfigError("'deployments' must be an array of tables ([[deployments]])")
    if not raw:
        raise ConfigError("'deployments' is empty: configure at least one model")
    deployments = []
    seen: set[str] = set()
    for i, table in enumerate(raw):
        where = f"deployments[{i}]"
        if "name" in table and isinstance(table["name"], str):
            where = f"deployments[{table['name']}]"
        dep = typed_table(DeploymentSpec, table, where)
        check_deployment(dep, where)
        if dep.name in seen:
            raise ConfigError(f"{where}.name: deployment {dep.name!r} is configured twice")
        seen.add(dep.name)
        deployments.append(dep)
    return deployments


def _routes(raw: Any) -> list[RouteConfig]:
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise ConfigError("'routes' must be an array of tables ([[routes]])")
    routes = []
    seen: set[str] = set()
    for i, table in enumerate(raw):
        where = f"routes[{table['name']}]" if isinstance(table.get("name"), str) \
            else f"routes[{i}]"
        route = typed_table(RouteConfig, table, where)
        if not route.to:
            raise ConfigError(f"{where}.to: a route needs at least one deployment")
        if route.name in seen:
            raise ConfigError(f"{where}.name: route {route.name!r} is configured twice")
        seen.add(route.name)
        routes.append(route)
    return routes


def typed_table(cls: Any, raw: dict[str, Any], where: str) -> Any:
    """A TOML table as the record ``cls``: an unknown key or a value out of range is a
    ConfigError naming it by its dotted path."""
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown key {where}.{key}")
    try:
        return decode(raw, cls, where)
    except DecodeError as exc:
        raise ConfigError(str(exc)) from None


def check_deployment(d: DeploymentSpec, where: str) -> None:
    """The rules between fields; each field's own range is in its type (mesh/spec.py)."""
    if d.min_worlds > d.max_worlds:
        raise ConfigError(
            f"{where}.min_worlds ({d.min_worlds}) exceeds max_worlds ({d.max_worlds})")
    if not d.min_worlds <= d.worlds <= d.max_worlds:
        raise ConfigError(
            f"{where}.worlds ({d.worlds}) must lie between min_worlds ({d.min_worlds}) "
            f"and max_worlds ({d.max_worlds})"
        )
    if d.default_timeout_ms > d.max_timeout_ms:
        raise ConfigError(f"{where}.default_timeout_ms exceeds max_timeout_ms")
    if d.split_points:
        if len(d.split_points) != d.stages - 1:
            raise ConfigError(f"{where}.split_points must list stages - 1 = {d.stages - 1} "
                              f"child indices, got {d.split_points}")
        if d.split_points != sorted(set(d.split_points)):
            raise ConfigError(f"{where}.split_points must increase strictly from 1")
