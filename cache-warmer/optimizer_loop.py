"""The cold-start optimizer at work: its pure decisions (optimizer.py) applied through a serving backend
(knative/backend.py), so the same loop drives the embedded plane and a cluster."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from kubernetes.utils import parse_quantity

from thaw.durations import parse_duration

from .optimizer import Budget, lookahead_models, plan_keep_warm

log = logging.getLogger("thaw.optimizer")


async def keep_warm_loop(backend, settings: Callable[[], Any]) -> None:
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


def graph_look_ahead(backend) -> Callable[[str, Any], None]:
    """(c) for the graph router's `on_begin`: a request entering a graph starts the graph's models."""
    def begin(name: str, graph) -> None:
        started = backend.start_ahead(lookahead_models(graph.model_dump(exclude_defaults=True)))
        if started:
            log.info("graph %s: starting %s ahead of their steps", name, ", ".join(started))
    return begin
