"""Shared by the locustfiles: one streamed OpenAI chat completion, timed chunk by chunk, reported as
locust request metrics. Imported only by locustfiles (which run under the `locust` command)."""

from __future__ import annotations

import json
import os
import time

CHAT = [{"role": "user", "content": os.environ.get("THAW_PROMPT", "Write one sentence about the sea.")}]
MAX_TOKENS = int(os.environ.get("THAW_MAX_TOKENS", "32"))


def model_weights(default: str = "smollm2") -> dict[str, int]:
    """THAW_MODELS="a:3,b:1" -> {"a": 3, "b": 1} (a model without a weight counts 1)."""
    out = {}
    for item in filter(None, (x.strip() for x in os.environ.get("THAW_MODELS", default).split(","))):
        name, _, weight = item.partition(":")
        out[name] = int(weight or 1)
    return out


def auth_headers() -> dict[str, str]:
    token = os.environ.get("THAW_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def stream_chat(user, model: str, max_tokens: int = MAX_TOKENS) -> dict | None:
    """POST a streamed chat completion; fire TTFT, ITL and tokens/s as request metrics (times in ms;
    the tokens/s entry carries the rate in its response_time field). Returns what was measured."""
    fire = user.environment.events.request.fire
    body = {"model": model, "messages": CHAT, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps, tokens, error, queued = [], 0, None, None
    with user.client.post("/v1/chat/completions", json=body, headers=auth_headers(), stream=True,
                          name=f"chat {model}", catch_response=True) as response:
        if response.status_code != 200:
            response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            return None
        queued = float(response.headers.get("X-Thaw-Queue-Seconds", "nan"))
        for line in response.iter_lines():
            if not line or not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"].get("message", "error")
                break
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                stamps.append(time.perf_counter())
        if error or not stamps:
            response.failure(error or "no tokens")
            return None
        response.success()
    total = time.perf_counter() - start
    ttft = stamps[0] - start
    itl = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    rate = tokens / (total - ttft) if total > ttft and tokens else 0.0
    for kind, value in (("TTFT", ttft * 1000), ("ITL", itl * 1000), ("tokens/s", rate)):
        fire(request_type=kind, name=model, response_time=value, response_length=tokens, exception=None,
             context={})
    return {"ttft": ttft, "itl": itl, "tokens_per_s": rate, "total": total, "queued": queued}
