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

from conftest import LONG_CONTEXT, poll, start_function


# A generation that cannot finish before the kill lands: on a busy 2-core machine the test's own process can
# starve for seconds while the engine runs on (all of 2000 tokens once finished first in CI), so the generation
# runs for tens of seconds; the kill comes at the first token read.
LONG = 32000


@pytest.fixture(scope="module")
def mp_function(long_model, tmp_path_factory):
    running = start_function(long_model, tmp_path_factory.mktemp("logs"), engine_core="mp",
                             max_model_len=LONG_CONTEXT)
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
            if not killed:
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


@pytest.mark.parametrize("exitcode, oom, said", [
    (-9, True, "killed by SIGKILL (the kernel's OOM killer: host memory ran out)"),
    (-9, False, "killed by SIGKILL"),
    (-11, None, "killed by SIGSEGV"),
    (1, False, "exited with code 1"),
    (None, None, "exited, its status unknown"),
])
def test_an_engine_core_death_is_told_by_its_cause(exitcode, oom, said):
    from thaw.functions.engine_watch import death_cause

    assert death_cause(exitcode, oom) == said
