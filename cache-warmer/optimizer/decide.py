"""The cold-start optimizer's decisions, as pure functions (their effects go through a serving backend).

(a) a new revision: stage its weights before it scales up (the warmer does it on the revision event);
(b) from each model's recent requests, keep warm what is likely to be called soon, within a budget of
    memory (prewarmed weights) and of idle replicas;
(c) graph look-ahead: when a request enters an inference graph, the models of its later steps start at
    once, so their starts overlap with the earlier steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Demand:
    model: str
    request_times: tuple[float, ...]
    weight_bytes: int


@dataclass(frozen=True)
class Budget:
    memory_bytes: int = 0  # weights kept in memory (page cache or the DRAM tier)
    replicas: int = 0  # idle replicas kept up across all models


@dataclass(frozen=True)
class WarmPlan:
    stage: frozenset[str] = field(default_factory=frozenset)
    prewarm: frozenset[str] = field(default_factory=frozenset)
    keep_replica: frozenset[str] = field(default_factory=frozenset)


def call_probability(times: tuple[float, ...], now: float, window: float, horizon: float) -> float:
    """P(at least one call within `horizon`), for a Poisson rate measured over the last `window`."""
    recent = sum(1 for t in times if now - window <= t <= now)
    return 1 - math.exp(-(recent / window) * horizon)


def plan_keep_warm(demands: list[Demand], now: float, budget: Budget, window: float = 600, horizon: float = 300,
                   stage_at: float = 0.05, prewarm_at: float = 0.2, replica_at: float = 0.5) -> WarmPlan:
    """Likeliest first: staged above `stage_at`; prewarmed above `prewarm_at` while memory lasts; an idle
    replica kept above `replica_at` while the replica budget lasts."""
    ranked = sorted(((call_probability(d.request_times, now, window, horizon), d) for d in demands),
                    key=lambda pd: (-pd[0], pd[1].model))
    stage, prewarm, keep = set(), set(), set()
    memory, replicas = budget.memory_bytes, budget.replicas
    for p, d in ranked:
        if p >= stage_at:
            stage.add(d.model)
        if p >= prewarm_at and d.weight_bytes <= memory:
            prewarm.add(d.model)
            memory -= d.weight_bytes
        if p >= replica_at and replicas > 0:
            keep.add(d.model)
            replicas -= 1
    return WarmPlan(frozenset(stage), frozenset(prewarm), frozenset(keep))


def _targets(step: dict[str, Any]) -> tuple[str | None, str | None]:
    return step.get("serviceName"), step.get("nodeName")


def lookahead_models(graph: dict[str, Any], entered: str = "root") -> list[str]:
    """Every model (step `serviceName`) a request entering node `entered` may reach, nearest first.

    Switch branches are all included (the condition is only known later); Splitter steps with weight 0
    are left out. `graph` is a KServe InferenceGraph spec."""
    nodes = graph.get("nodes", {})
    seen_nodes, models = set(), []
    queue = [entered]
    while queue:
        name = queue.pop(0)
        if name in seen_nodes or name not in nodes:
            continue
        seen_nodes.add(name)
        node = nodes[name]
        for step in node.get("steps", []):
            if node.get("routerType") == "Splitter" and not step.get("weight"):
                continue
            service, child = _targets(step)
            if service and service not in models:
                models.append(service)
            if child:
                queue.append(child)
    return models
