"""The cache tier and the stager against a real S3 endpoint (moto's server) behind a fault-injecting proxy."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import pytest
import yaml

from conftest import poll, thaw_cli
from s3_servers import FaultProxy, start_moto
from thaw.cache_warmer.tier.ensure import ensure
from thaw.cache_warmer.tier.origins import DirOrigin, ObjectInfo, S3Origin
from thaw.cache_warmer.tier.stager import StageSettings
from thaw.cache_warmer.tier.cache import CacheError, CacheTier, Entry, check_key, plan_evictions, safe_name

SETTINGS = StageSettings(parallel=4, part_size=256 << 10, attempts=6, backoff=0.01)
FILES = {"config.json": b'{"a": 1}', "model.safetensors": os.urandom(3 << 20) + b"end",
         "sub/tokenizer.json": os.urandom(300 << 10)}


@pytest.fixture(scope="module")
def s3():
    server, url = start_moto()
    proxy = FaultProxy(url)
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket="models")
    for name, data in FILES.items():
        client.put_object(Bucket="models", Key=f"tiny/v1/{name}", Body=data)
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    yield proxy, client
    proxy.stop()
    server.stop()


def origin(proxy: FaultProxy, uri: str = "s3://models/tiny/v1") -> S3Origin:
    return S3Origin(uri, endpoint_url=proxy.url, region="us-east-1", read_timeout=5)


def assert_same_bytes(path: Path) -> None:
    for name, data in FILES.items():
        assert hashlib.sha256((path / name).read_bytes()).digest() == hashlib.sha256(data).digest(), name


def test_staging_survives_faults_and_ends_with_the_right_bytes(s3, tmp_path):
    proxy, _ = s3
    proxy.faults.extend(["500", "reset", "truncate", ("delay", 0.3), "500", "truncate"])
    retries = []
    result = ensure(CacheTier(tmp_path, 1 << 30), origin(proxy), settings=SETTINGS, on_retry=retries.append)
    assert result.staged
    assert_same_bytes(result.path)
    assert not proxy.faults  # every fault was hit
    # botocore retries the 500 and the reset itself; a body cut short is the stager's to retry
    assert len(retries) >= 2, retries
    manifest = (result.path / "manifest.json").read_text()
    assert "sha256" in manifest and not list((tmp_path / "staging").iterdir())


def test_two_concurrent_ensures_make_one_download(s3, tmp_path):
    proxy, _ = s3
    proxy.reset_counters()
    tier = CacheTier(tmp_path, 1 << 30)
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure(tier, origin(proxy), settings=SETTINGS)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.staged for r in results) == [False, True]
    assert results[0].path == results[1].path
    assert proxy.object_bytes == sum(len(d) for d in FILES.values())  # every byte fetched once


def _spec(tmp_path: Path, proxy: FaultProxy, capacity: str = "1Gi") -> Path:
    spec = {"platform": {"cache": {"path": str(tmp_path / "cache"), "capacity": capacity},
                         "origin": {"s3": {"endpointUrl": proxy.url, "region": "us-east-1"}}},
            "models": [{"name": "tiny", "source": "s3://models/tiny/v1"},
                       {"name": "missing", "source": "s3://models/none"}]}
    path = tmp_path / "thaw.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


thaw = thaw_cli


def test_sigkill_mid_download_then_rerun_resumes_and_verifies(s3, tmp_path):
    proxy, _ = s3
    spec = _spec(tmp_path, proxy)
    proxy.reset_counters()
    # 3.3 MB at 2 Mbit/s takes about 13 s: time enough to kill it half way, however late this test gets the CPU.
    stager = subprocess.Popen([sys.executable, "-m", "thaw.cli", "warm", "tiny", "-f", str(spec), "--parallel", "2",
                               "--part-size-mib", "1", "--bandwidth-mbps", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journals = tmp_path / "cache" / "staging"
    poll(lambda: any(p.stat().st_size > 0 for p in journals.rglob("*.done")), 30, 0.05, "a finished part")
    os.kill(stager.pid, signal.SIGKILL)
    stager.wait()
    first_run = proxy.object_bytes
    assert not list((tmp_path / "cache" / "versions").iterdir())  # nothing half-written is published
    proxy.reset_counters()
    out = thaw("warm", "tiny", "-f", str(spec), "--part-size-mib", "1")
    assert out.returncode == 0, out.stderr
    total = sum(len(d) for d in FILES.values())
    assert 0 < proxy.object_bytes < total  # only what was missing
    assert first_run + proxy.object_bytes >= total
    version = next((tmp_path / "cache" / "versions").iterdir())
    assert_same_bytes(version)
    assert thaw("cache", "verify", "-f", str(spec)).returncode == 0


@pytest.fixture
def small_disk(tmpfs):
    """A real 2 MiB filesystem (tmpfs), smaller than the test model's 3.3 MB."""
    return tmpfs("2m")


