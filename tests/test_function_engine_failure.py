"""An engine that dies mid-stream: the stream ends with an error chunk and [DONE]; later requests get 500.

The engine core runs as its own process here (engine_core=mp) so the test can kill it for real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import psutil
import pytest
import requests

from conftest import LONG_CONTEXT, start_function


# Run as `python -c BURSTS PID METRICS_URL BEFORE`: lets the stopped process PID run 20 ms at a time until the
# replica's thaw_generated_tokens_total passes BEFORE, then kills it while stopped (exit 1: no token in 240 s;
# killed whatever happens, so the stream always ends).
BURSTS = """
import os, signal, sys, time, urllib.request
pid, url, before = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
def tokens():
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return next(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("thaw_generated_tokens_total "))
made, end = False, time.monotonic() + 240
try:
    while not made and time.monotonic() < end:
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.02)  # the burst itself
        os.kill(pid, signal.SIGSTOP)
        made = tokens() > before
finally:
    os.kill(pid, signal.SIGKILL)
sys.exit(0 if made else 1)
"""

# A generation far longer than the test needs: the engine core runs it only in short bursts until the client has
# its first token (test below), so however slowly a busy machine runs the client, the kill lands mid-generation.
LONG = 32000


@pytest.fixture(scope="module")
def mp_function(long_model, tmp_path_factory):
    running = start_function(long_model, tmp_path_factory.mktemp("logs"), engine_core="mp",
                             max_model_len=LONG_CONTEXT)
    yield running
    running.server.stop()


def engine_core_process(function) -> psutil.Process:
    """The engine-core process the replica itself reports (its /readyz), checked by vLLM's name for it."""
    pid = requests.get(function.url + "/readyz", timeout=10).json()["engine_pid"]
    core = psutil.Process(pid)
    assert core.name() == "VLLM::EngineCore"
    return core


def test_engine_death_mid_stream_gives_error_chunk_then_done(mp_function):
    url = mp_function.url + "/v1/chat/completions"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": LONG,
            "ignore_eos": True, "stream": True}
    events = []
    core = engine_core_process(mp_function)
    # On a busy 2-core machine the client can fall far behind an engine that runs free (once under load, all
    # 32000 tokens went into the socket's buffers before the kill). So the engine core is held stopped and let
    # run 20 ms at a time until the replica has handed a token to the response (its own counter, read while the
    # core is stopped), then killed while stopped: mid-generation, whenever the client reads. The bursts run in
    # a process of their own, so that reading the stream here never delays the end of a burst.
    before = mp_function.metric("thaw_generated_tokens_total")
    os.kill(core.pid, signal.SIGSTOP)
    # The engine core and its worker at the lowest priority (they are killed below): a burst must get the CPU
    # back from them when it ends. At the same priority, 20 ms bursts lasted 53 s and 77 s on a loaded 2-core
    # machine (load 18; vLLM's CPU worker spins while it waits), and the engine ran to the end meanwhile.
    for process in [core, *core.children(recursive=True)]:
        for thread in process.threads():  # a nice value is a thread's own on Linux
            os.setpriority(os.PRIO_PROCESS, thread.id, 19)
    bursts = subprocess.Popen([sys.executable, "-c", BURSTS, str(core.pid), mp_function.url + "/metrics", str(before)])
    with httpx.stream("POST", url, json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert bursts.wait(300) == 0, "no token within 240 s of bursts"
    core.wait(10)  # gone (not our child: psutil cannot tell the exit status)
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
