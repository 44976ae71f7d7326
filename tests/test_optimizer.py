"""Table tests of the cold-start optimizer's decisions."""

from __future__ import annotations

import pytest

from thaw.cache_warmer.optimizer.decide import Budget, Demand, call_probability, lookahead_models, plan_keep_warm

NOW = 10_000.0


def busy(model: str, calls: int, size: int = 100) -> Demand:
    return Demand(model, tuple(NOW - 1 - i for i in range(calls)), size)


@pytest.mark.parametrize("calls,expected", [(0, 0.0), (1, 1 - 2.718281828 ** -0.5), (60, 1.0)])
def test_call_probability(calls, expected):
    assert call_probability(busy("m", calls).request_times, NOW, 600, 300) == pytest.approx(expected, abs=1e-6)


def test_old_requests_do_not_count():
    assert call_probability((NOW - 700,), NOW, 600, 300) == 0


@pytest.mark.parametrize("demands,budget,stage,prewarm,keep", [
    ([busy("a", 0)], Budget(1000, 1), set(), set(), set()),  # never called: nothing
    ([busy("a", 1)], Budget(1000, 1), {"a"}, {"a"}, set()),  # p=0.39: staged and prewarmed, no replica
    ([busy("a", 10), busy("b", 1)], Budget(1000, 1), {"a", "b"}, {"a", "b"}, {"a"}),
    ([busy("a", 10, 600), busy("b", 5, 600)], Budget(1000, 2), {"a", "b"}, {"a"}, {"a", "b"}),  # memory for one
    ([busy("a", 10), busy("b", 20)], Budget(1000, 1), {"a", "b"}, {"a", "b"}, {"b"}),  # likeliest gets the replica
    ([busy("a", 10)], Budget(0, 0), {"a"}, set(), set()),  # no budget: stage only
])
def test_plan_keep_warm(demands, budget, stage, prewarm, keep):
    plan = plan_keep_warm(demands, NOW, budget)
    assert (set(plan.stage), set(plan.prewarm), set(plan.keep_replica)) == (stage, prewarm, keep)


GRAPH = {"nodes": {
    "root": {"routerType": "Sequence", "steps": [
        {"serviceName": "classifier"}, {"nodeName": "pick", "data": "$response"}]},
    "pick": {"routerType": "Switch", "steps": [
        {"serviceName": "small", "condition": "[@this].#(size==\"s\")"},
        {"nodeName": "mix", "condition": "[@this].#(size==\"l\")"}]},
    "mix": {"routerType": "Ensemble", "steps": [{"serviceName": "large", "name": "l"},
                                                {"serviceName": "small", "name": "s"}]},
    "canary": {"routerType": "Splitter", "steps": [{"serviceName": "v1", "weight": 100},
                                                   {"serviceName": "v2", "weight": 0}]},
}}


@pytest.mark.parametrize("entered,expected", [
    ("root", ["classifier", "small", "large"]),
    ("pick", ["small", "large"]),
    ("mix", ["large", "small"]),
    ("canary", ["v1"]),
    ("missing", []),
])
def test_lookahead(entered, expected):
    assert lookahead_models(GRAPH, entered) == expected