def test_staging_onto_a_full_disk_is_one_clear_error_and_publishes_nothing(s3, small_disk):
    proxy, _ = s3
    spec = _spec(small_disk, proxy)
    out = thaw("warm", "tiny", "-f", str(spec))
    assert out.returncode == 1
    assert "disk is full" in out.stderr and "Traceback" not in out.stderr + out.stdout, out.stderr
    assert not list((small_disk / "cache" / "versions").iterdir())
    assert thaw("cache", "ls", "-f", str(spec)).returncode == 0


@pytest.mark.parametrize("from_folder", [False, True])
def test_a_part_damaged_on_disk_after_its_write_is_fetched_again(s3, tmp_path, monkeypatch, from_folder):
    """A write that reported success but left other bytes (a disk that lies, a short write unnoticed): the
    read-back check finds it before publishing, and the file is fetched again. A folder origin has no
    checksum of its own: the digests of what it sent are the reference."""
    from thaw.cache_warmer.tier import stager
    from thaw.cache_warmer.tier.origins import DirOrigin

    proxy, _ = s3
    source = origin(proxy)
    if from_folder:
        folder = tmp_path / "source"
        folder.mkdir()
        for name, data in FILES.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        source = DirOrigin(folder)
    real_write, damaged = stager._FileState.write, []

    def write_then_damage(state, start, data):
        real_write(state, start, data)
        if not damaged and state.info.name == "model.safetensors":
            damaged.append(start)
            with open(state.path, "r+b") as f:  # zeros from here on, as a full disk left them
                f.seek(start + len(data) // 2)
                f.write(bytes(len(data) - len(data) // 2))

    monkeypatch.setattr(stager._FileState, "write", write_then_damage)
    retries = []
    result = ensure(CacheTier(tmp_path / "tier", 1 << 30), source, settings=SETTINGS, on_retry=retries.append)
    assert damaged and any("checksum mismatch" in r for r in retries)
    assert_same_bytes(result.path)


def _warmed(s3, tmp_path: Path) -> tuple[Path, Path]:
    """`thaw warm` of the test model: the spec, and the published version's folder."""
    proxy, _ = s3
    spec = _spec(tmp_path, proxy)
    assert thaw("warm", "tiny", "-f", str(spec)).returncode == 0
    return spec, next((tmp_path / "cache" / "versions").iterdir())


def test_corrupted_file_is_found_by_verify_and_restaged(s3, tmp_path):
    spec, version = _warmed(s3, tmp_path)
    damaged = version / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[1000] ^= 0xFF
    damaged.write_bytes(bytes(data))
    found = thaw("cache", "verify", "-f", str(spec), "--no-repair")
    assert found.returncode == 1 and "model.safetensors" in found.stdout
    repaired = thaw("cache", "verify", "-f", str(spec))
    assert repaired.returncode == 0 and "re-staged" in repaired.stdout
    assert_same_bytes(version)
    assert "tiny/v1" in thaw("cache", "ls", "-f", str(spec)).stdout


def test_verify_holds_a_version_to_the_origins_own_checksum_not_only_its_manifest(s3, tmp_path):
    """Damaged bytes whose manifest was rewritten to match them: the origin's MD5 (its ETag) still tells."""
    import json

    from thaw.cache_warmer.tier.cache import file_digests

    spec, version = _warmed(s3, tmp_path)
    damaged = version / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-3] + b"xyz")
    manifest = json.loads((version / "manifest.json").read_text())
    for f in manifest["files"]:
        if f["name"] == "model.safetensors":
            f["sha256"] = file_digests(damaged)[0]
    (version / "manifest.json").write_text(json.dumps(manifest))
    found = thaw("cache", "verify", "-f", str(spec), "--no-repair")
    assert found.returncode == 1 and "model.safetensors" in found.stdout


@pytest.mark.parametrize("entries,capacity,incoming,expected", [
    ([Entry("a", 10, 1, False, False), Entry("b", 10, 2, False, False)], 30, 5, []),
    ([Entry("a", 10, 1, False, False), Entry("b", 10, 2, False, False)], 25, 10, ["a"]),
    ([Entry("a", 10, 1, True, False), Entry("b", 10, 2, False, False), Entry("c", 10, 3, False, False)],
     30, 10, ["b"]),  # a is pinned: the next oldest goes
    ([Entry("a", 10, 1, False, True), Entry("b", 10, 2, False, False)], 15, 5, ["b"]),  # a is in use
    ([Entry("a", 10, 1, True, False), Entry("b", 10, 2, False, True)], 15, 5, CacheError),
])
def test_eviction_plan(entries, capacity, incoming, expected):
    if expected is CacheError:
        with pytest.raises(CacheError, match="pinned or in use"):
            plan_evictions(entries, capacity, incoming)
    else:
        assert plan_evictions(entries, capacity, incoming) == expected


def _dir_model(root: Path, name: str, size: int) -> DirOrigin:
    (root / name).mkdir(parents=True)
    (root / name / "w.safetensors").write_bytes(os.urandom(size))
    return DirOrigin(root / name)


def test_eviction_keeps_pinned_and_leased_versions(tmp_path):
    tier = CacheTier(tmp_path / "cache", capacity=250_000)
    pinned = ensure(tier, _dir_model(tmp_path, "p", 100_000), pin=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        leased = ensure(tier, _dir_model(tmp_path, "l", 100_000), lease_pid=holder.pid)
        with pytest.raises(CacheError, match="cannot fit"):
            ensure(tier, _dir_model(tmp_path, "x", 100_000))
        assert tier.is_published(pinned.key) and tier.is_published(leased.key)
    finally:
        holder.kill()
        holder.wait()
    third = ensure(tier, DirOrigin(tmp_path / "x"))  # the lease died with its process: now it can go
    assert not tier.is_published(leased.key) and tier.is_published(pinned.key) and tier.is_published(third.key)


@pytest.mark.parametrize("name", ["../evil", "a/../../b", "/etc/passwd", "a\\b", "", "a//b", "./x", "manifest.json"])
def test_traversal_in_names_is_refused(name):
    with pytest.raises(CacheError):
        safe_name(name)


@pytest.mark.parametrize("key", ["../x", "ABC", "a" * 31, "g" * 32, "0" * 32 + "/"])
def test_keys_are_checked(key):
    with pytest.raises(CacheError):
        check_key(key)


def test_an_origin_listing_with_traversal_is_refused(tmp_path):
    class Evil(DirOrigin):
        def list(self):
            return [ObjectInfo("../../outside", 3, "x")]

    with pytest.raises(CacheError, match="leave the version folder"):
        ensure(CacheTier(tmp_path / "cache", 1 << 20), Evil(tmp_path))
    assert not (tmp_path / "outside").exists()


# ---- the warmer's CloudEvents service, under real gunicorn ------------------------------------------

@pytest.fixture(scope="module")
def warmer(s3, tmp_path_factory):
    from thaw.launch import ServerProcess, base_env, free_port

    proxy, _ = s3
    work = tmp_path_factory.mktemp("warmer")
    spec = _spec(work, proxy)
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "thaw.cli", "cache-warmer", "-f", str(spec), "--port", str(port)],
                           work / "warmer.log", env=base_env())
    url = f"http://127.0.0.1:{port}"
    server.wait_http(url + "/readyz", 30)
    yield url, CacheTier(work / "cache", 1 << 30)
    server.stop()


