"""The engine pool in `thaw up` (knative/embedded/control/engine_pool.py): with `parking.enginePool: 1`, an engine
of the two models' shape is built ahead; the first request to a model at zero is answered by adopting it (no
engine start on its path), and the pool builds another for the next model."""

from __future__ import annotations

import os
import signal

import openai
import pytest
import requests

from conftest import other_model, poll, thaw_cli, thaw_up
from thaw.launch import free_port


@pytest.fixture(scope="module")
def plane(tiny_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("pool-plane")
    a, b = other_model(tiny_model, work / "a", 1), other_model(tiny_model, work / "b", 2)
    port = free_port()
    models = [{"name": name, "source": str(path), "engine": {"max_model_len": 512}, "scaling": {"window": "6s"}}
              for name, path in (("a", a), ("b", b), ("c", b))]
    spec = {"platform": {"gateway": {"port": port}, "stateDir": str(work / "state"),
                         "autoscaler": {"tick-interval": "1s"}, "parking": {"enginePool": 1},
                         "node": {"memory": "64Gi", "systemReserved": "0%"}},
            "models": models}
    with thaw_up(work, spec, deadline_s=30) as (url, _):
        yield url


def status(url: str) -> dict:
    return requests.get(url + "/thaw/v1/status", timeout=10).json()


def waiting(url: str) -> int:
    pool = status(url)["engine_pool"]
    return len(pool[0]["waiting"]) if pool else 0


def timeline(url: str, model: str) -> dict:
    return next(m for m in status(url)["models"] if m["name"] == model)["revisions"][0]["last_start_timeline"]


def test_a_model_at_zero_adopts_the_waiting_engine_and_the_pool_builds_another(plane):
    poll(lambda: waiting(plane) == 1, 240, 0.2, "an engine waiting in the pool")
    [shape] = status(plane)["engine_pool"]
    assert shape["launchedAs"].startswith("a-")  # one shape for both models: launched as the first
    client = openai.OpenAI(base_url=plane + "/v1", api_key="unused", max_retries=0, timeout=120)
    out = client.completions.create(model="b", prompt="hello", max_tokens=8, temperature=0)
    assert out.model == "b" and out.usage.completion_tokens == 8
    # no engine started on the request's path: the start was an adoption
    events = timeline(plane, "b")
    assert "adopted" in events and "launched" not in events, events
    [pod] = next(m for m in status(plane)["models"] if m["name"] == "b")["revisions"][0]["pods"]
    assert pod["state"] == "ready"
    # the adoption route is the plane's alone: not through the gateway
    r = requests.post(plane + "/models/b/thaw/adopt", json={}, timeout=10)
    assert r.status_code == 404
    # the pool builds another, which the next model adopts
    poll(lambda: waiting(plane) == 1, 240, 0.2, "the pool refilled")
    out = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert out.model == "a"
    assert "adopted" in timeline(plane, "a")
    assert status(plane)["engine_pool"][0]["adopted"] == 2
    shown = thaw_cli("status", "--url", plane)
    assert shown.returncode == 0 and "engine pool, a-" in shown.stdout and "adopted so far: 2" in shown.stdout


def test_a_waiting_engine_that_dies_is_replaced_and_a_start_meanwhile_waits_for_the_new_one(plane):
    poll(lambda: waiting(plane) == 1, 240, 0.2, "an engine waiting in the pool")
    [engine] = status(plane)["engine_pool"][0]["waiting"]
    os.kill(engine["pid"], signal.SIGKILL)
    poll(lambda: status(plane)["engine_pool"][0]["starting"], 60, 0.05, "another engine being built")
    # a model at zero asked for now waits for the engine being built and adopts it, rather than launching
    client = openai.OpenAI(base_url=plane + "/v1", api_key="unused", max_retries=0, timeout=240)
    out = client.completions.create(model="c", prompt="hello", max_tokens=4, temperature=0)
    assert out.model == "c"
    events = timeline(plane, "c")
    assert "adopted" in events and "launched" not in events, events
    poll(lambda: waiting(plane) == 1, 240, 0.2, "the pool refilled")
