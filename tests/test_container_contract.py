"""Knative's container contract for embedded replicas: what every container gets in its environment."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from thaw.knative.embedded.control.plane import replica_weights
from thaw.knative.embedded.control.supervisor import Supervisor
from thaw.spec import parse_spec


def test_an_embedded_replica_gets_port_and_the_k_names_as_knative_gives_them(tiny_model, tmp_path):
    """Knative sets PORT, K_SERVICE, K_CONFIGURATION and K_REVISION in every container; the supervisor does
    too. The replica here is a cold process (no standby), so /proc shows the environment it started with."""
    spec = parse_spec(yaml.safe_dump({"platform": {"stateDir": str(tmp_path / "state")},
                                      "models": [{"name": "m", "source": str(tiny_model)}]}))
    model = spec.models[0]

    async def start_and_read():
        supervisor = Supervisor(tmp_path / "state", None)
        replica = await supervisor.start("m-00007", model, replica_weights(model, spec), {})
        try:
            raw = Path(f"/proc/{replica.pid}/environ").read_bytes().decode()
        finally:
            await supervisor.stop(replica, 0)
        return replica, dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)

    replica, env = asyncio.run(start_and_read())
    assert not replica.via_standby
    assert env["PORT"] == str(replica.port)
    assert (env["K_SERVICE"], env["K_CONFIGURATION"], env["K_REVISION"]) == ("m", "m", "m-00007")