def _post_event(url: str, kind: str, data, structured: bool = False, **extra):
    import requests
    from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event, to_structured_event
    from cloudevents.core.v1.event import CloudEvent

    event = CloudEvent({"type": kind, "source": "/tests", "datacontenttype": "application/json", **extra}, data)
    message = (to_structured_event if structured else to_binary_event)(event)
    r = requests.post(url + "/", data=message.body, headers=message.headers, timeout=60)
    reply = from_http_event(HTTPMessage(dict(r.headers), r.content)) if r.status_code == 200 else None
    return r, reply


REVISION = {"apiVersion": "serving.knative.dev/v1", "kind": "Revision",
            "metadata": {"name": "tiny-00001", "namespace": "default",
                         "labels": {"serving.knative.dev/service": "tiny"}}}


@pytest.mark.parametrize("data,structured", [
    (REVISION, False),  # Resource mode
    ({"apiVersion": "serving.knative.dev/v1", "kind": "Revision", "name": "tiny-00003", "namespace": "default"},
     True),  # Reference mode
])
def test_warmer_stages_on_revision_events(warmer, data, structured):
    url, tier = warmer
    r, reply = _post_event(url, "dev.knative.apiserver.resource.add", data, structured,
                           subject="/apis/serving.knative.dev/v1/namespaces/default/revisions/tiny-00001")
    assert r.status_code == 200 and reply.get_type() == "dev.thaw.cache.staged"
    assert tier.is_published(reply.get_data()["key"])


