"""Every deployment's router, and the two tables they share: which router a world's answers
go to, and which request a client's id names.

``Routers`` is a read-only mapping of deployment name to its Router (controller/router.py) for
the Frontend, status and metrics; the WorldManager changes routes through it (``add_world``,
``drain_world``, ``remove_world``...), and the Backend finds a world's router with ``by_world``
(a plain dict, read on every answer). The routers report back through the one ``tell`` they
are built with: the WorldManager's mailbox.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from controller.config import Config
from controller.effects import RouteWorld
from controller.mailbox import RouterReport
from controller.router import Router


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
        self._by_name = {dep.name: Router(
            dep, send_client=send_client, send_worker=send_worker, next_rid=next_rid,
            tell=tell, inflight_ids=self.clients, max_attempts=config.controller.max_attempts,
            defer=defer, listening_since=listening_since) for dep in config.deployments}

    def __getitem__(self, name: str) -> Router:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

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
