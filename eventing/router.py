"""The inference-graph router: executes a KServe InferenceGraph over HTTP, as KServe's `cmd/router` does.

A request (JSON body) enters the `root` node; each node routes by its type (decisions in graph.py); the
answer is the last response, with its status. Errors use KServe's body
`{"error": "Failed to process request", "cause": ...}`.

Beyond KServe:
- A streaming answer (`text/event-stream`) from the step that produces the graph's answer (the last step
  of a Sequence, the chosen step of a Switch or Splitter) is streamed through, not buffered.
- A step's `serviceName` is a thaw model: its OpenAI route (chosen by the body: `messages` -> chat,
  `prompt` -> completions) with the model's own name in the body (graph.py's model_step_body), or, when the
  graph was called with a CloudEvent, its CloudEvents route. A Sequence asked in OpenAI's shape passes
  each answer on as the next step's request (graph.py's openai_step_input).
  A graph called with a CloudEvent answers with a `dev.thaw.inference.response` event.
- `on_begin(graph_name)` is called as a request enters, so the cold-start optimizer can start the
  graph's models at once (look-ahead).

Headers are propagated like KServe's router: those matching any regular expression of the
`PROPAGATE_HEADERS` environment variable (comma-separated). Calls to thaw models also carry the caller's
Authorization, since the gateway checks it per model.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Callable, Mapping

import aiohttp
from aiohttp import web
from cloudevents.core.v1.event import CloudEvent

from thaw.graph_spec import ROOT, InferenceGraphSpec, InferenceStep
from thaw.http_body import read_body
from thaw.json_body import NOT_JSON

from . import events
from .graph import (NO_SWITCH_MATCH, condition_holds, ensemble_key, model_step_body, pick_split, pick_switch,
                    sequence_input, successful)

PROPAGATE_HEADERS_ENV = "PROPAGATE_HEADERS"


def header_patterns(value: str | None = None) -> list[re.Pattern]:
    """Compile PROPAGATE_HEADERS (comma-separated regular expressions); a bad pattern is an error."""
    value = os.environ.get(PROPAGATE_HEADERS_ENV, "") if value is None else value
    patterns = []
    for text in (p.strip() for p in value.split(",")):
        if text:
            try:
                patterns.append(re.compile(text))
            except re.error as exc:
                raise ValueError(f"{PROPAGATE_HEADERS_ENV}: pattern {text!r} does not compile: {exc}") from None
    return patterns


class RoutingError(Exception):
    def __init__(self, status: int, cause: str):
        self.status = status
        super().__init__(cause)


@dataclass
class StepResult:
    body: bytes
    status: int
    content_type: str = "application/json"
    stream: aiohttp.ClientResponse | None = None  # an answer to stream through, still open
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Call:
    """What every step of one graph request shares."""

    headers: dict[str, str]
    event: CloudEvent | None
    stack: AsyncExitStack
    auth: str | None = None


def error_response(status: int, cause: str) -> web.Response:
    return web.json_response({"error": "Failed to process request", "cause": cause}, status=status)


class GraphRouter:
    def __init__(self, name: str, graph: InferenceGraphSpec, session: aiohttp.ClientSession, *,
                 models_url: str | None = None, patterns: list[re.Pattern] | None = None,
                 on_begin: Callable[[str], None] | None = None, timeout: float | None = None,
                 read_timeout: float | None = None):
        self.name = name
        self.graph = graph
        self.session = session
        self.models_url = models_url.rstrip("/") if models_url else None
        self.patterns = header_patterns() if patterns is None else patterns
        self.on_begin = on_begin
        # routerTimeouts.serverRead, else what the host serving the graph allows (thaw up: idleTimeout)
        self.read_timeout = graph.routerTimeouts.serverRead or read_timeout
        # A whole request may take the graph's `timeout`, and no longer than its answer may take to write.
        limits = [t for t in (graph.timeout, graph.routerTimeouts.serverWrite) if t]
        self.timeout = timeout or float(min(limits, default=300))
        step = graph.routerTimeouts.serviceClient
        self.step_timeout = aiohttp.ClientTimeout(total=step) if step else None

    # ---- HTTP ------------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await read_body(request, self.read_timeout)
        except (web.HTTPRequestEntityTooLarge, web.HTTPRequestTimeout) as exc:
            return error_response(exc.status, exc.text)
        event = None
        if events.looks_like_event(request.headers):
            try:
                event = events.parse_http_event(request.headers, body)
            except events.InvalidEvent as exc:
                return error_response(400, str(exc))
            body = events.data_bytes(event)
        if self.on_begin is not None:
            self.on_begin(self.name)
        async with AsyncExitStack() as stack:
            call = Call(self._propagated(request.headers), event, stack, request.headers.get("Authorization"))
            try:
                result = await asyncio.wait_for(self.route_node(ROOT, body, call, stream_ok=event is None),
                                                self.timeout)
            except RoutingError as exc:
                return error_response(exc.status, str(exc))
            except asyncio.TimeoutError:
                return error_response(504, f"the graph did not answer within {self.timeout:g}s")
            if result.stream is not None:
                return await _stream_through(request, result)
            if event is not None:
                return _reply_event(event, result, self.name)
            return web.Response(body=result.body, status=result.status, content_type=_mime(result.content_type))

    def _propagated(self, headers) -> dict[str, str]:
        out = {}
        for name, value in headers.items():
            if any(p.search(name) for p in self.patterns):
                out[name] = value
        return out

    # ---- routing ---------------------------------------------------------------------------------

    async def route_node(self, node_name: str, node_input: bytes, call: Call, stream_ok: bool) -> StepResult:
        node = self.graph.nodes[node_name]
        if node.routerType == "Splitter":
            return await self.execute_step(pick_split(node.steps, random.uniform(0, 100)), node_input, call, stream_ok)
        if node.routerType == "Switch":
            step = pick_switch(node.steps, node_input)
            if step is None:
                raise RoutingError(404, NO_SWITCH_MATCH)
            return await self.execute_step(step, node_input, call, stream_ok)
        if node.routerType == "Ensemble":
            return await self._ensemble(node.steps, node_input, call)
        return await self._sequence(node.steps, node_input, call, stream_ok)

    async def _sequence(self, steps: list[InferenceStep], node_input: bytes, call: Call,
                        stream_ok: bool) -> StepResult:
        result: StepResult | None = None
        for i, step in enumerate(steps):
            previous = result.body if result is not None else None
            if not condition_holds(step, previous, node_input):
                # An unmet condition ends the sequence with the response so far, and 200.
                return StepResult(previous if previous is not None else node_input, 200,
                                  result.content_type if result else "application/json")
            request = sequence_input(step, i, node_input, previous)
            result = await self.execute_step(step, request, call, stream_ok and i == len(steps) - 1)
            if step.dependency == "Hard" and not successful(result.status):
                return result
        return result or StepResult(node_input, 200)

    async def _ensemble(self, steps: list[InferenceStep], node_input: bytes, call: Call) -> StepResult:
        results = await asyncio.gather(*(self.execute_step(s, node_input, call, False) for s in steps))
        merged = {}
        for i, (step, result) in enumerate(zip(steps, results)):
            if step.dependency == "Hard" and not successful(result.status):
                return result  # the first failed hard dependency decides the answer
            try:
                merged[ensemble_key(step, i)] = json.loads(result.body)
            except NOT_JSON:
                raise RoutingError(500, f"step {ensemble_key(step, i)!r} answered with a body that is not JSON") from None
        return StepResult(json.dumps(merged).encode(), 200)

    async def execute_step(self, step: InferenceStep, step_input: bytes, call: Call, stream_ok: bool) -> StepResult:
        if step.nodeName:
            return await self.route_node(step.nodeName, step_input, call, stream_ok)
        if step.serviceUrl:
            return await self._post(step.serviceUrl, step_input, dict(call.headers), call, stream_ok)
        return await self._call_model(step.serviceName, step_input, call, stream_ok)

    async def _call_model(self, model: str, step_input: bytes, call: Call, stream_ok: bool) -> StepResult:
        if self.models_url is None:
            raise RoutingError(500, f"step targets model {model!r} but this router has no thaw gateway to reach it")
        headers = dict(call.headers)
        if call.auth:
            headers["Authorization"] = call.auth
        # thaw up's gateway (`/models/<m>`), or one URL per model on a cluster ("http://{model}.ns.svc...")
        base = (self.models_url.format(model=model) if "{model}" in self.models_url
                else f"{self.models_url}/models/{model}")
        if call.event is not None:
            try:
                data = json.loads(step_input)
            except NOT_JSON:
                raise RoutingError(400, f"the input of the step for model {model!r} is not JSON") from None
            step_event = events.make_event(events.INFERENCE_REQUEST, f"/thaw/graphs/{self.name}", data,
                                           **{events.EXT_REQUEST_ID: events.request_id(call.event),
                                              events.EXT_MODEL: model})
            event_headers, payload = events.to_http(step_event)
            result = await self._post(base + "/", payload, {**headers, **event_headers}, call, False)
            if successful(result.status):
                try:
                    result.body = events.data_bytes(events.parse_http_event(dict(result.headers), result.body))
                except events.InvalidEvent:
                    pass
            return result
        try:
            body = json.loads(step_input)
        except NOT_JSON:
            body = None
        route = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
        return await self._post(base + route, model_step_body(step_input, model, stream_ok), headers, call, stream_ok)

    async def _post(self, url: str, body: bytes, headers: dict[str, str], call: Call, stream_ok: bool) -> StepResult:
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
        try:
            response = await call.stack.enter_async_context(
                self.session.post(url, data=body, headers=headers,
                                  **({"timeout": self.step_timeout} if self.step_timeout else {})))
            content_type = response.headers.get("Content-Type", "application/json")
            if stream_ok and content_type.startswith("text/event-stream"):
                return StepResult(b"", response.status, content_type, stream=response)
            result = StepResult(await response.read(), response.status, content_type, headers=dict(response.headers))
            response.release()
            return result
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # ValueError: a URL aiohttp cannot parse
            raise RoutingError(500, f"calling {url}: {type(exc).__name__}: {exc}") from None


def _mime(content_type: str) -> str:
    return content_type.split(";")[0].strip() or "application/json"


async def _stream_through(request: web.Request, result: StepResult) -> web.StreamResponse:
    response = web.StreamResponse(status=result.status, headers={"Content-Type": result.content_type,
                                                                  "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        async for chunk in result.stream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientError):
        pass  # the client or the step went away; the exit stack closes the upstream
    return response


def _reply_event(request_event: CloudEvent, result: StepResult, graph: str) -> web.Response:
    try:
        data = json.loads(result.body)
    except NOT_JSON:
        data = result.body.decode("utf-8", "replace")
    reply = events.make_event(events.INFERENCE_RESPONSE, f"/thaw/graphs/{graph}", data,
                              **{events.EXT_REQUEST_ID: events.request_id(request_event), "thawgraph": graph,
                                 "thawstatus": str(result.status)})
    headers, payload = events.to_http(reply)
    status = result.status if not successful(result.status) else 200
    return web.Response(body=payload, status=status, headers=headers)


def router_app(router: GraphRouter) -> web.Application:
    """The standalone router (`thaw router`): POST / runs the graph; GET /readyz."""
    app = web.Application(client_max_size=32 << 20)
    async def readyz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/readyz", readyz)
    app.router.add_post("/", router.handle)
    app.router.add_post("/{tail:.*}", router.handle)
    return app

