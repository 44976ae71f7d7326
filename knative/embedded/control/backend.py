"""The cold-start optimizer's effects on the embedded plane (cache-warmer/optimizer/loop.py's ServingBackend): the
plane's own request history, a keep-warm floor under a revision's scale, warm requests as CloudEvents
into the local broker (its trigger takes them to the cache warmer, as on a cluster), start-ahead as a
request at zero would wake the revision."""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, Protocol

from thaw.cache_warmer.optimizer.decide import Demand
from thaw.eventing import events
from thaw.eventing.store import StoreError

from .revision import ModelRoutes, Revision, weight_bytes

log = logging.getLogger("thaw.optimizer")

SOURCE = "/thaw/optimizer"


class PlaneReads(Protocol):
    """What the backend reads of the serving plane (plane.py): its models, their calls, its route, its broker."""

    models: dict[str, ModelRoutes]
    calls: dict
    publish: Callable[..., Awaitable] | None

    def route(self, model: str, tag: str | None = None) -> Revision: ...


class EmbeddedBackend:
    def __init__(self, plane: PlaneReads):
        self.plane = plane

    def demands(self) -> list[Demand]:
        return [Demand(name, tuple(self.plane.calls.get(name, ())), weight_bytes(entry.model.source))
                for name, entry in self.plane.models.items() if entry.routes]

    def keep_replicas(self, models: frozenset[str]) -> None:
        for name, entry in self.plane.models.items():
            # one idle replica per kept model, on the revision that takes most of its traffic
            main = max(entry.routes, key=lambda r: r.percent).revision if entry.routes else None
            for rev in entry.revisions.values():
                rev.keep_warm = 1 if name in models and rev.name == main else 0

    async def warm(self, model: str) -> bool:
        if self.plane.publish is None:
            return True  # no broker, so no warmer: weights are staged when a replica starts
        try:
            await self.plane.publish(events.make_event(events.CACHE_WARM, SOURCE, {"model": model}))
        except StoreError as exc:  # a full disk: not warmed now, asked again at the next pass
            log.warning("could not ask to warm %s: %s", model, exc)
            return False
        return True

    def start_ahead(self, models: list[str]) -> list[str]:
        started = []
        for name in models:
            try:
                rev = self.plane.route(name)
            except KeyError:
                continue
            if rev.activator.wake():
                started.append(name)
        return started
