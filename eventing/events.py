"""CloudEvent types thaw speaks, and strict parsing of CloudEvents from HTTP.

The `cloudevents` SDK fills in a missing `id` or `specversion` on its own; a receiver must not, since an
event without them is invalid (CloudEvents spec, required attributes). So the raw attributes are
checked first, then the SDK parses the message.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from cloudevents.core.bindings.http import HTTPMessage, from_http, to_binary_event, to_structured_event
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.v1.event import CloudEvent

from thaw.json_body import InvalidJSON, decode, first_invalid_text

INFERENCE_REQUEST = "dev.thaw.inference.request"
INFERENCE_RESPONSE = "dev.thaw.inference.response"
CACHE_WARM = "dev.thaw.cache.warm"
CACHE_STAGED = "dev.thaw.cache.staged"
CACHE_FAILED = "dev.thaw.cache.failed"
# ApiServerSource's Resource-mode types (the Revision events the serving plane and a cluster emit).
APISERVER_ADD = "dev.knative.apiserver.resource.add"
APISERVER_UPDATE = "dev.knative.apiserver.resource.update"
APISERVER_DELETE = "dev.knative.apiserver.resource.delete"

# The cache warmer's triggers on the default broker: name -> the event type each passes. `thaw render`
# writes them as Knative Triggers; `thaw up`'s local broker runs the same ones.
WARMER_TRIGGERS = {"thaw-cache-warmer-add": APISERVER_ADD, "thaw-cache-warmer-update": APISERVER_UPDATE,
                   "thaw-cache-warmer-warm": CACHE_WARM}

# Extensions: the request an event answers, and the model an inference request is for.
EXT_REQUEST_ID = "thawrequestid"
EXT_MODEL = "thawmodel"

REQUIRED = ("id", "source", "type", "specversion")
STRUCTURED_JSON = "application/cloudevents+json"


class InvalidEvent(ValueError):
    """Not a valid CloudEvent; the message says what is wrong."""


def _is_structured(headers: Mapping[str, str]) -> bool:
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    return content_type.split(";")[0].strip().lower() == STRUCTURED_JSON


def looks_like_event(headers: Mapping[str, str]) -> bool:
    """An HTTP message carrying a CloudEvent: binary mode (ce-specversion) or structured mode."""
    lowered = {k.lower(): v for k, v in headers.items()}
    return "ce-specversion" in lowered or _is_structured(lowered)


def request_id(event: CloudEvent) -> str:
    """The request an event belongs to: its `thawrequestid`, else its own id."""
    return event.get_extension(EXT_REQUEST_ID) or event.get_id()


def data_bytes(event: CloudEvent) -> bytes:
    """An event's data as a request body (JSON unless it already is bytes)."""
    data = event.get_data()
    return data if isinstance(data, bytes) else json.dumps(data).encode()


def parse_http_event(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    """A CloudEvent from an HTTP request in binary or structured mode; raises InvalidEvent."""
    headers = {k.lower(): v for k, v in headers.items()}
    if _is_structured(headers):
        try:
            raw = decode(body or b"")
        except InvalidJSON as exc:
            raise InvalidEvent(f"structured event body is {exc.message}") from None
        if not isinstance(raw, dict):
            raise InvalidEvent("structured event body must be a JSON object")
        present = set(raw)
    else:
        present = {k.removeprefix("ce-") for k in headers if k.startswith("ce-")}
        if not present:
            raise InvalidEvent("not a CloudEvent: no ce-* headers and not application/cloudevents+json")
        # Header bytes that are not UTF-8 reach us as lone surrogates; as attributes they could never be
        # sent on (a header), nor stored as text.
        bad = first_invalid_text({k: v for k, v in headers.items() if k.startswith("ce-")})
        if bad is not None:
            raise InvalidEvent(f"attribute {bad.removeprefix('ce-')!r} is not valid UTF-8 text")
        if body and "json" in headers.get("content-type", "").lower():
            try:
                decode(body)  # the SDK decodes JSON data with json.loads, which a deep nest crashes
            except InvalidJSON as exc:
                raise InvalidEvent(f"event data is {exc.message}") from None
    missing = [a for a in REQUIRED if a not in present]
    if missing:
        raise InvalidEvent(f"missing required attribute(s): {', '.join(missing)}")
    try:
        return from_http(HTTPMessage(headers=headers, body=body or b""), _json_format())
    except (BaseCloudEventException, ValueError, TypeError) as exc:
        raise InvalidEvent(f"invalid CloudEvent: {exc}") from None


def _json_format():
    from cloudevents.core.formats.json import JSONFormat

    return JSONFormat()


def make_event(type: str, source: str, data: Any = None, **extensions: Any) -> CloudEvent:
    attributes = {"type": type, "source": source, "datacontenttype": "application/json"}
    attributes.update({k: v for k, v in extensions.items() if v is not None})
    return CloudEvent(attributes, data)


def to_http(event: CloudEvent, structured: bool = False) -> tuple[dict[str, str], bytes]:
    """Headers and body of an event, in binary mode unless asked for structured."""
    message = to_structured_event(event) if structured else to_binary_event(event)
    return dict(message.headers), message.body
