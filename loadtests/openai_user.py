"""The locust OpenAI user's one request: a streamed chat completion, timed chunk by chunk, reported as
locust request metrics in vLLM's `vllm bench serve` language (metrics.py): TTFT, TPOT, ITL (each gap),
E2EL, tokens/s, and "cold TTFT" for a request that found its revision at zero or parked. When locust
quits, the whole run's report (p50/p90/p99, goodput against THAW_GOODPUT="ttft:MS tpot:MS") is printed
and, with THAW_REPORT=FILE.json, written as JSON, with the TTFT distribution beside it as FILE.png. Imported only by locustfiles (which run under `locust`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from locust import events

from metrics import RequestRecord, parse_goodput, report, report_table
from plots import plot_ttft

CHAT = [{"role": "user", "content": os.environ.get("THAW_PROMPT", "Write one sentence about the sea.")}]
MAX_TOKENS = int(os.environ.get("THAW_MAX_TOKENS", "32"))
RECORDS: list[RequestRecord] = []
_started = time.perf_counter()


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
    """POST a streamed chat completion; fire its metrics (times in ms; tokens/s carries the rate in its
    response_time field). Returns what was measured, None if it failed."""
    fire = user.environment.events.request.fire
    body = {"model": model, "messages": CHAT, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    record = RequestRecord(time.perf_counter())
    error, queued = None, None
    with user.client.post("/v1/chat/completions", json=body, headers=auth_headers(), stream=True,
                          name=f"chat {model}", catch_response=True) as response:
        if response.status_code != 200:
            record.ok = False
            RECORDS.append(record)
            response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            return None
        queued = float(response.headers.get("X-Thaw-Queue-Seconds", "nan"))
        record.cold = response.headers.get("X-Thaw-Cold-Start")
        for line in response.iter_lines():
            error = record.read_line(line)
            if error:
                break
        record.ok = bool(record.chunks) and not error
        RECORDS.append(record)  # only once it ended: a request cut off when locust stops is not counted
        if not record.ok:
            response.failure(error or "no tokens")
            return None
        response.success()
    rate = record.output_tokens / (record.e2el - record.ttft) if record.e2el > record.ttft else 0.0
    metrics = [("TTFT", record.ttft * 1000), ("E2EL", record.e2el * 1000), ("tokens/s", rate)]
    metrics += [("ITL", gap * 1000) for gap in record.itls]
    if record.tpot is not None:
        metrics.append(("TPOT", record.tpot * 1000))
    if record.cold:
        metrics.append(("cold TTFT", record.ttft * 1000))
    for kind, value in metrics:
        fire(request_type=kind, name=model, response_time=value, response_length=record.output_tokens,
             exception=None, context={})
    return {"ttft": record.ttft, "tpot": record.tpot, "tokens_per_s": rate, "e2el": record.e2el,
            "queued": queued, "cold": record.cold}


@events.test_start.add_listener
def _start(environment, **kwargs):
    global _started
    _started = time.perf_counter()


@events.quitting.add_listener
def _report(environment, **kwargs):
    if not RECORDS:
        return
    result = report(RECORDS, time.perf_counter() - _started, parse_goodput(os.environ.get("THAW_GOODPUT", "")))
    print(report_table(result), flush=True)
    if os.environ.get("THAW_REPORT"):
        path = Path(os.environ["THAW_REPORT"])
        path.write_text(json.dumps(result, indent=1))
        plot_ttft({path.stem: result}, path.with_suffix(".png"))
