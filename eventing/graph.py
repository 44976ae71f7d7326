"""KServe InferenceGraph: the pure routing decisions of KServe's router (`cmd/router`), over the graph
spec (thaw/graph_spec.py). The I/O that executes a graph is in router.py.

Where thaw differs from KServe's router, on purpose:
- A Sequence's first step with a `condition` evaluates it on the node's input (KServe has no previous
  response there and answers 500).
- Graphs speak OpenAI (KServe's router knows no OpenAI shapes; thaw's steps are OpenAI models): a step that
  names a model gets the body with that model's name (`model_step_body`), and `$response` after a chat or
  completions step, in a graph asked in OpenAI's shape, is a request the next step can take
  (`openai_step_input`). Any other body is passed as KServe passes it.
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


def openai_step_input(request: bytes, previous: bytes) -> bytes | None:
    """The next step's request after an OpenAI answer: the graph's request (an OpenAI chat or completions
    request) with its input replaced by the text of the previous answer's first choice: `messages` becomes one
    user message with that text, `prompt` becomes that text; every other field is kept. None when the
    request or the answer is not in OpenAI's shape."""
    try:
        asked, answer = json.loads(request), json.loads(previous)
    except NOT_JSON:
        return None
    if not (isinstance(asked, dict) and isinstance(answer, dict) and answer.get("choices")):
        return None
    choice = answer["choices"][0] if isinstance(answer["choices"], list) else None
    if answer.get("object") == "chat.completion" and isinstance(choice, dict):
        text = (choice.get("message") or {}).get("content")
    elif answer.get("object") == "text_completion" and isinstance(choice, dict):
        text = choice.get("text")
    else:
        return None
    if not isinstance(text, str):
        return None
    if "messages" in asked:
        return json.dumps({**asked, "messages": [{"role": "user", "content": text}]}).encode()
    if "prompt" in asked:
        return json.dumps({**asked, "prompt": text}).encode()
    return None


def model_step_body(body: bytes, model: str, last: bool) -> bytes:
    """The body a step gets from a model (`serviceName`): the model's own name in `model` (the graph's
    caller named the graph, or another step's model), and no `stream` unless it is the step whose answer is
    the graph's (earlier answers are read whole, to feed the steps after them). Not a JSON object: as it is."""
    try:
        data = json.loads(body)
    except NOT_JSON:
        return body
    if not isinstance(data, dict):
        return body
    data["model"] = model
    if not last:
        data.pop("stream", None)
        data.pop("stream_options", None)
    return json.dumps(data).encode()


def sequence_input(step: InferenceStep, index: int, request: bytes, previous: bytes | None) -> bytes:
    """What step `index` of a Sequence is sent: the node's input, or the previous response (`$response`).
    With `mapPredictionsToInstances`, that body's `predictions` arrive as this step's `instances` (KServe:
    "maps the predictions field from the previous step's response to the instances field of this step's
    request"; for the first step, the node's input is what came before). After an OpenAI answer, in a graph
    asked in OpenAI's shape, `$response` is `openai_step_input`'s request."""
    body = previous if step.data == "$response" and index > 0 and previous is not None else request
    if body is previous and not step.mapPredictionsToInstances:
        return openai_step_input(request, previous) or body
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

