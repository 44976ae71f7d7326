"""A revision's two pure decisions (knative/embedded/control/revision.py) and the replica state machine, as tables."""

from __future__ import annotations

import pytest

from thaw.knative.embedded.control.autoscaler import ScaleResult
from thaw.knative.embedded.dataplane.replica import MOVES, IllegalMove, Replica, State, can_move
from thaw.knative.embedded.control.revision import Decision, Plan, ReplicaView, decide, plan

S = State


def kpa(desired: int, valid: bool = True) -> ScaleResult:
    return ScaleResult(desired, 0, valid, False)


BASE = dict(keep_warm=0, min_scale=0, max_scale=0, initial_reached=True, ready=1, current=1, inactive_since=None,
            now=100.0, grace=30.0, retention=0.0, scale_to_zero=True)


@pytest.mark.parametrize("result, previous, changes, expected", [
    (kpa(3), 1, {}, Decision(3, True, None)),
    (kpa(0, valid=False), 2, {}, Decision(2, True, None)),  # no data: keep the last decision
    (kpa(5), 1, {"max_scale": 4}, Decision(4, True, None)),
    (kpa(1), 1, {"min_scale": 2}, Decision(2, True, None)),
    (kpa(0), 0, {"keep_warm": 1}, Decision(1, True, None)),  # the optimizer's floor
    (kpa(0), 0, {"keep_warm": 1, "max_scale": 1, "min_scale": 0}, Decision(1, True, None)),
    # initial scale: held until once reached
    (kpa(0), 3, {"initial_reached": False, "ready": 1, "current": 3}, Decision(3, False, None)),
    (kpa(0), 3, {"initial_reached": False, "ready": 3, "current": 3}, Decision(1, True, 100.0)),
    # scale to zero: one replica kept through the grace period, then 0
    (kpa(0), 1, {}, Decision(1, True, 100.0)),
    (kpa(0), 1, {"inactive_since": 60.0}, Decision(0, True, 60.0)),
    (kpa(0), 1, {"inactive_since": 80.0, "retention": 60.0}, Decision(1, True, 80.0)),
    (kpa(0), 1, {"current": 0}, Decision(0, True, 100.0)),  # nothing runs: nothing to keep
    (kpa(0), 1, {"scale_to_zero": False}, Decision(1, True, None)),
    (kpa(2), 1, {"inactive_since": 60.0}, Decision(2, True, None)),  # active again
])
def test_decide(result, previous, changes, expected):
    assert decide(result, previous, **{**BASE, **changes}) == expected


def views(*states: State, in_flight: tuple[int, ...] = ()) -> list[ReplicaView]:
    flights = list(in_flight) + [0] * (len(states) - len(in_flight))
    return [ReplicaView(f"r{i}", s, f) for i, (s, f) in enumerate(zip(states, flights))]


@pytest.mark.parametrize("replicas, launching, desired, queued, routable, expected", [
    ([], 0, 0, 0, True, Plan()),
    ([], 0, 2, 0, True, Plan(start=2)),
    ([], 1, 2, 0, True, Plan(start=1)),  # one already asked for
    (views(S.READY), 0, 1, 0, True, Plan()),
    (views(S.STARTING, S.WAKING), 0, 2, 0, True, Plan()),  # starting and waking count as running
    (views(S.DRAINING), 0, 1, 0, True, Plan(start=1)),  # a draining replica does not
    # parked replicas stand for wanted ones; requests waiting wake them first
    (views(S.PARKED), 0, 1, 0, True, Plan()),
    (views(S.PARKING), 0, 1, 0, True, Plan()),
    (views(S.PARKED), 0, 1, 2, True, Plan(wake=("r0",))),
    (views(S.PARKED), 0, 3, 3, True, Plan(wake=("r0",), start=2)),
    (views(S.PARKED, S.PARKED), 0, 1, 1, True, Plan(wake=("r0",))),
    (views(S.PARKED), 0, 0, 0, False, Plan(stop=("r0",))),  # no traffic: nothing kept parked
    # too many: not-ready and idle ones go first; the revision's last replica may park
    (views(S.READY, S.STARTING, S.UNREADY), 0, 1, 0, True, Plan(shrink=("r1", "r2"))),
    (views(S.READY, S.READY, in_flight=(3, 1)), 0, 1, 0, True, Plan(shrink=("r1",))),
    (views(S.READY), 0, 0, 0, True, Plan(shrink=("r0",), may_park="r0")),
    (views(S.READY, S.READY, in_flight=(0, 2)), 0, 0, 0, True, Plan(shrink=("r0", "r1"), may_park="r1")),
    (views(S.STARTING), 0, 0, 0, True, Plan(shrink=("r0",))),  # only a ready replica parks
])
def test_plan(replicas, launching, desired, queued, routable, expected):
    assert plan(replicas, launching, desired, queued, routable) == expected


