"""Sleeping replicas and the node's memory: the pure decisions (who holds a host copy, who stops, GPU room) and the
ledger as tables, and what a CPU machine says and does.

Sleep mode needs vLLM's CUDA build, so parking itself runs in tests/test_gpu.py on the GPU host; here the
decisions are checked row by row, and the CPU build's refusals end to end.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import requests
import yaml

from conftest import poll, start_function, thaw_cli
from thaw.knative.embedded.control.ledger import NodeLedger
from thaw.knative.embedded.control.parking import (Awake, HostPlan, HostUser, RoomPlan, plan_gpu_room, plan_host,
                                                  sleeper_contexts)
from thaw.launch import base_env

GiB = 1 << 30


def user(id_, gib, used, copy=False, asleep=False):
    return HostUser(id_, int(gib * GiB), copy, used, asleep)


# 8 models of 16 GiB (the 8B shape), the design point: a budget for five host copies
EIGHT = [user(f"m{i}", 16, float(i), copy=i >= 2, asleep=i < 6) for i in range(8)]


@pytest.mark.parametrize("users, budget, grantable, contexts, expected", [
    # nothing to hold
    ([], 64 * GiB, 64 * GiB, 8, HostPlan()),
    # room in the budget and on the node: a copy is granted, most recent first, only while both hold
    ([user("a", 16, 1.0)], 64 * GiB, 64 * GiB, 8, HostPlan(grant=("a",))),
    ([user("old", 16, 1.0), user("new", 16, 9.0)], 20 * GiB, 64 * GiB, 8, HostPlan(grant=("new",))),
    # exactly full is within the budget
    ([user("a", 16, 1.0), user("b", 48, 2.0)], 64 * GiB, 64 * GiB, 8, HostPlan(grant=("b", "a"))),
    # a copy held already counts, and costs the node nothing new
    ([user("a", 16, 1.0, copy=True), user("b", 16, 2.0)], 32 * GiB, 16 * GiB, 8, HostPlan(grant=("b",))),
    # past the budget: the least recently used copy goes, for a more recent replica
    ([user("old", 30, 1.0, copy=True), user("new", 30, 9.0)], 40 * GiB, 64 * GiB, 8,
     HostPlan(grant=("new",), drop=("old",))),
    # the node's floor bounds new copies (grants not yet pinned count: the caller passes what is left)
    ([user("a", 16, 9.0), user("b", 16, 5.0)], 64 * GiB, 20 * GiB, 8, HostPlan(grant=("a",))),
    ([user("a", 16, 9.0)], 64 * GiB, 15 * GiB, 8, HostPlan()),
    # below the floor: copies dropped, least recently used first, until the deficit is covered
    ([user("a", 16, 9.0, copy=True), user("b", 16, 5.0, copy=True), user("c", 16, 1.0, copy=True)],
     64 * GiB, -20 * GiB, 8, HostPlan(drop=("c", "b"))),
    ([user("a", 16, 9.0, copy=True), user("b", 16, 5.0, copy=True)], 64 * GiB, -1, 8, HostPlan(drop=("b",))),
    # a replica that cannot have a copy (a quantized checkpoint) hibernates and costs the budget nothing
    ([user("q", 0, 9.0, asleep=True), user("a", 16, 1.0)], 16 * GiB, 64 * GiB, 8, HostPlan(grant=("a",))),
    # weights larger than the whole budget: never a copy, and nothing else moves for it
    ([user("big", 80, 9.0), user("a", 16, 1.0, copy=True)], 64 * GiB, 64 * GiB, 8, HostPlan()),
    # past the budget of sleeping replicas: the least recently used sleepers stop, whatever they hold;
    # awake replicas do not count
    ([user("a", 16, 1.0, asleep=True), user("b", 16, 2.0, copy=True, asleep=True), user("c", 16, 3.0, asleep=True),
      user("awake", 16, 4.0)], 64 * GiB, 64 * GiB, 2, HostPlan(grant=("awake", "c"), evict=("a",))),
    ([user("a", 16, 1.0, asleep=True)], 64 * GiB, 64 * GiB, 0, HostPlan(evict=("a",))),
    # the design point: 8 models, copies for 5 (80 GiB), 6 asleep: six copies are one too many, the oldest goes
    (EIGHT, 80 * GiB, 64 * GiB, 8, HostPlan(drop=("m2",))),
    ([user(f"m{i}", 16, float(i)) for i in range(8)], 80 * GiB, 64 * GiB, 8,
     HostPlan(grant=("m7", "m6", "m5", "m4"))),  # a burst: four fit what the node can pin now, not five
])
def test_plan_host(users, budget, grantable, contexts, expected):
    assert plan_host(users, budget, grantable, contexts) == expected


@pytest.mark.parametrize("gpu_contexts, pooled, sleepers, evicted", [
    (8, 0, 8, ()),  # no pool: the whole budget sleeps
    (8, 2, 8, ("s1", "s0")),  # two engines in the pool: the two least recently used sleepers go
    (3, 5, 2, ("s1", "s0")),  # a pool larger than the budget leaves no sleeper (never a negative budget)
])
def test_the_engine_pools_engines_count_against_gpu_contexts_first(gpu_contexts, pooled, sleepers, evicted):
    users = [user(f"s{i}", 16, float(i), asleep=True) for i in range(sleepers)]
    plan = plan_host(users, 0, 0, sleeper_contexts(gpu_contexts, pooled))
    assert plan.evict == evicted


def test_a_burst_of_grants_counts_each_from_its_grant():
    """Eight replicas asking at once: each grant counts against the next before any pinned a byte."""
    ledger = NodeLedger()
    available, floor, granted = 100 * GiB, 12 * GiB, []
    for i in range(8):
        plan = plan_host([user(f"r{i}", 16, float(i))], 200 * GiB, ledger.host_grantable(available, floor), 8)
        for rid in plan.grant:
            ledger.grant_copy(rid, 16 * GiB)
            granted.append(rid)
    assert granted == ["r0", "r1", "r2", "r3", "r4"]  # 5 x 16 <= 88 < 6 x 16: never past the floor
    assert ledger.host_grantable(available, floor) == 8 * GiB
    ledger.copy_settled("r0")  # built: its bytes are now in what the kernel reports used
    assert ledger.host_grantable(available - 16 * GiB, floor) == 8 * GiB
    ledger.copy_settled("r1")  # dropped before it was built: its grant is free again
    assert ledger.host_grantable(available - 16 * GiB, floor) == 24 * GiB


def test_gpu_moves_in_flight_count_what_they_have_yet_to_take():
    ledger = NodeLedger()
    held = {"wake-a": 10 * GiB, "start-b": 0}
    ledger.begin_gpu("wake-a", 20 * GiB)
    ledger.begin_gpu("start-b", 30 * GiB)
    assert ledger.gpu_free(100 * GiB, held.get) == 100 * GiB - 10 * GiB - 30 * GiB
    assert ledger.gpu_free(100 * GiB, held.get, excluding="start-b") == 90 * GiB  # its own need is not a rival
    ledger.end_gpu("wake-a")
    assert ledger.gpu_free(100 * GiB, held.get) == 70 * GiB


def awake(id_, gib, idle=True, used=0.0, sleeps=True, exclusive=False):
    return Awake(id_, gib * GiB, idle, used, sleeps, exclusive)


@pytest.mark.parametrize("need, free, holders, exclusive, expected", [
    # enough free: nothing moves
    (48 * GiB, 70 * GiB, [awake("a", 10)], False, RoomPlan()),
    (48 * GiB, 48 * GiB, [], False, RoomPlan()),
    # short: the idle replica sleeps if its model sleeps, else it is stopped
    (48 * GiB, 30 * GiB, [awake("a", 48)], False, RoomPlan(sleep=("a",))),
    (48 * GiB, 30 * GiB, [awake("a", 48, sleeps=False)], False, RoomPlan(stop=("a",))),
    # least recently used first, and no more than needed
    (48 * GiB, 10 * GiB, [awake("recent", 40, used=9.0), awake("old", 40, used=1.0)], False, RoomPlan(sleep=("old",))),
    (70 * GiB, 0, [awake("b", 40, used=5.0, sleeps=False), awake("a", 40, used=2.0)], False,
     RoomPlan(sleep=("a",), stop=("b",))),
    # busy replicas are never moved: if the idle ones cannot make room, wait
    (48 * GiB, 10 * GiB, [awake("busy", 60, idle=False)], False, None),
    (48 * GiB, 10 * GiB, [awake("busy", 60, idle=False), awake("idle", 20)], False, None),
    (48 * GiB, 10 * GiB, [awake("busy", 60, idle=False), awake("idle", 40)], False, RoomPlan(sleep=("idle",))),
    # a replica that asked for the whole GPU has it to itself awake: everyone else there goes to sleep...
    (20 * GiB, 100 * GiB, [awake("a", 10, used=5.0), awake("b", 10, used=1.0)], True, RoomPlan(sleep=("a", "b"))),
    (20 * GiB, 100 * GiB, [awake("a", 10, idle=False)], True, None),  # ...or it waits while one is busy
    # ...and it goes to sleep for anyone else, memory or not
    (10 * GiB, 100 * GiB, [awake("whole", 120, exclusive=True, used=9.0), awake("c", 5)], False,
     RoomPlan(sleep=("whole",))),
    (10 * GiB, 100 * GiB, [awake("whole", 120, exclusive=True, idle=False)], False, None),
])
def test_plan_gpu_room(need, free, holders, exclusive, expected):
    assert plan_gpu_room(need, free, holders, exclusive) == expected


def test_validate_says_a_cpu_machine_stops_instead_of_parking(tmp_path, tiny_model):
    spec = tmp_path / "thaw.yaml"
    spec.write_text(yaml.safe_dump({"models": [{"name": "m", "source": str(tiny_model), "park": True},
                                               {"name": "n", "source": str(tiny_model)}]}))
    out = thaw_cli("validate", "-f", str(spec))
    assert out.returncode == 0, out.stderr
    assert "models[0].park" in out.stderr and "no sleep mode" in out.stderr and "stopped at zero" in out.stderr
    assert "models[1]" not in out.stderr


def test_a_cpu_function_refuses_to_sleep_with_openais_error_shape(tiny_model, tmp_path):
    running = start_function(tiny_model, tmp_path, enable_sleep_mode=True)
    try:
        r = requests.post(running.url + "/sleep?level=1", timeout=10)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "sleep_mode_off"
        assert requests.get(running.url + "/is_sleeping", timeout=5).json() == {
            "is_sleeping": False, "level": 0, "host_copy": {"bytes": 0, "ready": False}}
        for method in ("POST", "DELETE"):  # no host copy to build or drop: no parking here
            r = requests.request(method, running.url + "/host_copy", timeout=10)
            assert r.status_code == 400 and r.json()["error"]["code"] == "sleep_mode_off"
        assert requests.post(running.url + "/sleep?level=x", timeout=5).status_code == 400
        # and it still serves
        r = requests.post(running.url + "/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        running.server.stop()


def test_the_standby_refuses_to_fork_once_cuda_is_initialised(tmp_path):
    """CUDA cannot be initialised on this machine, so a stand-in reports it initialised: the standby must
    refuse to fork, with an error saying why (tests/test_gpu.py does it for real on the GPU host)."""
    socket_path = tmp_path / "standby.sock"
    script = textwrap.dedent(f"""
        import thaw.knative.embedded.control.standby as standby
        standby.cuda_initialised = lambda: True  # the stand-in for a CUDA context
        standby.serve_standby({str(socket_path)!r})
    """)
    with open(tmp_path / "standby.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", script], env=base_env(), stdout=log, stderr=log,
                                start_new_session=True)
    try:
        poll(socket_path.exists, 120, 0.1, "standby listening")
        from thaw.knative.embedded.control.standby import ReplicaLaunch, spawn_from_standby
        from thaw.launch import ReplicaBoot
        from thaw.spec import EngineArgs

        launch = ReplicaLaunch(ReplicaBoot(model_dir=str(tmp_path)), "m", EngineArgs(), 1)
        with pytest.raises(RuntimeError, match="initialised CUDA.*does not survive fork"):
            spawn_from_standby(socket_path, launch, base_env(), tmp_path / "replica.log")
    finally:
        proc.kill()
        proc.wait()