def test_warmer_warm_request_pins(warmer):
    url, tier = warmer
    r, reply = _post_event(url, "dev.thaw.cache.warm", {"model": "tiny", "pin": True})
    assert reply.get_type() == "dev.thaw.cache.staged" and tier.pinned(reply.get_data()["key"])


def test_warmer_reports_failures_as_events(warmer):
    r, reply = _post_event(warmer[0], "dev.thaw.cache.warm", {"model": "missing"})
    assert r.status_code == 200 and reply.get_type() == "dev.thaw.cache.failed"
    assert "s3://models/none" in reply.get_data()["error"]


@pytest.mark.parametrize("kind,data,status,fragment", [
    ("dev.thaw.cache.warm", {"model": "nope"}, 400, "no model 'nope'"),
    ("dev.thaw.cache.warm", {"pin": True}, 400, "needs data"),
    ("dev.knative.apiserver.resource.add", {"kind": "Service", "metadata": {"name": "x"}}, 400, "Revision"),
    ("dev.knative.apiserver.resource.add", {"kind": "Revision"}, 400, "no metadata.name"),
    ("com.example.other", {}, 400, "unsupported event type"),
    ("dev.knative.apiserver.resource.delete", REVISION, 202, None),
    ("dev.knative.apiserver.resource.add", {**REVISION, "metadata": {"name": "other-00001"}}, 202, None),
])
def test_warmer_bad_and_ignored_events(warmer, kind, data, status, fragment):
    r, _ = _post_event(warmer[0], kind, data)
    assert r.status_code == status, r.text
    if fragment:
        assert fragment in r.json()["error"]


