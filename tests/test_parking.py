"""Sleeping replicas: the pure decisions (park or hibernate, make GPU room) as tables, and what a CPU machine says and does.

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
from thaw.knative.embedded.control.parking import (HIBERNATED, PARKED, Awake, ParkDecision, RoomPlan, Sleeper, decide_park,
                                           plan_gpu_room)
from thaw.launch import base_env

GiB = 1 << 30


def parked(id_, gib, used, level=PARKED):
    return Sleeper(id_, level, gib * GiB, used)


@pytest.mark.parametrize("allowed, weights, sleepers, budget, contexts, expected", [
    # the model or platform does not allow it: stop, as Knative would
    ("the model does not park", GiB, [], 64 * GiB, 8, ParkDecision(0, reason="the model does not park")),
    # no sleeping replicas allowed at all
    (None, GiB, [], 64 * GiB, 0, ParkDecision(0, reason="the budget of sleeping replicas (gpuContexts) is 0")),
    # room in the host-RAM budget: park, nothing else moves
    (None, 16 * GiB, [], 64 * GiB, 8, ParkDecision(PARKED, reason="parked")),
    (None, 16 * GiB, [parked("a", 16, 1.0)], 64 * GiB, 8, ParkDecision(PARKED, reason="parked")),
    # exactly full after parking is still within the budget
    (None, 16 * GiB, [parked("a", 48, 1.0)], 64 * GiB, 8, ParkDecision(PARKED, reason="parked")),
    # over the host budget: the least recently used parked replicas hibernate, only as many as needed
    (None, 16 * GiB, [parked("new", 30, 9.0), parked("old", 30, 1.0)], 64 * GiB, 8,
     ParkDecision(PARKED, ("old",), (), "parked; 1 older parked hibernated")),
    (None, 40 * GiB, [parked("b", 20, 5.0), parked("a", 20, 2.0), parked("c", 20, 8.0)], 64 * GiB, 8,
     ParkDecision(PARKED, ("b", "a"), (), "parked; 2 older parked hibernated")),
    # a hibernated replica holds little host RAM: it never blocks a park, and it stays hibernated
    (None, 60 * GiB, [parked("h", 1, 9.0, HIBERNATED)], 64 * GiB, 8, ParkDecision(PARKED, reason="parked")),
    # weights alone larger than the host budget: hibernated, and nothing else moves for it
    (None, 80 * GiB, [parked("a", 1, 1.0)], 64 * GiB, 8,
     ParkDecision(HIBERNATED, reason="hibernated (its weights do not fit the parking budget)")),
    (None, GiB, [], 0, 8, ParkDecision(HIBERNATED, reason="hibernated (its weights do not fit the parking budget)")),
    # past the budget of sleeping replicas: the least recently used stop, whatever their rung
    (None, 16 * GiB, [parked("b", 16, 5.0), parked("a", 1, 2.0, HIBERNATED), parked("c", 16, 8.0)], 64 * GiB, 3,
     ParkDecision(PARKED, (), ("a",), "parked; 1 older sleeping stopped")),
    # both at once: 8 models of 16 GiB, room for 3 parked and 6 sleeping in all
    (None, 16 * GiB, [parked(f"m{i}", 16, float(i)) for i in range(7)], 48 * GiB, 6,
     ParkDecision(PARKED, ("m4", "m3", "m2"), ("m1", "m0"), "parked; 3 older parked hibernated; 2 older sleeping stopped")),
])
def test_decide_park(allowed, weights, sleepers, budget, contexts, expected):
    assert decide_park(allowed, weights, sleepers, budget, contexts) == expected


def awake(id_, gib, idle=True, used=0.0, parks=True):
    return Awake(id_, gib * GiB, idle, used, parks)


@pytest.mark.parametrize("need, free, holders, expected", [
    # enough free: nothing moves
    (48 * GiB, 70 * GiB, [awake("a", 10)], RoomPlan()),
    (48 * GiB, 48 * GiB, [], RoomPlan()),
    # short: the idle replica parks if its model parks, else it is stopped
    (48 * GiB, 30 * GiB, [awake("a", 48)], RoomPlan(park=("a",))),
    (48 * GiB, 30 * GiB, [awake("a", 48, parks=False)], RoomPlan(stop=("a",))),
    # least recently used first, and no more than needed
    (48 * GiB, 10 * GiB, [awake("recent", 40, used=9.0), awake("old", 40, used=1.0)], RoomPlan(park=("old",))),
    (70 * GiB, 0, [awake("b", 40, used=5.0, parks=False), awake("a", 40, used=2.0)],
     RoomPlan(park=("a",), stop=("b",))),
    # busy replicas are never moved: if the idle ones cannot make room, wait
    (48 * GiB, 10 * GiB, [awake("busy", 60, idle=False)], None),
    (48 * GiB, 10 * GiB, [awake("busy", 60, idle=False), awake("idle", 20)], None),
    (48 * GiB, 10 * GiB, [awake("busy", 60, idle=False), awake("idle", 40)], RoomPlan(park=("idle",))),
])
def test_plan_gpu_room(need, free, holders, expected):
    assert plan_gpu_room(need, free, holders) == expected


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
        assert requests.get(running.url + "/is_sleeping", timeout=5).json() == {"is_sleeping": False, "level": 0}
        r = requests.post(running.url + "/reserve_host", timeout=10)  # nothing to reserve for: no parking here
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
