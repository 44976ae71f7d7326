"""The cold-start optimizer at work: its pure decisions (optimizer.py) applied through a serving backend, so the
same loop drives the embedded plane (knative/embedded/control/backend.py) and a cluster
(knative/cluster/backend.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Protocol

from kubernetes.utils import parse_quantity

from thaw.durations import parse_duration

from .decide import Budget, Demand, lookahead_models, plan_keep_warm

log = logging.getLogger("thaw.optimizer")


class ServingBackend(Protocol):
    """What the optimizer drives in a serving backend."""

    def demands(self) -> list[Demand]:
        """Each routable model: its recent request times and the bytes its weights occupy."""

    def keep_replicas(self, models: frozenset[str]) -> None:
        """Keep one idle replica of each of these models (on its main revision), none for the others."""

    async def warm(self, model: str) -> bool:
        """Stage and prewarm the model's weights now; False if it could not be asked."""

    def start_ahead(self, models: list[str]) -> list[str]:
        """Start these models if nothing of theirs runs or starts; the ones started."""


async def keep_warm_loop(backend: ServingBackend, settings: Callable[[], Any]) -> None:
    """(b) every `interval`: keep warm what is likely to be called soon, within the budgets."""
    warmed: set[str] = set()
    while True:
        s = settings()
        await asyncio.sleep(parse_duration(s.interval))
        budget = Budget(int(parse_quantity(s.memoryBudget)), s.replicaBudget)
        if not budget.memory_bytes and not budget.replicas:
            continue
        plan = plan_keep_warm(backend.demands(), time.time(), budget, parse_duration(s.window),
                              parse_duration(s.horizon))
        backend.keep_replicas(plan.keep_replica)
        for name in sorted((plan.stage | plan.prewarm) - warmed):
            if await backend.warm(name):
                warmed.add(name)
        warmed &= plan.stage | plan.prewarm
        if plan.keep_replica:
            log.info("optimizer keeps warm: %s", ", ".join(sorted(plan.keep_replica)))


def graph_look_ahead(backend: ServingBackend) -> Callable[[str, Any], None]:
    """(c) for the graph router's `on_begin`: a request entering a graph starts the graph's models."""
    def begin(name: str, graph) -> None:
        started = backend.start_ahead(lookahead_models(graph.model_dump(exclude_defaults=True)))
        if started:
            log.info("graph %s: starting %s ahead of their steps", name, ", ".join(started))
    return begin