def test_warmer_refuses_invalid_cloudevents(warmer):
    import requests

    r = requests.post(warmer[0] + "/", data=b"{}", headers={"ce-type": "dev.thaw.cache.warm", "ce-source": "/t",
                                                            "ce-specversion": "1.0"}, timeout=10)
    assert r.status_code == 400 and "id" in r.json()["error"]
    structured = {"Content-Type": "application/cloudevents+json"}
    deep = b'{"specversion": "1.0", "id": "1", "source": "/t", "type": "dev.thaw.cache.warm", "data": ' + \
        b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = requests.post(warmer[0] + "/", data=deep, headers=structured, timeout=10)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]
    r = requests.get(warmer[0] + "/nothing-here", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    r = requests.get(warmer[0] + "/", timeout=10)
    assert r.status_code == 405 and "POST" in r.headers["Allow"] and "error" in r.json()
    r = requests.post(warmer[0] + "/", data=b"x" * (2 << 20), headers=structured, timeout=10)
    assert r.status_code == 413 and "error" in r.json()


# ---- thaw up stages a new revision's weights before any request -------------------------------------

def test_revision_added_in_thaw_up_is_staged_before_its_first_request(s3, tiny_model, tmp_path):
    import requests

    from thaw.launch import ServerProcess, base_env, free_port

    _, client = s3
    for f in tiny_model.iterdir():
        client.upload_file(str(f), "models", f"tinyreal/{f.name}")
    port = free_port()
    spec = {"platform": {"gateway": {"port": port}, "stateDir": str(tmp_path / "state"),
                         "cache": {"path": str(tmp_path / "cache"), "capacity": "1Gi"},
                         "origin": {"s3": {"endpointUrl": client.meta.endpoint_url, "region": "us-east-1"}}},
            "models": [{"name": "s3tiny", "source": "s3://models/tinyreal", "engine": {"max_model_len": 512}}]}
    path = tmp_path / "thaw.yaml"
    path.write_text(yaml.safe_dump(spec))
    server = ServerProcess([sys.executable, "-m", "thaw.cli", "up", "-f", str(path)], tmp_path / "up.log",
                           env=base_env())
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_http(url + "/healthz", 30)
        tier = CacheTier(tmp_path / "cache", 1 << 30)
        poll(lambda: tier.keys(), 60, 0.1, "the revision's weights staged by the warmer")
        rev = requests.get(url + "/thaw/v1/status", timeout=5).json()["models"][0]["revisions"][0]
        assert rev["replicas"] == {"starting": 0, "ready": 0, "unready": 0, "draining": 0, "parked": 0,
                                   "terminating": 0, "pending": 0}  # staged at zero, no request yet
        r = requests.post(url + "/v1/completions", json={"model": "s3tiny", "prompt": "x", "max_tokens": 3},
                          timeout=180)
        assert r.status_code == 200, r.text
        phases = requests.get(url + "/thaw/v1/status", timeout=5).json()["models"][0]["revisions"][0][
            "last_start_phases"]
        assert phases["stage"] == 0  # the replica found its weights in the tier
        assert tier.in_use(tier.keys()[0])  # leased by the live replica
    finally:
        server.stop(60)


def test_dram_tier_serves_a_whole_copy(tmp_path):
    origin = _dir_model(tmp_path, "d", 50_000)
    result = ensure(CacheTier(tmp_path / "cache", 1 << 20), origin, dram_root=tmp_path / "shm", prewarm=True)
    assert result.path == tmp_path / "shm" / result.key
    assert (result.path / "w.safetensors").read_bytes() == (tmp_path / "d" / "w.safetensors").read_bytes()
    assert (result.path / "manifest.json").exists()
    assert result.timings["prewarm"] > 0  # the copy into DRAM was made (and timed), not skipped
    assert not [p for p in (tmp_path / "shm").iterdir() if p.name.startswith(".")]  # no half copy left


def test_compile_cache_has_one_folder_per_engine_configuration(tmp_path):
    tier = CacheTier(tmp_path, 1 << 30)
    key = "0" * 32
    a, b = tier.compile_dir(key, "a" * 16), tier.compile_dir(key, "b" * 16)
    assert a != b and a.parent == b.parent == tmp_path / "compile" / key
    assert (a / "modelinfos").resolve() == (b / "modelinfos").resolve()  # shared by every version and config
    with pytest.raises(CacheError):
        tier.compile_dir(key, "../../etc")


def test_engine_configuration_id_follows_every_vllm_argument():
    from thaw.spec import EngineArgs

    base = EngineArgs(max_model_len=512)
    assert base.config_id("0.26.0") == EngineArgs(max_model_len=512).config_id("0.26.0")
    others = {EngineArgs(max_model_len=1024), EngineArgs(max_model_len=512, enable_sleep_mode=True),
              EngineArgs(max_model_len=512, enforce_eager=False)}
    ids = {base.config_id("0.26.0"), base.config_id("0.32.0"), *(o.config_id("0.26.0") for o in others)}
    assert len(ids) == 5
    # thaw's own settings are not vLLM's configuration: they share the compile cache
    assert EngineArgs(max_model_len=512, engine_core="mp", kv_cache_gib=2).config_id("0.26.0") == base.config_id("0.26.0")


def test_a_replica_served_from_a_folder_keeps_its_compile_cache_in_the_tier(tiny_model, tmp_path):
    from conftest import TINY_ENGINE
    from thaw.launch import ServerProcess, free_port, function_command
    from thaw.spec import EngineArgs
    from thaw.vllm_platform import detect

    port = free_port()
    cmd = function_command(tiny_model, "tiny", port, TINY_ENGINE, ["--cache-root", str(tmp_path / "tier")])
    server = ServerProcess(cmd, tmp_path / "function.log")
    try:
        server.wait_http(f"http://127.0.0.1:{port}/readyz", 180)
    finally:
        server.stop()
    key = next((tmp_path / "tier" / "compile").glob("[0-9a-f]" * 32)).name
    engine = detect().resolve(EngineArgs(**TINY_ENGINE))
    folder = tmp_path / "tier" / "compile" / key / engine.config_id(detect().vllm)
    assert (folder / "modelinfos").is_symlink()
    assert f"vLLM's compile cache at {folder}" in server.log_path.read_text()


def test_a_symlink_out_of_a_model_folder_is_refused_and_nothing_is_staged(tmp_path):
    from thaw.cache_warmer.tier.origins import DirOrigin
    from thaw.cache_warmer.tier.cache import CacheError

    secret = tmp_path / "secret.txt"
    secret.write_text("not a model file")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "inside.json").symlink_to(folder / "config.json")  # a link within the folder is fine
    (folder / "tokenizer.json").symlink_to(secret)
    tier = CacheTier(tmp_path / "tier", 1 << 30)
    with pytest.raises(CacheError, match="outside the model folder"):
        ensure(tier, DirOrigin(folder), settings=SETTINGS)
    assert not list((tmp_path / "tier" / "versions").iterdir())
    (folder / "tokenizer.json").unlink()
    result = ensure(tier, DirOrigin(folder), settings=SETTINGS)
    assert (result.path / "inside.json").read_text() == "{}"


