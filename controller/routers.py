"""Every deployment's router, the routes over them, and the two tables they share: which
router a world's answers go to, and which request a client's id names.

``Routers`` is a read-only mapping of deployment name to its Router (controller/router.py),
every one it holds, for status and metrics; the Frontend finds a request's router with
``resolve`` (a deployment that takes requests, or a route, which picks one of its deployments
by weight). The WorldManager changes it (``add_world``, ``drain_world``, ``add_deployment``,
``set_routes``...), and the Backend finds a world's router with ``by_world`` (a plain dict,
read on every answer). The routers report back through the one ``tell`` they are built with:
the WorldManager's mailbox.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from controller.catalog import RouteConfig
from controller.config import Config, DeploymentConfig
from controller.effects import RouteWorld
from controller.mailbox import RouterReport
from controller.router import Router


class WeightedRoute:
    """A route's deployments in proportion to their weights, spread evenly: smooth weighted
    round robin (each pick adds every weight to its target's credit and takes the largest),
    so 80/20 is exactly 8 in every 10, interleaved, however few requests come."""

    __slots__ = ("_credit", "_total", "_weights", "sent", "to")

    def __init__(self, route: RouteConfig) -> None:
        self.to = dict(route.to)
        self._weights = list(route.to.items())
        self._total = sum(route.to.values())
        self._credit = dict.fromkeys(route.to, 0)
        self.sent = dict.fromkeys(route.to, 0)  # requests sent to each, since applied

    def pick(self) -> str:
        credit = self._credit
        for name, weight in self._weights:
            credit[name] += weight
        best = max(credit, key=credit.__getitem__)
        credit[best] -= self._total
        self.sent[best] += 1
        return best


class Routers(Mapping[str, Router]):
    def __init__(self, config: Config, *, send_client: Callable[[list[Any]], bool],
                 send_worker: Callable[[list[Any]], bool], tell: Callable[[RouterReport], None],
                 defer: Callable[[Callable[[], None]], object] | None = None,
                 listening_since: Callable[[], float] = lambda: float("-inf")) -> None:
        next_rid = itertools.count(1).__next__  # request ids, unique across deployments
        # (client identity, client id) -> request id, for every deployment: a client's ids
        # are unique per connection, not per deployment.
        self.clients: dict[tuple[bytes, Any], int] = {}
        # world id -> the router of its deployment: where a world's answers go.
        self.by_world: dict[int, Router] = {}

        def router(dep: DeploymentConfig) -> Router:
            return Router(dep, send_client=send_client, send_worker=send_worker,
                          next_rid=next_rid, tell=tell, inflight_ids=self.clients,
                          max_attempts=config.controller.max_attempts, defer=defer,
                          listening_since=listening_since)

        self._new = router
        self._by_name = {dep.name: router(dep) for dep in config.deployments}
        # The names a request may use: the deployments that take requests, and the routes.
        self._taking = dict(self._by_name)
        self.routes: dict[str, WeightedRoute] = {}
        self.set_routes(config.routes)

    @classmethod
    def of(cls, routers: Mapping[str, Router]) -> Routers:
        """Routers over ones built elsewhere (tests that drive a Frontend by hand)."""
        made = cls.__new__(cls)
        made.clients, made.by_world, made.routes = {}, {}, {}
        made._by_name, made._taking = dict(routers), dict(routers)
        return made

    def __getitem__(self, name: str) -> Router:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def resolve(self, name: str) -> Router | None:
        """The router that takes a request for ``name``: its deployment's, or for a route
        the next of its deployments by weight; None for a name that serves nothing."""
        router = self._taking.get(name)
        if router is None and name in self.routes:
            router = self._taking.get(self.routes[name].pick())
        return router

    def names(self) -> list[str]:
        """What a request may name (for an unknown one's error)."""
        return sorted([*self._taking, *self.routes])

    # -- what the WorldManager does to them --------------------------------------------------

    def add_world(self, route: RouteWorld) -> None:
        router = self._by_name[route.deployment]
        self.by_world[route.world_id] = router
        router.add_world(route.world_id, route.epoch, route.entry, route.members,
                         packed=route.packed, generative=route.generative)

    def drain_world(self, deployment: str, world_id: int) -> None:
        self._by_name[deployment].drain_world(world_id)

    def hold_world(self, deployment: str, world_id: int) -> None:
        self._by_name[deployment].hold_world(world_id)

    def remove_world(self, deployment: str, world_id: int, reason: str) -> int:
        """Forget a world's routes; returns how many of its requests were re-sent."""
        self.by_world.pop(world_id, None)
        return self._by_name[deployment].remove_world(world_id, reason)

    def set_unavailable(self, deployment: str, reason: str) -> None:
        self._by_name[deployment].set_unavailable(reason)

    def add_deployment(self, spec: DeploymentConfig) -> None:
        """An applied deployment (or one applied away and back while its router drained)."""
        router = self._by_name.get(spec.name)
        if router is None:
            router = self._by_name[spec.name] = self._new(spec)
        else:
            router.reconfigure(spec)
        self._taking[spec.name] = router

    def reconfigure(self, spec: DeploymentConfig) -> None:
        self._by_name[spec.name].reconfigure(spec)

    def retire(self, name: str) -> None:
        """Applied away: its name takes no new request; its router finishes what it holds."""
        self._taking.pop(name, None)

    def remove(self, name: str) -> None:
        """Its last world is gone."""
        self._taking.pop(name, None)
        self._by_name.pop(name, None)

    def set_routes(self, routes: Iterable[RouteConfig]) -> None:
        self.routes = {r.name: WeightedRoute(r) for r in routes}

    # -- the controller's timers and its stop ------------------------------------------------

    @property
    def busy(self) -> bool:
        """Some request is open (deadlines are checked more often then)."""
        return any(router.pending for router in self._by_name.values())

    def sweep(self) -> None:
        for router in self._by_name.values():
            router.sweep()

    def stop_accepting(self) -> None:
        for router in self._by_name.values():
            router.accepting = False

    @property
    def accepting(self) -> bool:
        return all(router.accepting for router in self._by_name.values())
