"""A replica forked from the standby boots from typed settings (knative/embedded/control/standby.py's
ReplicaLaunch); a new replica process (or a pod) from the same settings as `thaw function serve`'s flags.
Both must give the function the same configuration. Here the CLI runs for real up to the point where it
would start gunicorn: `serve` is replaced by a recorder (starting gunicorn is what the other tests do)."""

from __future__ import annotations

import json

import pytest

from thaw.cli import app
from thaw.functions.boot import function_config
from thaw.knative.embedded.control.standby import ReplicaLaunch
from thaw.launch import ReplicaBoot, serve_args
from thaw.spec import EngineArgs

ENGINE = EngineArgs(max_model_len=512, dtype="bfloat16", enforce_eager=True, kv_cache_gib=2, max_num_seqs=16)


def boots(folder: str) -> list[ReplicaBoot]:
    return [
        ReplicaBoot(model_dir=folder, cache_root=folder + "/tier", cache_capacity="10Gi", max_body_size="1Mi"),
        ReplicaBoot(model_dir=folder),
        ReplicaBoot(source="s3://bucket/models/m", cache_root=folder + "/tier", prewarm=False,
                    s3_endpoint="http://127.0.0.1:9000", s3_region="eu-west-1", bandwidth_mbps=100.0),
        ReplicaBoot(source=folder, cache_root=folder + "/tier", dram_root=folder + "/dram"),
    ]


@pytest.mark.parametrize("which", range(4))
def test_a_forked_replica_and_a_new_process_boot_the_same_configuration(which, tmp_path, monkeypatch):
    boot = boots(str(tmp_path))[which]
    seen = {}
    monkeypatch.setattr("thaw.functions.serve.serve",
                        lambda config, host, port, threads: seen.update(config=config, host=host, port=port))
    flags = serve_args(None, "m", 8123, ENGINE.model_dump(exclude_none=True), boot.flags())
    app(args=flags, standalone_mode=False)  # `thaw function serve ...`, as a new replica process runs it

    # what the supervisor sends the standby, through JSON as it travels
    launch = ReplicaLaunch.from_json(json.loads(json.dumps(ReplicaLaunch(boot, "m", ENGINE, 8123).to_json())))
    assert launch.engine == ENGINE and launch.boot == boot
    assert seen["config"] == function_config(launch.boot, launch.served_name, launch.engine)
    assert seen["port"] == launch.port and seen["host"] == launch.host


def test_a_boot_with_both_a_folder_and_a_source_is_refused(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        function_config(ReplicaBoot(model_dir=str(tmp_path), source="s3://b/m"), "m", ENGINE)
    with pytest.raises(ValueError, match="exactly one"):
        function_config(ReplicaBoot(), "m", ENGINE)
