"""KServe InferenceGraph: the pure routing decisions of KServe's router (`cmd/router`), over the graph
spec (thaw/graph_spec.py). The I/O that executes a graph is in router.py.

Where thaw differs from KServe's router, on purpose:
- A Sequence's first step with a `condition` evaluates it on the node's input (KServe has no previous
  response there and answers 500).
"""

from __future__ import annotations

import json

from thaw.graph_spec import InferenceStep
from thaw.json_body import NOT_JSON

from .gjson import exists_in_bytes

NO_SWITCH_MATCH = "None of the routes matched with the switch condition"


def pick_split(steps: list[InferenceStep], point: float) -> InferenceStep:
    """Splitter: the step whose weight band holds `point` (drawn uniformly from [0, 100))."""
    end = 0
    for step in steps:
        end += step.weight or 0
        if point < end:
            return step
    return steps[-1]


def pick_switch(steps: list[InferenceStep], node_input: bytes) -> InferenceStep | None:
    """Switch: the first step whose condition selects something in the node's input."""
    return next((s for s in steps if exists_in_bytes(node_input, s.condition)), None)


def sequence_input(step: InferenceStep, index: int, request: bytes, previous: bytes | None) -> bytes:
    """What step `index` of a Sequence is sent: the node's input, or the previous response (`$response`).
    With `mapPredictionsToInstances`, that body's `predictions` arrive as this step's `instances` (KServe:
    "maps the predictions field from the previous step's response to the instances field of this step's
    request"; for the first step, the node's input is what came before)."""
    body = previous if step.data == "$response" and index > 0 and previous is not None else request
    if not step.mapPredictionsToInstances:
        return body
    try:
        data = json.loads(body)
    except NOT_JSON:
        return body
    if not isinstance(data, dict) or "predictions" not in data:
        return body
    return json.dumps({"instances" if k == "predictions" else k: v for k, v in data.items()}).encode()


def condition_holds(step: InferenceStep, previous: bytes | None, request: bytes) -> bool:
    """A Sequence step runs when it has no condition or its condition selects something in the
    previous step's response (the node's input for the first step)."""
    return not step.condition or exists_in_bytes(previous if previous is not None else request, step.condition)


def ensemble_key(step: InferenceStep, index: int) -> str:
    return step.name or str(index)


def successful(status: int) -> bool:
    return 200 <= status <= 299

