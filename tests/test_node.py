"""The machine as one Kubernetes node (knative/embedded/control/node.py): placement as a table, then a real
`thaw up` whose second replica does not fit and stays Pending with the scheduler's reason."""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import sys

import openai
import psutil
import pytest
import requests
import yaml

from conftest import poll
from thaw.knative.embedded.control.node import Claim, Node, Request, never_fits, node_of, place, shared_cores
from thaw.launch import ServerProcess, base_env, free_port

GiB = 1 << 30
NODE = Node(cores=(0, 1, 2, 3), memory=16 * GiB, gpus=(0, 1))


@pytest.mark.parametrize("request_, claims, held, expected", [
    # nothing asked: fits, holds nothing of its own
    (Request(), [], 0, Claim()),
    # whole cores of its own, the lowest free first; memory and GPUs as asked
    (Request(2000, 4 * GiB, 1), [], 0, Claim((0, 1), 4 * GiB, (0,))),
    (Request(2000), [Claim((0, 1))], 0, Claim((2, 3))),
    # a fractional request rounds up to a whole core
    (Request(500), [Claim((0, 1, 2))], 0, Claim((3,))),
    # not enough left: the scheduler's own message
    (Request(2000), [Claim((0, 1, 2))], 0, "0/1 nodes are available: 1 Insufficient cpu."),
    (Request(memory=10 * GiB), [Claim(memory=8 * GiB)], 0, "0/1 nodes are available: 1 Insufficient memory."),
    # parked replicas' pinned host RAM counts against memory
    (Request(memory=4 * GiB), [], 13 * GiB, "0/1 nodes are available: 1 Insufficient memory."),
    # GPUs are shared through sleep: the least claimed device, then the lowest; only more than the node has
    # is Pending (tests/test_parking.py's plan_gpu_room keeps an awake one's device its own)
    (Request(gpus=1), [Claim(gpus=(0,)), Claim(gpus=(1,))], 0, Claim(gpus=(0,))),
    (Request(gpus=1), [Claim(gpus=(0,)), Claim(gpus=(0,)), Claim(gpus=(1,))], 0, Claim(gpus=(1,))),
    (Request(gpus=2), [Claim(gpus=(0,))], 0, Claim(gpus=(0, 1))),
    (Request(gpus=3), [], 0, "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."),
    # several short at once: each named, in order
    (Request(8000, 32 * GiB, 4), [], 0,
     "0/1 nodes are available: 1 Insufficient cpu, 1 Insufficient memory, 1 Insufficient nvidia.com/gpu."),
])
def test_place(request_, claims, held, expected):
    assert place(request_, NODE, claims, held) == expected


@pytest.mark.parametrize("memory, reserved, allocatable", [
    ("16Gi", "10%", 16 * GiB - int(16 * GiB * 0.1)),  # the default: a tenth kept for the system
    ("16Gi", "2Gi", 14 * GiB),
    ("16Gi", "0%", 16 * GiB),
])
def test_the_nodes_memory_less_what_it_keeps_for_the_system(memory, reserved, allocatable):
    from thaw.spec import NodeResources

    assert node_of(NodeResources(memory=memory, systemReserved=reserved), (0,), 0, 0).memory == allocatable


@pytest.mark.parametrize("reserved", ["100%", "-1%", "x%", "lots"])
def test_system_reserved_is_a_quantity_or_a_share_below_the_whole(reserved):
    from pydantic import ValidationError

    from thaw.spec import NodeResources

    with pytest.raises(ValidationError):
        NodeResources(systemReserved=reserved)


@pytest.mark.parametrize("request_, expected", [
    (Request(4000, 16 * GiB, 2), None),  # the whole node: fits once the others go
    (Request(4001), "1 Insufficient cpu"),
    (Request(memory=17 * GiB), "1 Insufficient memory"),
    (Request(8000, 32 * GiB, 3), "1 Insufficient cpu, 1 Insufficient memory, 1 Insufficient nvidia.com/gpu"),
])
def test_a_request_larger_than_the_whole_node_never_fits(request_, expected):
    why = never_fits(request_, NODE)
    assert why is None if expected is None else expected in why and "the node has 4 cores" in why


def test_replicas_without_a_cpu_request_share_the_cores_nobody_holds():
    assert shared_cores(NODE, [Claim((0, 1))]) == (2, 3)
    assert shared_cores(NODE, [Claim((0, 1, 2, 3))]) == NODE.cores  # never an empty set


