"""The cold-start scenario: wait until the model is at zero (the platform's status), then a burst of
THAW_BURST requests at once; each request's first-response latency and how long the activator held it
(X-Thaw-Queue-Seconds) are locust request metrics ("first response", "queued"). Then the next round.

    THAW_MODELS=smollm2 THAW_BURST=32 locust -f loadtests/coldstart.py --headless -u 1 -r 1 -t 300s \\
        --host http://127.0.0.1:8080
One locust user drives the whole burst (gevent greenlets), so -u 1.
"""

from __future__ import annotations

import os
import time

import gevent
from locust import HttpUser, constant, task

from openai_user import auth_headers, model_weights, stream_chat

BURST = int(os.environ.get("THAW_BURST", "8"))
AT_ZERO_TIMEOUT = float(os.environ.get("THAW_AT_ZERO_TIMEOUT", "300"))


class ColdStartUser(HttpUser):
    wait_time = constant(0)

    def at_zero(self, model: str) -> bool:
        with self.client.get("/thaw/v1/status", headers=auth_headers(), name="status", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"status: HTTP {r.status_code}")
                return False
            r.success()
            rows = [m for m in r.json()["models"] if model in (m["name"], m.get("servedName"))]
            return bool(rows) and all(not any(rev["replicas"].values()) for rev in rows[0]["revisions"])

    @task
    def burst_at_zero(self):
        model = next(iter(model_weights()))
        deadline = time.monotonic() + AT_ZERO_TIMEOUT
        while not self.at_zero(model):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{model} did not reach zero within {AT_ZERO_TIMEOUT:g}s")
            gevent.sleep(1)
        fire = self.environment.events.request.fire
        start = time.perf_counter()

        def one():
            measured = stream_chat(self, model, max_tokens=4)
            if measured:
                fire(request_type="first response", name=model, response_time=measured["ttft"] * 1000,
                     response_length=0, exception=None, context={})
                fire(request_type="queued", name=model, response_time=measured["queued"] * 1000,
                     response_length=0, exception=None, context={})

        gevent.joinall([gevent.spawn(one) for _ in range(BURST)])
        fire(request_type="burst", name=model, response_time=(time.perf_counter() - start) * 1000,
             response_length=BURST, exception=None, context={})
