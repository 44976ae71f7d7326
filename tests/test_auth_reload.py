"""Tokens follow the spec: one removed from it stops working at the reload, one added starts (real thaw up,
real HTTP; no replica needs to start for the gateway to answer /v1/models)."""

from __future__ import annotations

import os
import sys

import requests
import yaml

from conftest import poll
from thaw.launch import ServerProcess, base_env, free_port


def test_a_token_removed_from_the_spec_stops_working_at_the_reload(tmp_path, tiny_model):
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/models"
    (tmp_path / "before.yaml").write_text(yaml.safe_dump([{"token": "kept"}, {"token": "revoked"}]))
    (tmp_path / "after.yaml").write_text(yaml.safe_dump([{"token": "kept"}, {"token": "added"}]))

    def write(tokens: str) -> None:
        spec = {"platform": {"gateway": {"port": port}, "stateDir": str(tmp_path / "state"),
                             "auth": {"tokensFile": str(tmp_path / tokens)}},
                "models": [{"name": "tiny", "source": str(tiny_model), "standby": False}]}
        (tmp_path / "thaw.tmp").write_text(yaml.safe_dump(spec))
        os.replace(tmp_path / "thaw.tmp", tmp_path / "thaw.yaml")

    def status(token: str) -> int:
        return requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code

    write("before.yaml")
    server = ServerProcess([sys.executable, "-m", "thaw.cli", "up", "-f", str(tmp_path / "thaw.yaml")],
                           tmp_path / "up.log", env=base_env())
    try:
        server.wait_http(f"http://127.0.0.1:{port}/healthz", 60)
        assert (status("kept"), status("revoked"), status("added")) == (200, 200, 401)
        write("after.yaml")
        poll(lambda: status("revoked") == 401, 20, 0.2, "the removed token refused")
        assert (status("kept"), status("added")) == (200, 200)
        assert "token(s) in force" in (tmp_path / "up.log").read_text()
    finally:
        server.stop()