def test_an_hf_source_is_staged_from_the_hub_with_a_progress_bar(tmp_path, loop, tiny_model):
    """KServe's hf:// storage: the model's files from a hub (a stand-in on loopback, paging its listing as the
    hub does) into the tier, byte for byte, under HF_HUB_OFFLINE as every thaw process runs."""
    from hub_standin import hub_app

    hub = loop.serve(hub_app("acme/tiny", tiny_model, revision="v1"))
    spec = tmp_path / "thaw.yaml"
    spec.write_text(yaml.safe_dump({"platform": {"cache": {"path": str(tmp_path / "cache"), "capacity": "1Gi"}},
                                    "models": [{"name": "tiny", "source": "hf://acme/tiny:v1"}]}))
    env = {**os.environ, "HF_ENDPOINT": hub, "HF_HUB_OFFLINE": "1"}
    out = thaw("warm", "tiny", "-f", str(spec), env=env)
    assert out.returncode == 0, out.stderr
    assert "staging tiny" in out.stdout and "kB" in out.stdout  # the stager's progress bar: bytes and rate
    staged = next((tmp_path / "cache" / "versions").iterdir())
    for f in tiny_model.rglob("*"):
        if f.is_file():
            assert (staged / f.relative_to(tiny_model)).read_bytes() == f.read_bytes(), f.name
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"platform": {"cache": {"path": str(tmp_path / "cache"), "capacity": "1Gi"}},
                                      "models": [{"name": "tiny", "source": "hf://acme/none"}]}))
    out = thaw("warm", "tiny", "-f", str(missing), env=env)
    assert out.returncode == 1 and "no such model or revision" in out.stderr and "Traceback" not in out.stderr


def test_warmer_stages_a_revisions_own_weights_once(warmer):
    """The revision's own source (its annotation), not the spec's; its updates (status changes) stage nothing."""
    url, tier = warmer
    revision = {**REVISION, "metadata": {**REVISION["metadata"], "name": "tiny-00009",
                                         "annotations": {"thaw.dev/source": "s3://models/tiny/v1"}}}
    r, reply = _post_event(url, "dev.knative.apiserver.resource.add", revision)
    assert reply.get_type() == "dev.thaw.cache.staged" and reply.get_data()["source"] == "s3://models/tiny/v1"
    r, reply = _post_event(url, "dev.knative.apiserver.resource.update", revision)
    assert r.status_code == 202 and reply is None  # nothing about its weights changed: nothing staged, nothing read
    moved = {**revision, "metadata": {**revision["metadata"], "annotations": {"thaw.dev/source": "s3://models/none"}}}
    r, reply = _post_event(url, "dev.knative.apiserver.resource.update", moved)
    assert reply.get_type() == "dev.thaw.cache.failed" and "s3://models/none" in reply.get_data()["error"]
