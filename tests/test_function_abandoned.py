"""Clients that leave: every generation whose client is gone leaves the engine, streamed or not."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import requests

from conftest import LONG_CONTEXT, poll, start_function

CHAT = "/v1/chat/completions"
PROMPT = [{"role": "user", "content": "Say something."}]
# Generations that run for tens of seconds: each must be cancelled, not finish, however late the client's
# threads get the CPU (460 tokens, finished in under a second, once outran a busy machine's clients).
LONG = 32000


@pytest.fixture(scope="module")
def long_function(long_model, tmp_path_factory):
    running = start_function(long_model, tmp_path_factory.mktemp("logs"), max_model_len=LONG_CONTEXT)
    yield running
    running.server.stop()


def _abandon_stream(http: httpx.Client, url: str, body: dict) -> None:
    with http.stream("POST", url, json=body) as r:
        deadline = time.monotonic() + 0.2
        for _ in r.iter_raw():
            if time.monotonic() > deadline:
                break


def _abandon_whole(http: httpx.Client, url: str, body: dict) -> None:
    try:
        http.post(url, json=body, timeout=0.2)
    except httpx.TimeoutException:
        pass


def test_abandoned_requests_are_cancelled_in_the_engine(long_function):
    function = long_function
    body = {"model": "tiny", "messages": PROMPT, "max_tokens": LONG, "temperature": 0, "ignore_eos": True}
    cancelled = function.metric("thaw_requests_cancelled_total")
    # One client for all (making 16 clients at once costs the test process about a second of CPU).
    http = httpx.Client(timeout=10, limits=httpx.Limits(max_connections=32))
    threads = [threading.Thread(target=_abandon_stream, args=(http, function.url + CHAT, {**body, "stream": True}))
               for _ in range(8)]
    threads += [threading.Thread(target=_abandon_whole, args=(http, function.url + CHAT, body)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    http.close()
    # Every generation is cancelled (its client is gone) and leaves the engine; nothing stays in flight.
    poll(lambda: function.metric("thaw_requests_cancelled_total") - cancelled == 16, timeout=60, interval=0.05,
         what="16 requests cancelled")
    poll(lambda: function.metric("thaw_engine_requests") == 0, timeout=60, interval=0.05, what="engine emptied")
    poll(lambda: function.metric("thaw_requests_in_flight") == 0, timeout=60, interval=0.05, what="nothing in flight")
    r = requests.post(function.url + CHAT, json={"model": "tiny", "messages": PROMPT, "max_tokens": 8}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
