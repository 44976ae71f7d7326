"""OpenAI streaming users: each picks a model by weight (THAW_MODELS="a:3,b:1") and streams a chat
completion; TTFT, TPOT, ITL, E2EL and tokens/s are locust request metrics (vLLM's definitions:
metrics.py), with a p50/p90/p99 and goodput report at the end (THAW_GOODPUT="ttft:500 tpot:50").
Arrivals: each user waits 0.1-0.5 s between requests, or, with THAW_RATE=R, a Poisson process of R
requests/s per user (exponential waits, as `vllm bench serve --request-rate`).

    locust -f loadtests/openai_stream.py --headless -u 16 -r 4 -t 60s --host http://127.0.0.1:8080
Works against `thaw up` and against a cluster URL (one Knative Service: set THAW_MODELS to its model).
"""

from __future__ import annotations

import os
import random

from locust import HttpUser, between, task

from openai_user import model_weights, stream_chat

RATE = float(os.environ.get("THAW_RATE", "0"))


class OpenAIStreamUser(HttpUser):
    wait_time = (lambda self: random.expovariate(RATE)) if RATE > 0 else between(0.1, 0.5)

    def on_start(self):
        weights = model_weights()
        self.models, self.weights = list(weights), list(weights.values())

    @task
    def chat(self):
        stream_chat(self, random.choices(self.models, self.weights)[0])
