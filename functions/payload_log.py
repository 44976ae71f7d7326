"""Payload logging as CloudEvents, as KServe's logger sends them (`spec.predictor.logger`): each request and
its response, sharing one id, typed `org.kubeflow.serving.inference.request` / `.response`, with KServe's
extension attributes (`inferenceservicename`, `namespace`, `component`, `endpoint`, `metadata`,
`recordedtime`), to any sink URL (thaw's broker included, so triggers can route them).

It never delays or fails the request it logs: the request thread only puts the bytes on a bounded queue (a
stream's chunks are kept as they go out, and assembled into one whole answer, text and usage, by the sender
thread once the stream ends); one sender thread posts each event, retrying with backoff; every event is
counted by its outcome (`thaw_payload_log_events_total{outcome="sent|failed|dropped"}`), never raised. A body
larger than the limit is cut, with the `thawtruncated` attribute giving its full size; no header is logged but
those the spec names in `metadataHeaders`, and never credentials.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import requests
from cloudevents.core.v1.event import CloudEvent

log = logging.getLogger("thaw.function.payload_log")

REQUEST_TYPE = "org.kubeflow.serving.inference.request"
RESPONSE_TYPE = "org.kubeflow.serving.inference.response"
# thaw up gives its replicas a token for its own broker here: it may publish events, and reach no model
PAYLOAD_LOG_TOKEN_ENV = "THAW_PAYLOAD_LOG_TOKEN"
QUEUE_DEPTH = 1000  # events waiting for the sender; more are dropped (counted), never waited for
ATTEMPTS, BACKOFF = 3, 0.2  # sends of one event, and the first wait between them (doubling)
NEVER_LOGGED = frozenset({"authorization", "cookie", "proxy-authorization", "x-api-key"})


@dataclass(frozen=True)
class LoggerSettings:
    url: str  # the sink: any CloudEvents receiver, or thaw's broker ingress (/<namespace>/<broker>)
    mode: str = "all"  # all | request | response
    max_body_bytes: int = 1 << 20
    service: str = ""  # inferenceservicename: the model
    namespace: str = "default"
    component: str = "predictor"
    endpoint: str = "default"
    metadata_headers: tuple[str, ...] = ()
    token: str | None = None  # for thaw's own broker (a token that can publish but reach no model)


@dataclass
class _Item:
    kind: str  # request | response | stream
    id: str
    body: bytes | list[bytes]
    content_type: str
    metadata: dict = field(default_factory=dict)
    at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


def assemble_stream(chunks: list[bytes]) -> dict | None:
    """A streamed OpenAI answer made whole: each choice's text (or message), its finish reason, the usage,
    from the SSE chunks as they went out. None when they are not OpenAI chunks."""
    choices: dict[int, dict] = {}
    head, usage, error = None, None, None
    for line in b"".join(chunks).split(b"\n"):
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        try:
            chunk = json.loads(line[6:])
        except ValueError:
            continue
        if "error" in chunk:
            error = chunk["error"]
            continue
        head = head or chunk
        usage = chunk.get("usage") or usage
        for c in chunk.get("choices") or []:
            choice = choices.setdefault(c.get("index", 0), {"text": [], "finish_reason": None})
            delta = c.get("delta") or {}
            choice["text"].append(delta.get("content") or c.get("text") or "")
            choice["finish_reason"] = c.get("finish_reason") or choice["finish_reason"]
    if head is None:
        return {"error": error} if error else None
    chat = head.get("object") == "chat.completion.chunk"
    body = {"id": head.get("id"), "object": "chat.completion" if chat else "text_completion",
            "created": head.get("created"), "model": head.get("model"), "choices": [
                {"index": i, **({"message": {"role": "assistant", "content": "".join(c["text"])}} if chat
                                else {"text": "".join(c["text"])}), "finish_reason": c["finish_reason"]}
                for i, c in sorted(choices.items())], "usage": usage}
    if error:
        body["error"] = error
    return body


class PayloadLogger:
    def __init__(self, settings: LoggerSettings, metrics):
        """`metrics`: the function's (FunctionMetrics), whose payload_log counters this one feeds."""
        self.settings = settings
        self.metrics = metrics
        self._queue: queue.Queue[_Item] = queue.Queue(QUEUE_DEPTH)
        self._session = requests.Session()
        threading.Thread(target=self._run, name="payload-log", daemon=True).start()

    @property
    def logs_requests(self) -> bool:
        return self.settings.mode in ("all", "request")

    @property
    def logs_responses(self) -> bool:
        return self.settings.mode in ("all", "response")

    def new_id(self, headers) -> str:
        """The id a request and its response share: the caller's Ce-Id where it sent one (as KServe's)."""
        return headers.get("Ce-Id") or str(uuid.uuid4())

    def request(self, log_id: str, body: bytes, content_type: str, headers) -> None:
        if self.logs_requests:
            metadata = {name: headers.get(name) for name in self.settings.metadata_headers
                        if name.lower() not in NEVER_LOGGED and headers.get(name) is not None}
            self._put(_Item("request", log_id, body, content_type, metadata))

    def response(self, log_id: str, body: bytes, content_type: str) -> None:
        if self.logs_responses:
            self._put(_Item("response", log_id, body, content_type))

    def tee(self, log_id: str, chunks):
        """A stream's chunks, passed on as they come; once it ends (or its client left), logged whole."""
        if not self.logs_responses:
            yield from chunks
            return
        kept: list[bytes] = []
        try:
            for chunk in chunks:
                kept.append(chunk)
                yield chunk
        finally:
            self._put(_Item("stream", log_id, kept, "application/json"))

    def _put(self, item: _Item) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.metrics.payload_log.labels("dropped").inc()

    # ---- the sender thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                self._send(self._event(item))
            except Exception:  # noqa: BLE001 - a bad body must not end the sender
                log.exception("payload log: an event could not be built")
                self.metrics.payload_log.labels("failed").inc()

    def _event(self, item: _Item) -> CloudEvent:
        s = self.settings
        body, content_type = item.body, item.content_type
        if item.kind == "stream":
            whole = assemble_stream(body)
            body = json.dumps(whole).encode() if whole is not None else b"".join(body)
            content_type = "application/json" if whole is not None else "text/event-stream"
        attributes = {"id": item.id, "source": f"http://localhost/thaw/models/{s.service}", "specversion": "1.0",
                      "type": REQUEST_TYPE if item.kind == "request" else RESPONSE_TYPE, "time": item.at,
                      "datacontenttype": content_type or "application/json", "inferenceservicename": s.service,
                      "namespace": s.namespace, "component": s.component, "endpoint": s.endpoint,
                      "metadata": json.dumps(item.metadata), "recordedtime": item.at.isoformat()}
        if len(body) > s.max_body_bytes:
            attributes["thawtruncated"] = str(len(body))
            attributes["datacontenttype"] = "text/plain; charset=utf-8"
            body = body[:s.max_body_bytes]
        return CloudEvent(attributes, body)

    def _send(self, event: CloudEvent) -> None:
        from thaw.eventing.events import to_http

        headers, payload = to_http(event)
        if self.settings.token:
            headers["Authorization"] = f"Bearer {self.settings.token}"
        wait = BACKOFF
        for attempt in range(ATTEMPTS):
            try:
                r = self._session.post(self.settings.url, data=payload, headers=headers, timeout=10)
                if r.status_code < 300:
                    self.metrics.payload_log.labels("sent").inc()
                    return
                if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                    break  # the sink refuses it: sending it again would not change that
            except requests.RequestException:
                pass
            if attempt + 1 < ATTEMPTS:
                time.sleep(wait)
                wait *= 2
        self.metrics.payload_log.labels("failed").inc()
