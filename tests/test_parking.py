"""Parked replicas: the pure decisions (park, make GPU room) as tables, and what a CPU machine says and does.

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
from thaw.knative.embedded.parking import Awake, ParkDecision, Parked, RoomPlan, decide_park, plan_gpu_room
from thaw.launch import base_env

GiB = 1 << 30


@pytest.mark.parametrize("allowed, weights, parked, budget, expected", [
    # the model or platform does not allow it: stop, as Knative would
    ("the model does not park", GiB, [], 64 * GiB, ParkDecision(False, reason="the model does not park")),
    # room in the budget: park, nothing else moves
    (None, 16 * GiB, [], 64 * GiB, ParkDecision(True, (), "parked")),
    (None, 16 * GiB, [Parked("a", 16 * GiB, 1.0)], 64 * GiB, ParkDecision(True, (), "parked")),
    # exactly full after parking is still within the budget
    (None, 16 * GiB, [Parked("a", 48 * GiB, 1.0)], 64 * GiB, ParkDecision(True, (), "parked")),
    # over the budget: the least recently used parked replicas go first, only as many as needed
    (None, 16 * GiB, [Parked("new", 30 * GiB, 9.0), Parked("old", 30 * GiB, 1.0)], 64 * GiB,
     ParkDecision(True, ("old",), "parked; 1 older parked stopped")),
    (None, 40 * GiB, [Parked("b", 20 * GiB, 5.0), Parked("a", 20 * GiB, 2.0), Parked("c", 20 * GiB, 8.0)],
     64 * GiB, ParkDecision(True, ("a", "b"), "parked; 2 older parked stopped")),
    # weights alone larger than the budget: never parked (and nothing else is evicted for it)
    (None, 80 * GiB, [Parked("a", GiB, 1.0)], 64 * GiB,
     ParkDecision(False, reason=f"its weights ({80 * GiB} bytes) exceed the parking budget ({64 * GiB})")),
    # a zero budget turns parking off
    (None, GiB, [], 0, ParkDecision(False, reason=f"its weights ({GiB} bytes) exceed the parking budget (0)")),
])
def test_decide_park(allowed, weights, parked, budget, expected):
    assert decide_park(allowed, weights, parked, budget) == expected


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
        assert requests.get(running.url + "/is_sleeping", timeout=5).json() == {"is_sleeping": False}
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
        import thaw.knative.embedded.standby as standby
        standby.cuda_initialised = lambda: True  # the stand-in for a CUDA context
        standby.serve_standby({str(socket_path)!r})
    """)
    with open(tmp_path / "standby.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", script], env=base_env(), stdout=log, stderr=log,
                                start_new_session=True)
    try:
        poll(socket_path.exists, 120, 0.1, "standby listening")
        from thaw.knative.embedded.standby import spawn_from_standby

        with pytest.raises(RuntimeError, match="initialised CUDA.*does not survive fork"):
            spawn_from_standby(socket_path, ["--help"], base_env(), tmp_path / "replica.log")
    finally:
        proc.kill()
        proc.wait()
