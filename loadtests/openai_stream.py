"""OpenAI streaming users: each picks a model by weight (THAW_MODELS="a:3,b:1") and streams a chat
completion; TTFT, inter-token latency and output tokens/s are locust request metrics.

    locust -f loadtests/openai_stream.py --headless -u 16 -r 4 -t 60s --host http://127.0.0.1:8080
Works against `thaw up` and against a cluster URL (one Knative Service: set THAW_MODELS to its model).
"""

from __future__ import annotations

import random

from locust import HttpUser, between, task

from sse import model_weights, stream_chat


class OpenAIStreamUser(HttpUser):
    wait_time = between(0.1, 0.5)

    def on_start(self):
        weights = model_weights()
        self.models, self.weights = list(weights), list(weights.values())

    @task
    def chat(self):
        stream_chat(self, random.choices(self.models, self.weights)[0])
