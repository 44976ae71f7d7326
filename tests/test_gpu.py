"""thaw on a GPU: vLLM's CUDA build through `thaw up`, the standby, parked replicas. Marked `gpu`: CI has no
GPU and deselects these (pyproject's addopts); on the GPU host run `.ci/gpu-host.sh python3 -m pytest -m gpu`.

The model is the demo model's shape with random weights, made on the host by ../shared/gpu/make_model.py
(THAW_GPU_SMALL_MODEL). Two models share one GPU, each claiming 60% of its memory, so both cannot be awake
at once: waking one must park the other first.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
import requests

from conftest import other_model, poll, thaw_up
from thaw.launch import ServerProcess, base_env, free_port
from thaw.vllm_platform import gpu_memory

pytestmark = pytest.mark.gpu

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _model_dir() -> Path:
    path = os.environ.get("THAW_GPU_SMALL_MODEL")
    assert path and Path(path, "config.json").exists(), "set THAW_GPU_SMALL_MODEL to a model folder (make_model.py)"
    return Path(path)


class Plane:
    def __init__(self, url: str, server: ServerProcess):
        self.url = url
        self.server = server
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)

    def revision(self, model: str) -> dict:
        status = requests.get(self.url + "/thaw/v1/status", timeout=10).json()
        return next(m for m in status["models"] if m["name"] == model)["revisions"][0]

    def pod(self, model: str, state: str) -> dict | None:
        return next((p for p in self.revision(model)["pods"] if p["state"] == state), None)

    def answer(self, model: str, max_tokens: int = 16) -> str:
        r = self.client.chat.completions.create(model=model, messages=CHAT, max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content


@contextlib.contextmanager
def _up(work: Path, models: list[dict], **platform) -> Iterator[Plane]:
    """`thaw up` on these models, once its standby is ready; stopped afterwards."""
    port = free_port()
    spec = {"platform": {"gateway": {"port": port}, "stateDir": str(work / "state"),
                         "cache": {"path": str(work / "cache")},
                         "autoscaler": {"scale-to-zero-grace-period": "1s", "tick-interval": "1s"}, **platform},
            "models": models}
    with thaw_up(work, spec) as (url, server):
        poll(lambda: requests.get(url + "/thaw/v1/status", timeout=5).json()["standby"], 180, 0.2, "standby ready")
        yield Plane(url, server)


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    engine = {"max_model_len": 1024, "enforce_eager": True, "gpu_memory_utilization": 0.6}
    with _up(tmp_path_factory.mktemp("gpu-plane"), [
            {"name": name, "source": str(_model_dir()), "engine": engine, "park": True, "standby": True,
             "scaling": {"window": "6s"}} for name in ("alpha", "beta")]) as up:
        yield up


def test_chat_from_zero_runs_on_the_gpu_in_a_replica_forked_from_the_standby(plane):
    assert plane.revision("alpha")["replicas"]["ready"] == 0
    text = plane.answer("alpha")
    assert text
    pod = plane.pod("alpha", "ready")
    assert pod["standby"] is True
    assert pod["gpu_bytes"] > 1 << 30  # weights, KV cache and CUDA context of this replica's own process


def test_streamed_equals_non_streamed_at_temperature_0(plane):
    whole = plane.answer("alpha", max_tokens=24)
    chunks = plane.client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=24, temperature=0,
                                                  stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole


def test_a_client_that_disconnects_cancels_its_request(plane):
    plane.answer("alpha", max_tokens=1)  # awake
    replica = f"http://127.0.0.1:{plane.pod('alpha', 'ready')['port']}"
    body = {"model": "alpha", "messages": CHAT, "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", plane.url + "/v1/chat/completions", json=body, timeout=60) as s:
        lines = s.iter_lines()
        for _ in range(4):
            next(lines)
        running = _metric(replica, "thaw_engine_requests")
    assert running == 1
    poll(lambda: _metric(replica, "thaw_engine_requests") == 0, 10, 0.1, "the engine dropped the request")


def test_a_parked_replica_releases_the_gpu_and_wakes_with_the_same_output(plane):
    before = plane.answer("alpha", max_tokens=32)
    held_awake = plane.pod("alpha", "ready")["gpu_bytes"]
    poll(lambda: plane.pod("alpha", "parked"), 60, 0.2, "alpha parked after its scale-to-zero")
    poll(lambda: plane.pod("alpha", "parked")["sleep_level"] == 1, 120, 0.2, "alpha's host copy built")
    parked = plane.pod("alpha", "parked")
    assert parked["gpu_bytes"] < held_awake / 4
    assert parked["gpu_bytes"] < 3 << 30  # the CUDA context and little else
    weights = sum(f.stat().st_size for f in _model_dir().glob("*.safetensors"))
    assert parked["host_copy_ready"] and weights - (1 << 20) < parked["host_copy_bytes"] <= weights  # tensors: the files less their headers
    memory = gpu_memory()
    assert memory.free > 0.9 * memory.total
    start = time.perf_counter()
    after = plane.answer("alpha", max_tokens=32)
    assert time.perf_counter() - start < 5
    assert after == before
    rev = plane.revision("alpha")
    assert rev["replicas"]["ready"] == 1 and rev["replicas"]["parked"] == 0
    assert "wake" in rev["last_start_phases"]
    assert plane.pod("alpha", "ready")["pid"] == parked["pid"]  # the same process, woken, not a new one


def test_waking_when_gpu_memory_is_short_parks_the_idle_model_first(plane):
    poll(lambda: plane.pod("alpha", "parked"), 60, 0.2, "alpha parked")
    assert plane.answer("beta")  # beta starts (60% of the GPU) while alpha sleeps
    beta = plane.pod("beta", "ready")
    assert plane.answer("alpha")  # alpha needs 60% too: beta is idle, so it is parked first
    assert plane.pod("alpha", "ready")
    parked_beta = plane.pod("beta", "parked")
    assert parked_beta and parked_beta["pid"] == beta["pid"]
    assert plane.answer("beta")  # and back: beta wakes, parking alpha
    assert plane.pod("alpha", "parked") and plane.pod("beta", "ready")


@pytest.fixture(scope="module")
def hibernating(tmp_path_factory):
    """A plane whose parking budget is 0: a replica at zero hibernates (sleep level 2: weights dropped)."""
    engine = {"max_model_len": 1024, "enforce_eager": True, "gpu_memory_utilization": 0.3}
    with _up(tmp_path_factory.mktemp("gpu-hibernate"), [
            {"name": "gamma", "source": str(_model_dir()), "engine": engine, "park": True,
             "containerConcurrency": 8, "scaling": {"window": "6s"}}], parking={"hostMemory": "0"}) as up:
        yield up


def test_weights_streamed_over_dummy_ones_answer_as_vllms_own_loader_does(hibernating):
    """The replica starts on dummy weights and streams the real ones in (functions/weights.py); vLLM's own
    loader, in a process of its own, must give the same greedy answer."""
    ours = hibernating.answer("gamma", max_tokens=24)
    assert _vllm_answer(_model_dir(), 24) == ours


def test_a_hibernated_replica_drops_its_weights_and_wakes_with_the_same_output(hibernating):
    before = hibernating.answer("gamma", max_tokens=32)
    held_awake = hibernating.pod("gamma", "ready")["gpu_bytes"]
    poll(lambda: hibernating.pod("gamma", "parked"), 60, 0.2, "gamma asleep after its scale-to-zero")
    asleep = hibernating.pod("gamma", "parked")
    assert asleep["sleep_level"] == 2 and hibernating.revision("gamma")["hibernated"] == 1
    weights = sum(f.stat().st_size for f in _model_dir().glob("*.safetensors"))
    assert held_awake - asleep["gpu_bytes"] >= weights  # the weights and the KV cache left the GPU
    assert asleep["host_copy_bytes"] == 0  # no host copy of the weights within a budget of 0
    after = hibernating.answer("gamma", max_tokens=32)
    assert after == before
    rev = hibernating.revision("gamma")
    assert rev["replicas"]["ready"] == 1 and rev["last_start_phases"]["wake_level"] == 2
    assert hibernating.pod("gamma", "ready")["pid"] == asleep["pid"]


def test_a_burst_at_a_sleeping_model_loses_nothing(hibernating):
    import asyncio

    # asleep after a first start of its own (the module's earlier tests may not have run)
    hibernating.answer("gamma", max_tokens=1)
    poll(lambda: hibernating.pod("gamma", "parked"), 60, 0.2, "gamma asleep")
    client = openai.AsyncOpenAI(base_url=hibernating.url + "/v1", api_key="none", max_retries=0, timeout=300)

    async def burst():
        return await asyncio.gather(*(client.chat.completions.create(model="gamma", messages=CHAT, max_tokens=8,
                                                                     temperature=0) for _ in range(12)))

    answers = asyncio.run(burst())
    assert len(answers) == 12 and len({a.choices[0].message.content for a in answers}) == 1


def _vllm_answer(model_dir: Path, max_tokens: int) -> str:
    """vLLM's own greedy answer to CHAT, its own loader, in a process of its own."""
    script = textwrap.dedent(f"""
        from vllm import LLM, SamplingParams
        llm = LLM(model={str(model_dir)!r}, enforce_eager=True, gpu_memory_utilization=0.2, max_model_len=1024)
        out = llm.chat({CHAT!r}, SamplingParams(max_tokens={max_tokens}, temperature=0))
        print("ANSWER=" + repr(out[0].outputs[0].text))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=400,
                          env=base_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"))
    line = next((l for l in done.stdout.splitlines() if l.startswith("ANSWER=")), None)
    assert line is not None, done.stderr[-3000:]
    return eval(line.removeprefix("ANSWER="))


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    """An engine pool of one for two models of the small shape with different weights (parking models: a waiting
    engine sleeps)."""
    work = tmp_path_factory.mktemp("gpu-pool")
    other = other_model(_model_dir(), work / "other", 7, std=0.02)
    engine = {"max_model_len": 1024, "enforce_eager": True, "gpu_memory_utilization": 0.3}
    models = [{"name": name, "source": str(path), "engine": engine, "park": True, "scaling": {"window": "6s"}}
              for name, path in (("pool-a", _model_dir()), ("pool-b", other))]
    with _up(work, models, parking={"enginePool": 1}) as up:
        up.other = other
        yield up


def test_a_model_at_zero_adopts_a_pooled_engine_and_answers_as_vllms_own_loader_does(pooled):
    def waiting() -> int:
        pool = requests.get(pooled.url + "/thaw/v1/status", timeout=10).json()["engine_pool"]
        return len(pool[0]["waiting"]) if pool else 0

    poll(lambda: waiting() == 1, 300, 0.5, "an engine waiting in the pool")
    answer = pooled.answer("pool-b", max_tokens=24)
    timeline = pooled.revision("pool-b")["last_start_timeline"]
    assert "adopted" in timeline and "launched" not in timeline, timeline
    assert answer == _vllm_answer(pooled.other, 24)
    # the pool builds another; the template's own model adopts it, with its own weights
    poll(lambda: waiting() == 1, 300, 0.5, "the pool refilled")
    assert pooled.answer("pool-a", max_tokens=24) == _vllm_answer(_model_dir(), 24)
    assert "adopted" in pooled.revision("pool-a")["last_start_timeline"]


def test_the_standby_refuses_to_fork_once_cuda_is_initialised(tmp_path):
    """A standby that has touched the GPU (here on purpose) must refuse to fork, saying why."""
    socket_path = tmp_path / "standby.sock"
    script = textwrap.dedent(f"""
        import torch
        torch.zeros(1, device="cuda")
        from thaw.knative.embedded.control.standby import serve_standby
        serve_standby({str(socket_path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=base_env(), stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "standby.log", "wb"), start_new_session=True)
    try:
        poll(socket_path.exists, 180, 0.2, "standby listening")
        from thaw.knative.embedded.control.standby import ReplicaLaunch, spawn_from_standby
        from thaw.launch import ReplicaBoot
        from thaw.spec import EngineArgs

        launch = ReplicaLaunch(ReplicaBoot(model_dir=str(tmp_path)), "m", EngineArgs(), 1)
        with pytest.raises(RuntimeError, match="initialised CUDA"):
            spawn_from_standby(socket_path, launch, dict(os.environ), tmp_path / "replica.log")
    finally:
        proc.kill()
        proc.wait()


# ---- many models on one GPU, reliably (issue 23) ------------------------------------------------------------

@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """Three models sharing the GPU (0.3 each), a parking budget for one host copy, and two that ask for the
    whole GPU (nvidia.com/gpu: 1, as KServe's manifests do)."""
    weights = sum(f.stat().st_size for f in _model_dir().glob("*.safetensors"))
    engine = {"max_model_len": 1024, "enforce_eager": True, "gpu_memory_utilization": 0.3}
    models = [{"name": name, "source": str(_model_dir()), "engine": engine, "park": True,
               "scaling": {"window": "6s"}} for name in ("m1", "m2", "m3")]
    models += [{"name": name, "source": str(_model_dir()), "park": True, "resources": {"gpu": 1},
                "engine": {**engine, "gpu_memory_utilization": 0.5}, "scaling": {"window": "6s"}}
               for name in ("whole1", "whole2")]
    with _up(tmp_path_factory.mktemp("gpu-node"), models,
             parking={"hostMemory": str(int(weights * 1.5)), "gpuContexts": 8}) as up:
        yield up


def _asleep(plane: Plane, model: str) -> dict:
    return poll(lambda: plane.pod(model, "parked"), 90, 0.2, f"{model} asleep")


def test_host_copies_stay_within_the_budget_and_the_most_recent_one_is_parked(node):
    for name in ("m1", "m2", "m3"):
        assert node.answer(name)
    asleep = {name: _asleep(node, name) for name in ("m1", "m2", "m3")}
    poll(lambda: node.pod("m3", "parked")["sleep_level"] == 1, 120, 0.2, "m3, the most recent, parked")
    status = requests.get(node.url + "/thaw/v1/status", timeout=10).json()
    weights = sum(f.stat().st_size for f in _model_dir().glob("*.safetensors"))
    assert status["host"]["host_copies"] <= 1.5 * weights  # one copy: the budget holds one
    assert status["host"]["available"] > status["host"]["floor"]
    assert [node.pod(n, "parked")["sleep_level"] for n in ("m1", "m2")] == [2, 2]
    r = node.client.chat.completions.with_raw_response.create(model="m3", messages=CHAT, max_tokens=4)
    assert r.headers["x-thaw-cold-start"] == "parked"
    r = node.client.chat.completions.with_raw_response.create(model="m1", messages=CHAT, max_tokens=4)
    assert r.headers["x-thaw-cold-start"] == "hibernated"
    assert node.pod("m1", "ready")["pid"] == asleep["m1"]["pid"]


def test_a_sleep_right_after_ready_hibernates_at_once_then_is_promoted_without_waking(node):
    """Its host copy was not built yet: the sleep never waits for pinning (a request may need its GPU room);
    the copy is built in the background, without the GPU, and the sleeper is parked."""
    _asleep(node, "m2")
    node.answer("m2")  # awake: the plan grants it a copy (most recent); going to sleep at once beats the build
    pod = _asleep(node, "m2")
    assert pod["park_seconds"] < 1.0
    promoted = poll(lambda: (p := node.pod("m2", "parked")) and p["sleep_level"] == 1 and p, 120, 0.2,
                    "m2 promoted to parked")
    assert promoted["pid"] == pod["pid"] and promoted["gpu_bytes"] < 3 << 30  # asleep all along


@pytest.mark.parametrize("rung", ["parked", "hibernated", "woken"])
def test_an_engine_core_killed_at_any_rung_is_seen_at_once_and_replaced(node, rung):
    import psutil

    model = "m3"
    node.answer(model)
    if rung == "woken":
        _asleep(node, model)
        node.answer(model)
        pod = node.pod(model, "ready")
    else:
        pod = _asleep(node, model)
        if rung == "parked":
            pod = poll(lambda: (p := node.pod(model, "parked")) and p["sleep_level"] == 1 and p, 120, 0.2, "parked")
        else:  # a copy dropped: hibernated
            r = requests.delete(f"http://127.0.0.1:{pod['port']}/host_copy", timeout=30)
            assert r.status_code == 200 and r.json()["level"] == 2
    core = next(p for p in psutil.Process(pod["pid"]).children(recursive=True) if p.name() == "VLLM::EngineCore")
    core.kill()
    start = time.monotonic()
    poll(lambda: all(p["pid"] != pod["pid"] for p in node.revision(model)["pods"]), 10, 0.05, "the replica gone")
    assert time.monotonic() - start < 3
    failure = poll(lambda: node.revision(model)["failure"], 10, 0.1, "its death shown in the status")
    assert "SIGKILL" in failure and pod["id"] in failure
    assert node.answer(model)  # a new replica from zero
    log = (Path(node.server.log_path).read_text())
    assert f"replica {pod['id']} died" in log


def test_a_sleep_succeeds_while_a_neighbour_takes_gpu_memory(node, tmp_path):
    """vLLM's own sleep asserts the whole device's free memory went up; a neighbour allocating at that moment
    broke it. thaw's sleep checks its own process's memory."""
    node.answer("m1")
    pod = node.pod("m1", "ready")
    script = textwrap.dedent("""
        import sys, time, torch
        blocks = []
        print("ready", flush=True)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            blocks.append(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
            if len(blocks) > 24:
                blocks.clear()
                torch.cuda.empty_cache()
    """)
    hog = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=base_env())
    try:
        assert hog.stdout.readline().strip() == "ready"
        for _ in range(3):
            r = requests.post(f"http://127.0.0.1:{pod['port']}/sleep?level=2", timeout=60)
            assert r.status_code == 200, r.text
            r = requests.post(f"http://127.0.0.1:{pod['port']}/wake_up", timeout=60)
            assert r.status_code == 200, r.text
    finally:
        hog.kill()
        hog.wait()
    assert node.answer("m1")


def test_models_asking_for_the_whole_gpu_share_it_through_sleep(node):
    """nvidia.com/gpu: 1 each, one GPU: awake, each has the device to itself; the other sleeps meanwhile."""
    assert node.answer("whole1")
    assert node.answer("whole2")
    assert node.pod("whole1", "parked") and node.pod("whole2", "ready")
    ready = [p for n in ("m1", "m2", "m3") for p in node.revision(n)["pods"] if p["state"] == "ready"]
    assert ready == []  # nothing else awake on its device
    assert node.answer("whole1")
    assert node.pod("whole2", "parked") and node.pod("whole1", "ready")


def _metric(url: str, name: str) -> float:
    for line in requests.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)
