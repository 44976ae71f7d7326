"""The serving plane's small parts, without processes: traffic, the breaker and throttler, auth."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from thaw.knative.embedded.dataplane.breaker import Breaker, QueueFull
from thaw.knative.embedded.dataplane.throttler import Throttler
from thaw.knative.embedded.auth import Authenticator, AuthError, _parse_env, _parse_file
from thaw.knative.embedded.control.traffic import (Route, RevisionHistory, pick_revision, resolve_traffic,
                                                   revision_name, tagged_revision)
from thaw.spec import TrafficTarget, validate_traffic


def targets(*items) -> list[TrafficTarget]:
    return [TrafficTarget.model_validate(i) for i in items]


def test_revision_names():
    assert revision_name("m", 1) == "m-00001" and revision_name("m", 12) == "m-00012"


@pytest.mark.parametrize("items,error", [
    ([{"latestRevision": True, "percent": 90}], "sum to 100, got 90"),
    ([{"latestRevision": True, "percent": 50, "tag": "a"}, {"revisionName": "m-00001", "percent": 50, "tag": "a"}],
     "tags must be unique; repeated: a"),
    ([{"latestRevision": True, "percent": 100}], None),
])
def test_validate_traffic(items, error):
    if error is None:
        validate_traffic(targets(*items))
    else:
        with pytest.raises(ValueError, match=error):
            validate_traffic(targets(*items))


def test_traffic_target_needs_exactly_one_target():
    with pytest.raises(ValueError, match="not both"):
        TrafficTarget(revisionName="m-00001", latestRevision=True, percent=100)
    with pytest.raises(ValueError, match="needs revisionName"):
        TrafficTarget(percent=100)


def test_resolve_and_pick():
    assert resolve_traffic([], "m-00002", {"m-00002"}) == [Route("m-00002", 100, None)]
    routes = resolve_traffic(targets({"revisionName": "m-00001", "percent": 90},
                                     {"latestRevision": True, "percent": 10, "tag": "canary"}),
                             "m-00002", {"m-00001", "m-00002"})
    assert [pick_revision(routes, d) for d in (0, 89.99, 90, 99.99)] == ["m-00001", "m-00001", "m-00002", "m-00002"]
    assert tagged_revision(routes, "canary") == "m-00002" and tagged_revision(routes, "nope") is None
    with pytest.raises(ValueError, match="does not exist"):
        resolve_traffic(targets({"revisionName": "m-00009", "percent": 100}), "m-00002", {"m-00002"})


def test_zero_percent_tag_gets_no_untagged_traffic():
    routes = [Route("a", 100, None), Route("b", 0, "next")]
    assert {pick_revision(routes, d) for d in (0, 50, 99.9)} == {"a"}


def test_revision_history_numbers_changes_and_survives_restart(tmp_path):
    h = RevisionHistory(tmp_path / "r.json")
    assert h.sync("m", {"x": 1}) == ([{"name": "m-00001", "template": {"x": 1}, "created": pytest.approx(0, abs=1e10)}], True)
    assert h.sync("m", {"x": 1})[1] is False
    revs, created = RevisionHistory(tmp_path / "r.json").sync("m", {"x": 2})
    assert created and [r["name"] for r in revs] == ["m-00001", "m-00002"]


@dataclass(eq=False)
class Pod:
    in_flight: int = 0


def test_throttler_queue_concurrency_and_order():
    async def scenario():
        act = Throttler(queue_depth=2, container_concurrency=1)
        first = asyncio.create_task(act.acquire(5))
        second = asyncio.create_task(act.acquire(5))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await act.acquire(5)
        pod = Pod()
        act.add_replica(pod)
        got = await first
        assert got is pod and pod.in_flight == 1 and not second.done()  # containerConcurrency 1
        act.release(pod)
        assert await second is pod
        with pytest.raises(asyncio.TimeoutError):
            await act.acquire(0.05)  # pod busy, nothing frees it
        assert act.queued == 0

    asyncio.run(scenario())


def test_throttler_unlimited_concurrency_picks_least_loaded():
    async def scenario():
        act = Throttler(queue_depth=1, container_concurrency=0)
        a, b = Pod(3), Pod(1)
        act.add_replica(a)
        act.add_replica(b)
        assert await act.acquire(1) is b

    asyncio.run(scenario())


def test_throttler_capacity_follows_its_replicas():
    """The breaker's capacity is containerConcurrency x replicas in rotation; a replica that leaves keeps
    its in-flight requests counted until they finish, as in Knative's throttler."""
    async def scenario():
        act = Throttler(queue_depth=4, container_concurrency=2)
        a, b = Pod(), Pod()
        act.add_replica(a)
        act.add_replica(b)
        assert act.breaker.capacity == 4
        held = [await act.acquire(1) for _ in range(3)]
        assert sorted(p.in_flight for p in (a, b)) == [1, 2]
        busy = max((a, b), key=lambda p: p.in_flight)
        act.remove_replica(busy)  # it drains: its two requests still run
        assert act.breaker.capacity == 2 and act.in_flight == 3
        waiter = asyncio.create_task(act.acquire(5))
        await asyncio.sleep(0)
        assert not waiter.done() and act.queued == 1
        for pod in held:
            if pod is busy:
                act.release(pod)
        assert await waiter is not busy and act.in_flight == 2

    asyncio.run(scenario())


def test_breaker_refuses_beyond_its_queue_and_hands_slots_over_in_order():
    async def scenario():
        breaker = Breaker(queue_depth=2, capacity=1)
        await breaker.acquire(1)
        first, second = asyncio.create_task(breaker.acquire(5)), asyncio.create_task(breaker.acquire(5))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await breaker.acquire(1)
        breaker.release()
        await first
        assert not second.done() and breaker.in_flight == 1
        breaker.set_capacity(2)
        await second
        assert breaker.in_flight == 2 and breaker.waiting == 0
        late = asyncio.create_task(breaker.acquire(0.01))
        with pytest.raises(asyncio.TimeoutError):
            await late
        assert breaker.waiting == 0 and breaker.in_flight == 2

    asyncio.run(scenario())


def test_auth_tokens(tmp_path):
    f = tmp_path / "tokens.yaml"
    f.write_text("- token: all\n- token: some\n  models: [a, b]\n")
    auth = Authenticator(_parse_file(f) + _parse_env("envtok=c, star=*"))
    auth.check("Bearer all", "z")
    auth.check("Bearer some", "b")
    auth.check("Bearer envtok", "c")
    auth.check("Bearer star", "q")
    for header, model, status in [(None, "a", 401), ("Basic all", "a", 401), ("Bearer nope", "a", 401),
                                  ("Bearer some", "c", 403), ("Bearer envtok", "a", 403)]:
        with pytest.raises(AuthError) as info:
            auth.check(header, model)
        assert info.value.status == status
    assert "all" not in repr(auth.tokens) and "some" not in repr(auth.tokens)
    assert not Authenticator([]).enabled


def test_auth_file_errors(tmp_path):
    f = tmp_path / "tokens.yaml"
    f.write_text("- models: [a]\n")
    with pytest.raises(ValueError, match="needs a non-empty 'token'"):
        _parse_file(f)
