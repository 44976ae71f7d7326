"""The CloudEvents route: an inference request event in, its response event out (binary or structured). The
event's data is an OpenAI request body: `messages` (chat), `prompt` (completions) or `input` (embeddings)."""

from __future__ import annotations

from flask import Blueprint, Response, request

from thaw.eventing import events

from . import protocol as p
from .service import FunctionService


def event_routes(service: FunctionService) -> Blueprint:
    routes = Blueprint("events", __name__)
    name = service.config.served_name

    @routes.post("/")
    def cloudevent():
        try:
            event = events.parse_http_event(request.headers, request.get_data())
        except events.InvalidEvent as exc:
            raise p.APIError(400, str(exc), code="invalid_cloudevent") from None
        if event.get_type() != events.INFERENCE_REQUEST:
            raise p.APIError(400, f"unsupported event type '{event.get_type()}': this function accepts "
                                  f"{events.INFERENCE_REQUEST}", code="unsupported_event_type")
        data = event.get_data()
        if not isinstance(data, dict):
            raise p.APIError(400, "the event's data must be an OpenAI request body (a JSON object)",
                             code="invalid_cloudevent")
        data = {"model": name, **data}
        if data.get("stream"):
            raise p.APIError(400, "streaming is not available through events", param="stream")
        if "input" in data:  # an embeddings request
            body = service.embed(data)
        else:
            kind = p.ChatCompletionRequest if "messages" in data else p.CompletionRequest
            body = service.complete(service.start(kind, data), request.environ)
        reply = events.make_event(events.INFERENCE_RESPONSE, f"/thaw/models/{name}", body,
                                  **{events.EXT_REQUEST_ID: events.request_id(event), events.EXT_MODEL: name})
        headers, payload = events.to_http(reply)
        return Response(payload, 200, headers)

    return routes
