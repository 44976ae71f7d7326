"""The platform's levers: what thaw's own engines turn on in vLLM, and what vLLM's own server beside them keeps."""

from __future__ import annotations

import pytest

from thaw.vllm_platform import VllmPlatform, compile_levers

MEGA = {"VLLM_USE_MEGA_AOT_ARTIFACT": "1"}


@pytest.mark.parametrize("torch_version, levers", [
    (None, {}),                    # no torch: nothing to compile
    ("2.9.1", {}),                 # standalone_compile has no `aot` before 2.10
    ("2.10.0", MEGA),
    ("2.11.0+cu128", MEGA),        # the GPU host's (vLLM 0.26 leaves it off there)
    ("2.11.0a0+git1234", MEGA),
    ("2.12.0.dev20260101", {}),    # vLLM turns it on itself from here
    ("2.13.0+cpu", {}),
])
def test_the_mega_aot_artifact_is_turned_on_where_torch_builds_it_and_vllm_leaves_it_off(torch_version, levers):
    assert compile_levers(torch_version) == levers


def test_thaws_sleep_mode_engines_get_the_levers_and_others_and_vllms_own_server_do_not(monkeypatch):
    monkeypatch.delenv("VLLM_USE_MEGA_AOT_ARTIFACT", raising=False)
    platform = VllmPlatform("cuda", "vllm 0.26.0", sleep_mode=True, engine_core="mp",
                            env={"VLLM_USE_FLASHINFER_SAMPLER": "0"}, levers=MEGA)
    assert platform.engine_env(4, sleep_mode=True) == {**MEGA, "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    assert platform.engine_env(4, sleep_mode=False) == {"VLLM_USE_FLASHINFER_SAMPLER": "0"}
    assert platform.server_env(4) == {"VLLM_USE_FLASHINFER_SAMPLER": "0"}


def test_a_lever_set_in_thaws_environment_is_left_as_the_user_set_it(monkeypatch):
    monkeypatch.setenv("VLLM_USE_MEGA_AOT_ARTIFACT", "0")
    platform = VllmPlatform("cuda", "vllm 0.26.0", sleep_mode=True, engine_core="mp", levers=MEGA)
    assert "VLLM_USE_MEGA_AOT_ARTIFACT" not in platform.engine_env(4, sleep_mode=True)  # it inherits the 0
