"""One `thaw up` per state directory, and start-up conflicts as one error line (real processes, real ports)."""

from __future__ import annotations

import subprocess
import sys

import requests
import yaml

from thaw.launch import ServerProcess, base_env, free_port


def _spec(tmp_path, name: str, state: str, port: int):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"platform": {"gateway": {"port": port}, "stateDir": str(tmp_path / state)},
                                    "models": []}))
    return path


def _up(spec) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thaw.cli", "up", "-f", str(spec)], capture_output=True, text=True,
                          timeout=120, env=base_env())


def test_a_second_instance_on_one_state_directory_or_port_is_one_error_line(tmp_path):
    port = free_port()
    first = ServerProcess([sys.executable, "-m", "thaw.cli", "up", "-f", str(_spec(tmp_path, "a", "s", port))],
                          tmp_path / "a.log", env=base_env())
    try:
        first.wait_http(f"http://127.0.0.1:{port}/healthz", 60)
        for spec, says in ((_spec(tmp_path, "same-dir", "s", free_port()), "state directory"),
                           (_spec(tmp_path, "same-dir-and-port", "s", port), "state directory"),
                           (_spec(tmp_path, "same-port", "other", port), f"127.0.0.1:{port} is taken")):
            out = _up(spec)
            assert out.returncode == 1, out.stderr
            errors = [line for line in out.stderr.splitlines() if line.startswith("error")]
            assert len(errors) == 1 and says in errors[0], out.stderr
            assert "Traceback" not in out.stderr + out.stdout
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        first.stop()
    # the lock goes with its process: the directory is free again
    second = ServerProcess([sys.executable, "-m", "thaw.cli", "up", "-f", str(_spec(tmp_path, "b", "s", port))],
                           tmp_path / "b.log", env=base_env())
    try:
        second.wait_http(f"http://127.0.0.1:{port}/healthz", 60)
    finally:
        second.stop()
