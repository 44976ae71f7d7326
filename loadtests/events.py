"""The event-driven scenario: dev.thaw.inference.request CloudEvents into the broker; the
dev.thaw.inference.response events come back through a trigger to a sink this process serves
(THAW_SINK_PORT, default 8899, on 127.0.0.1); each round trip is a locust request metric "event".

The spec needs a trigger to that sink, for example:
    triggers:
      - name: locust-sink
        filter: {attributes: {type: dev.thaw.inference.response}}
        subscriber: {uri: http://127.0.0.1:8899/}

    THAW_MODELS=smollm2 locust -f loadtests/events.py --headless -u 4 -r 4 -t 60s --host http://127.0.0.1:8080
"""

from __future__ import annotations

import json
import os
import time
import uuid

import gevent
from gevent.event import AsyncResult
from gevent.pywsgi import WSGIServer
from locust import HttpUser, between, events, task

from openai_user import CHAT, auth_headers, model_weights

SINK_PORT = int(os.environ.get("THAW_SINK_PORT", "8899"))
TIMEOUT = float(os.environ.get("THAW_EVENT_TIMEOUT", "120"))
NAMESPACE, BROKER = os.environ.get("THAW_NAMESPACE", "default"), os.environ.get("THAW_BROKER", "default")
waiting: dict[str, AsyncResult] = {}


def sink(environ, start_response):
    """Receives response events (binary mode): wakes the user waiting for that thawrequestid."""
    request_id = environ.get("HTTP_CE_THAWREQUESTID")
    body = environ["wsgi.input"].read()
    if request_id in waiting:
        waiting[request_id].set((time.perf_counter(), body))
    start_response("202 Accepted", [("Content-Length", "0")])
    return [b""]


@events.init.add_listener
def start_sink(environment, **kwargs):
    server = WSGIServer(("127.0.0.1", SINK_PORT), sink, log=None)
    gevent.spawn(server.serve_forever)


class EventUser(HttpUser):
    wait_time = between(0.1, 0.5)

    @task
    def inference_event(self):
        model = next(iter(model_weights()))
        event_id = uuid.uuid4().hex
        headers = {"ce-specversion": "1.0", "ce-id": event_id, "ce-source": "/locust", "ce-thawmodel": model,
                   "ce-type": "dev.thaw.inference.request", "Content-Type": "application/json", **auth_headers()}
        result = waiting[event_id] = AsyncResult()
        start = time.perf_counter()
        try:
            with self.client.post(f"/{NAMESPACE}/{BROKER}", data=json.dumps({"messages": CHAT, "max_tokens": 8}),
                                  headers=headers, name="broker ingress", catch_response=True) as r:
                if r.status_code != 202:
                    r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                    return
                r.success()
            try:
                arrived, body = result.get(timeout=TIMEOUT)
                exception = None
            except gevent.Timeout:
                arrived, body, exception = time.perf_counter(), b"", TimeoutError(f"no response event in {TIMEOUT:g}s")
            self.environment.events.request.fire(request_type="event", name=model,
                                                 response_time=(arrived - start) * 1000, response_length=len(body),
                                                 exception=exception, context={})
        finally:
            waiting.pop(event_id, None)
