"""The function's CloudEvents route: binary and structured mode, valid and invalid, with the SDK."""

from __future__ import annotations

import json

import pytest
import requests
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}


def inference_event(data, **extra) -> CloudEvent:
    return CloudEvent({"type": "dev.thaw.inference.request", "source": "/tests", "id": "req-1",
                       "datacontenttype": "application/json", **extra}, data)


def post(function, message) -> requests.Response:
    return requests.post(function.url + "/", data=message.body, headers=message.headers, timeout=30)


@pytest.mark.parametrize("encode", [to_binary_event, to_structured_event], ids=["binary", "structured"])
def test_inference_request_gets_a_response_event(function, encode):
    r = post(function, encode(inference_event({**CHAT, "model": "tiny"})))
    assert r.status_code == 200, r.text
    reply = from_http_event(HTTPMessage(dict(r.headers), r.content))
    assert reply.get_type() == "dev.thaw.inference.response"
    assert reply.get_extension("thawrequestid") == "req-1"
    data = reply.get_data()
    assert data["object"] == "chat.completion" and data["usage"]["completion_tokens"] == 4


def test_request_id_extension_is_carried_and_model_defaults(function):
    event = inference_event({"prompt": "x", "max_tokens": 2}, thawrequestid="abc")
    r = post(function, to_binary_event(event))
    reply = from_http_event(HTTPMessage(dict(r.headers), r.content))
    assert reply.get_extension("thawrequestid") == "abc"
    assert reply.get_data()["object"] == "text_completion"


def _binary_headers(**drop) -> dict:
    headers = {"ce-id": "1", "ce-source": "/t", "ce-type": "dev.thaw.inference.request", "ce-specversion": "1.0",
               "content-type": "application/json"}
    return {k: v for k, v in headers.items() if k not in drop.values()}


@pytest.mark.parametrize("headers,body,fragment", [
    (_binary_headers(a="ce-id"), json.dumps(CHAT), "id"),
    (_binary_headers(a="ce-source"), json.dumps(CHAT), "source"),
    (_binary_headers(a="ce-type"), json.dumps(CHAT), "type"),
    (_binary_headers(a="ce-specversion"), json.dumps(CHAT), "specversion"),
    ({"content-type": "application/cloudevents+json"}, "{broken", "JSON"),
    ({"content-type": "application/cloudevents+json"}, json.dumps({"source": "/t", "type": "x", "specversion": "1.0"}),
     "id"),
    ({"content-type": "application/json"}, json.dumps(CHAT), "not a CloudEvent"),
    ({**_binary_headers(), "ce-type": "com.example.other"}, json.dumps(CHAT), "unsupported event type"),
    (_binary_headers(), "not json at all", "event data is not valid JSON"),
    (_binary_headers(), json.dumps({"messages": "nope"}), "messages"),
    (_binary_headers(), json.dumps({**CHAT, "stream": True}), "stream"),
])
def test_invalid_events_get_400(function, headers, body, fragment):
    r = requests.post(function.url + "/", data=body, headers=headers, timeout=30)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]
