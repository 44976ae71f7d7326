"""An engine that dies mid-stream: the stream ends with an error chunk and [DONE]; later requests get 500.

The engine core runs as its own process here (engine_core=mp) so the test can kill it for real.
"""

from __future__ import annotations

import json
import os
import signal

import httpx
import psutil
import pytest
import requests

from conftest import poll, start_function


# A generation long enough that it cannot finish before the kill lands, even when the test's own process
# gets little CPU beside the engine on a 2-core machine (460 tokens once finished first in CI).
MAX_MODEL_LEN = 2048
LONG = 2000


@pytest.fixture(scope="module")
def mp_function(tiny_model, tmp_path_factory):
    running = start_function(tiny_model, tmp_path_factory.mktemp("logs"), engine_core="mp",
                             max_model_len=MAX_MODEL_LEN)
    yield running
    running.server.stop()


def engine_core_process(function) -> psutil.Process:
    def find():
        return next((p for p in psutil.Process(function.server.pid).children(recursive=True)
                     if p.name() == "VLLM::EngineCore"), None)

    return poll(find, 10, what="engine core process")


def test_engine_death_mid_stream_gives_error_chunk_then_done(mp_function):
    url = mp_function.url + "/v1/chat/completions"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": LONG,
            "ignore_eos": True, "stream": True}
    events = []
    core = engine_core_process(mp_function)
    with httpx.stream("POST", url, json=body, timeout=30) as r:
        assert r.status_code == 200
        killed = False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 3 and not killed:
                os.kill(core.pid, signal.SIGKILL)
                killed = True
    assert events[-1] == "[DONE]"
    assert "error" in json.loads(events[-2]), f"{len(events)} events, ending {events[-3:]}"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "engine" in error["message"].lower()
    assert len(events) < LONG  # it ended early, it did not run on

    whole = requests.post(url, json={**body, "stream": False, "max_tokens": 4}, timeout=30)
    assert whole.status_code == 500
    assert whole.json()["error"]["code"] == "engine_failed"
    assert requests.get(mp_function.url + "/readyz", timeout=5).status_code == 503
    assert requests.get(mp_function.url + "/healthz", timeout=5).status_code == 500
