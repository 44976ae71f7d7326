"""KServe InferenceGraph's spec as pydantic models, and its webhook's validation: the grammar thaw's spec
file and the router both read graphs with. The routing decisions are eventing/graph.py's."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ROOT = "root"
GRAPH_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class InferenceStep(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = ""
    nodeName: str = ""
    serviceName: str = ""
    serviceUrl: str = ""
    data: str = ""
    mapPredictionsToInstances: bool = False
    weight: int | None = None
    condition: str = ""
    dependency: Literal["Soft", "Hard"] = "Soft"

    @property
    def label(self) -> str:
        return self.name or self.nodeName or self.serviceName or self.serviceUrl


class InferenceRouter(BaseModel):
    model_config = ConfigDict(extra="allow")

    routerType: Literal["Sequence", "Splitter", "Ensemble", "Switch"]
    steps: list[InferenceStep] = []


class RouterTimeouts(BaseModel):
    """KServe's `routerTimeouts`, in seconds: the router's HTTP server (read a request, write an answer, keep
    an idle connection) and each call to a step (`serviceClient`; none by default)."""

    model_config = ConfigDict(extra="forbid")

    serverRead: int | None = Field(None, ge=1)
    serverWrite: int | None = Field(None, ge=1)
    serverIdle: int | None = Field(None, ge=1)
    serviceClient: int | None = Field(None, ge=1)


class InferenceGraphSpec(BaseModel):
    """The `spec` of an InferenceGraph. Scheduling fields (resources, affinity, ...) are kept, not used here."""

    model_config = ConfigDict(extra="allow")

    nodes: dict[str, InferenceRouter] = Field(default_factory=dict)
    routerTimeouts: RouterTimeouts = RouterTimeouts()
    timeout: int | None = Field(None, ge=1)  # seconds a request to the graph may take (its Knative timeoutSeconds)


class GraphInvalid(ValueError):
    """A graph KServe's webhook would refuse; `problems` has one message per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def parse_graph(name: str, spec: dict[str, Any]) -> InferenceGraphSpec:
    """Validate a graph as KServe's admission webhook does (plus references between nodes)."""
    try:
        graph = InferenceGraphSpec.model_validate(spec)
    except ValidationError as exc:
        raise GraphInvalid([f"InferenceGraph {name!r}: {'.'.join(map(str, e['loc']))}: {e['msg']}"
                            for e in exc.errors()]) from None
    problems = validate(name, graph)
    if problems:
        raise GraphInvalid(problems)
    return graph


def validate(name: str, graph: InferenceGraphSpec) -> list[str]:
    problems = []
    if not GRAPH_NAME.match(name):
        problems.append(f'The InferenceGraph "{name}" is invalid: a InferenceGraph name must consist of lower case '
                        "alphanumeric characters or '-', and must start with alphabetical character "
                        f"(regex used for validation is '{GRAPH_NAME.pattern[1:-1]}')")
    if ROOT not in graph.nodes:
        problems.append("root node not found, InferenceGraph needs a node with name 'root' as the root node of the graph")
    for node_name, node in graph.nodes.items():
        seen: set[str] = set()
        for i, step in enumerate(node.steps):
            if step.name and step.name in seen:
                problems.append(f'Node "{node_name}" of InferenceGraph "{name}" contains more than one step with '
                                f'name "{step.name}"')
            seen.add(step.name)
            targets = sum(bool(t) for t in (step.nodeName, step.serviceName, step.serviceUrl))
            if targets == 0:
                problems.append(f'Step {i} ("{step.name}") in node "{node_name}" of InferenceGraph "{name}" does '
                                "not specify an inference target")
            elif targets > 1:
                problems.append(f'Step {i} ("{step.name}") in node "{node_name}" of InferenceGraph "{name}" '
                                "specifies more than one of nodeName, serviceName, serviceUrl")
            if step.nodeName and step.nodeName not in graph.nodes:
                problems.append(f'Step {i} ("{step.name}") in node "{node_name}" of InferenceGraph "{name}" names '
                                f'node "{step.nodeName}", which the graph does not have')
            if step.data not in ("", "$request", "$response"):
                problems.append(f'Step {i} ("{step.name}") in node "{node_name}" of InferenceGraph "{name}": data '
                                f'must be "$request" or "$response", not "{step.data}"')
        if node.routerType == "Splitter":
            missing = [s for s in node.steps if s.weight is None]
            for step in missing:
                problems.append(f"InferenceGraph[{name}] Node[{node_name}] Route[{step.serviceName}] missing the 'Weight'")
            if not missing and sum(s.weight for s in node.steps) != 100:
                problems.append(f"InferenceGraph[{name}] Node[{node_name}] splitter node: the sum of traffic weights "
                                "for all routing targets should be 100")
    cycle = _cycle(graph)
    if cycle:
        problems.append(f"InferenceGraph {name!r}: nodes refer to each other in a loop: {' -> '.join(cycle)}")
    return problems


def _cycle(graph: InferenceGraphSpec) -> list[str]:
    def visit(node: str, path: list[str]) -> list[str]:
        if node in path:
            return path[path.index(node):] + [node]
        for step in graph.nodes.get(node, InferenceRouter(routerType="Sequence")).steps:
            if step.nodeName:
                found = visit(step.nodeName, path + [node])
                if found:
                    return found
        return []

    return next((c for c in (visit(n, []) for n in graph.nodes) if c), [])


# ---- routing decisions ---------------------------------------------------------------------------