def test_a_replica_that_does_not_fit_stays_pending_with_the_schedulers_reason(tmp_path, tiny_model):
    port = free_port()
    spec = {"platform": {"gateway": {"port": port}, "stateDir": str(tmp_path / "state"),
                         "node": {"cpu": "1"},
                         "autoscaler": {"scale-to-zero-grace-period": "1s", "tick-interval": "1s"}},
            "models": [{"name": "tiny", "source": str(tiny_model), "engine": {"max_model_len": 512},
                        # requests queue behind each other on the one replica: a slow machine takes longer,
                        # and none of them may time out for it
                        "containerConcurrency": 1, "timeoutSeconds": 600, "resources": {"cpu": "1"},
                        "scaling": {"window": "6s", "max-scale": 3}}]}
    (tmp_path / "thaw.yaml").write_text(yaml.safe_dump(spec))
    server = ServerProcess([sys.executable, "-m", "thaw.cli", "up", "-f", str(tmp_path / "thaw.yaml")],
                           tmp_path / "up.log", env=base_env())
    url = f"http://127.0.0.1:{port}"

    def revision() -> dict:
        return requests.get(url + "/thaw/v1/status", timeout=5).json()["models"][0]["revisions"][0]

    try:
        server.wait_http(url + "/healthz", 60)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)

        async def load():
            # one replica takes one request at a time: the KPA wants three, the node holds one
            return await asyncio.gather(*(client.completions.create(
                model="tiny", prompt="x", max_tokens=64, extra_body={"ignore_eos": True})
                for _ in range(3)), return_exceptions=True)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            results = pool.submit(asyncio.run, load())
            # while the one replica serves the queue: more wanted, one process, the rest Pending with the
            # scheduler's reason (counted as Pending, not as starting beside the one real process)
            rev = poll(lambda: (lambda r: r if r["pending"] and r["desired"] > 1 and r["replicas"]["ready"] == 1
                                else None)(revision()), 300, 0.1, "a wanted replica Pending beside a ready one")
            assert rev["pending"] == "0/1 nodes are available: 1 Insufficient cpu.", rev
            assert len(rev["pods"]) == 1 and rev["replicas"]["starting"] == 0, rev  # never more than the node holds
            assert rev["replicas"]["pending"] >= 1, rev["replicas"]
            results = results.result()
        assert all(not isinstance(r, Exception) for r in results), results  # each served by the one replica
        pod = rev["pods"][0]
        assert psutil.Process(pod["pid"]).cpu_affinity() == [0]  # pinned to the core it was given
        logged = " ".join((tmp_path / "up.log").read_text().split())  # rich wraps long lines
        assert "Pending: 0/1 nodes are available: 1 Insufficient cpu." in logged
        poll(lambda: not revision()["pending"], 60, 0.5, "no replica pending once the load is gone")
    finally:
        server.stop()


def _up(tmp_path, spec: dict) -> tuple[ServerProcess, str]:
    (tmp_path / "thaw.yaml").write_text(yaml.safe_dump(spec))
    server = ServerProcess([sys.executable, "-m", "thaw.cli", "up", "-f", str(tmp_path / "thaw.yaml")],
                           tmp_path / "up.log", env=base_env())
    url = f"http://127.0.0.1:{spec['platform']['gateway']['port']}"
    server.wait_http(url + "/healthz", 60)
    return server, url


def test_weights_larger_than_the_cache_tier_are_refused_before_any_process_starts(tmp_path, tiny_model):
    """They could never be staged: no process starts (its imports alone take 20-30 s on a small machine), and
    a request is told why at once."""
    port = free_port()
    spec = {"platform": {"gateway": {"port": port}, "stateDir": str(tmp_path / "state"),
                         "cache": {"path": str(tmp_path / "tier"), "capacity": "1Ki"}},
            "models": [{"name": "tiny", "source": str(tiny_model), "cache": {"stage": True},
                        "engine": {"max_model_len": 512}, "timeoutSeconds": 600}]}
    server, url = _up(tmp_path, spec)
    try:
        r = requests.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=60)
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "model_unavailable" and "cannot fit the cache tier" in error["message"], error
        rev = requests.get(url + "/thaw/v1/status", timeout=5).json()["models"][0]["revisions"][0]
        assert "cannot fit the cache tier" in rev["failure"] and not rev["pods"]
        assert not list((tmp_path / "state" / "logs").glob("tiny-*.log"))  # no replica process, ever
    finally:
        server.stop()


def test_a_replica_that_cannot_boot_is_failed_at_once_and_held_requests_are_told_why(tmp_path, tiny_model):
    """A model whose config cannot be read: the replica's engine fails at boot. The plane sees it failed (not
    'starting' until its progress deadline), tells the held request why at once, backs off before the next
    start (10 s first), and says why in the status. Forked from the standby, so the failure comes in seconds
    on any machine; the request's timeout is far beyond that."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "config.json").write_text("{ not json")
    port = free_port()
    spec = {"platform": {"gateway": {"port": port}, "stateDir": str(tmp_path / "state"),
                         "autoscaler": {"scale-to-zero-grace-period": "1s", "tick-interval": "1s"}},
            "models": [{"name": "tiny", "source": str(broken), "engine": {"max_model_len": 512},
                        "timeoutSeconds": 600}]}
    server, url = _up(tmp_path, spec)
    try:
        r = requests.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=600)
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert "failed to start" in message and "config.json" in message, message
        rev = requests.get(url + "/thaw/v1/status", timeout=5).json()["models"][0]["revisions"][0]
        assert "failed to start" in rev["failure"] and not rev["pods"]
        # one start, then the back-off: the request above did not start a loop
        assert len(list((tmp_path / "state" / "logs").glob("tiny-*.log"))) == 1
    finally:
        server.stop()


@pytest.mark.parametrize("gpu, tensor_parallel, gpus", [(0, 1, 0), (1, 1, 1), (0, 2, 2), (1, 4, 4), (4, 2, 4)])
def test_an_engine_sharded_over_gpus_asks_for_that_many_devices(gpu, tensor_parallel, gpus):
    from thaw.knative.embedded.control.node import request_of
    from thaw.spec import Resources

    request = request_of(Resources(gpu=gpu), tensor_parallel)
    assert request.gpus == gpus
    placed = place(request, NODE, [], 0)  # NODE has 2 GPUs: up to 2 place, more can never fit
    assert placed == (Claim(gpus=tuple(range(gpus))) if gpus <= 2 else
                      "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.")
    assert (never_fits(request, NODE) is None) == (gpus <= 2)