# Fewer wanted while some launches are Pending (no room on the node): those go first, as Kubernetes deletes
# unscheduled pods first. Draining the ready replica instead freed its room for a Pending one: churn, and the
# request in flight on it finished on a replica started for nothing.
@pytest.mark.parametrize("replicas, launching, unplaced, desired, expected", [
    (views(S.READY), 2, 2, 2, Plan()),                       # one Pending launch cancels itself
    (views(S.READY), 2, 2, 1, Plan()),                       # both do
    (views(S.READY), 2, 1, 1, Plan(shrink=("r0",))),         # one placed launch: a real replica goes
    (views(S.READY, S.STARTING), 1, 1, 1, Plan(shrink=("r1",))),
    (views(S.READY), 2, 2, 0, Plan(shrink=("r0",), may_park="r0")),  # at zero all go
])
def test_plan_cancels_pending_launches_before_draining_a_replica(replicas, launching, unplaced, desired, expected):
    assert plan(replicas, launching, desired, 0, True, unplaced=unplaced) == expected


# While an engine starts on the GPU no replica gives GPU memory back (vLLM's start fails when the device's free
# memory grows while it measures it); the decision comes again after the start. Starting replicas may still go.
@pytest.mark.parametrize("replicas, desired, routable, held, free", [
    (views(S.READY), 0, True, Plan(), Plan(shrink=("r0",), may_park="r0")),  # its park waits
    (views(S.READY, S.READY), 1, True, Plan(), Plan(shrink=("r0",))),
    (views(S.PARKED), 0, False, Plan(), Plan(stop=("r0",))),  # a sleeper's context too
    (views(S.READY, S.STARTING), 1, True, Plan(shrink=("r1",)), Plan(shrink=("r1",))),
])
def test_plan_holds_gpu_releases_while_an_engine_starts(replicas, desired, routable, held, free):
    assert plan(replicas, 0, desired, 0, routable, hold_releases=True) == held
    assert plan(replicas, 0, desired, 0, routable) == free


@pytest.mark.parametrize("src, dst, allowed", [
    (S.STARTING, S.READY, True), (S.READY, S.UNREADY, True), (S.UNREADY, S.READY, True),
    (S.READY, S.PARKING, True), (S.PARKING, S.PARKED, True), (S.PARKED, S.WAKING, True), (S.WAKING, S.READY, True),
    (S.STARTING, S.DRAINING, True), (S.UNREADY, S.DRAINING, True),
    (S.PARKED, S.STOPPED, True), (S.DRAINING, S.DEAD, True), (S.DEAD, S.STOPPED, True),
    (S.PARKED, S.READY, False), (S.STARTING, S.PARKING, False), (S.DRAINING, S.READY, False),
    (S.STOPPED, S.DEAD, False), (S.STOPPED, S.READY, False), (S.UNREADY, S.PARKING, False),
])
def test_replica_moves(src, dst, allowed):
    assert can_move(src, dst) is allowed


def test_every_state_has_its_moves_and_an_illegal_one_raises(tmp_path):
    assert set(MOVES) == set(State)
    replica = Replica("m-1", "m-00001", 1, 1, False, tmp_path / "log", state="parked")
    assert replica.state is State.PARKED
    with pytest.raises(IllegalMove, match="parked -> ready"):
        replica.move(State.READY)
