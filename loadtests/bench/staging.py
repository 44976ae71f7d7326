"""`thaw bench staging`: the stager next to boto3's download_file, and first requests with and without
weights pre-staged, against a real S3 endpoint (moto's server, its own process, on loopback).

(a) a synthetic multi-file model (>= 1 GiB): the stager (parallel ranged reads across all files,
    written in place, verified) versus boto3's default `download_file`, file after file;
(b) the first request after zero through `thaw up`: weights pre-staged by the warmer when the revision
    was created, versus fetched by the replica at boot from an origin limited to a per-instance
    bandwidth (a 10 Gbit/s bucket link shared by 100 instances leaves each 100 Mbit/s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
import requests
from rich.console import Console
from rich.progress import Progress

from thaw.loadtests.bench.common import PlaneUnderTest, mean, ratio_table, write_json
from thaw.launch import DEMO_ENGINE_ARGS, free_port

BUCKET = "bench"


def start_s3(work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    log = open(work / "moto.log", "ab")
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            requests.get(url, timeout=1)
            return proc, url
        except requests.RequestException:
            time.sleep(0.2)
    raise RuntimeError("moto_server did not start")


def s3_client(url: str):
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1")


def synthetic_model(client, prefix: str, files: int, file_mib: int) -> int:
    """`files` weight shards of random bytes plus a config, uploaded the way `aws s3 cp` does."""
    total = 0
    chunk = os.urandom(1 << 20)
    for i in range(files):
        data = b"".join(chunk[j:] + chunk[:j] for j in range(file_mib))  # distinct MiBs, cheap to make
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/model-{i:05d}.safetensors", Body=data)
        total += len(data)
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/config.json", Body=b'{"synthetic": true}')
    return total + 19


def bench_throughput(url: str, work: Path, total: int, rounds: int, progress: Progress) -> dict:
    from thaw.cache_warmer.tier.ensure import ensure
    from thaw.cache_warmer.tier.origins import S3Origin
    from thaw.cache_warmer.tier.stager import StageSettings
    from thaw.cache_warmer.tier.cache import CacheTier

    client = s3_client(url)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="synthetic/")["Contents"]]
    results: dict[str, list[float]] = {"thaw stager": [], "boto3 download_file": []}
    task = progress.add_task("staging throughput", total=rounds * 2 * total)
    for _ in range(rounds):  # interleaved, so drift hits both alike
        target = work / "download_file"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        start = time.perf_counter()
        for key in keys:
            client.download_file(BUCKET, key, str(target / Path(key).name),
                                 Callback=lambda n: progress.advance(task, n))
        results["boto3 download_file"].append(total / (time.perf_counter() - start))
        shutil.rmtree(target)

        tier_root = work / "tier"
        shutil.rmtree(tier_root, ignore_errors=True)
        start = time.perf_counter()
        ensure(CacheTier(tier_root, 1 << 40), S3Origin(f"s3://{BUCKET}/synthetic", url, "us-east-1"),
               settings=StageSettings(parallel=16, part_size=16 << 20), on_bytes=lambda n: progress.advance(task, n))
        results["thaw stager"].append(total / (time.perf_counter() - start))
        shutil.rmtree(tier_root)
    return results


def bench_first_request(url: str, work: Path, model_dir: Path, runs: int, mbps: float, progress: Progress) -> dict:
    client = s3_client(url)
    for prefix in ("demo-prestaged", "demo-fetched"):
        for f in sorted(model_dir.iterdir()):
            if f.is_file():
                client.upload_file(str(f), BUCKET, f"{prefix}/{f.name}")
    port = free_port()
    models = [{"name": name, "source": f"s3://{BUCKET}/demo-{name}", "engine": dict(DEMO_ENGINE_ARGS),
               "scaling": {"window": "6s"}} for name in ("prestaged", "fetched")]
    spec = {"platform": {"gateway": {"port": port}, "stateDir": str(work / "state"),
                         "cache": {"path": str(work / "cache"), "capacity": "10Gi"},
                         "origin": {"s3": {"endpointUrl": url, "region": "us-east-1", "bandwidthMbps": mbps}},
                         "autoscaler": {"scale-to-zero-grace-period": "1s", "tick-interval": "1s"}},
            "models": models}
    plane = PlaneUnderTest(work, spec)
    from thaw.cache_warmer.tier.cache import CacheTier

    tier = CacheTier(work / "cache", 10 << 30)
    results: dict[str, list[dict]] = {"prestaged": [], "fetched": []}

    def version_of(name: str) -> str | None:
        return next((k for k in tier.keys() if tier.manifest(k)["source"].endswith(f"demo-{name}")), None)

    task = progress.add_task("first request after zero", total=runs * 2)
    try:
        plane.server.wait_http(plane.url + "/healthz", 60)
        plane.wait(lambda: requests.get(plane.url + "/thaw/v1/status", timeout=5).json()["standby"], 300, "standby")
        plane.wait(lambda: version_of("prestaged") and version_of("fetched"), 900, "warmer staged both at creation")
        for _ in range(runs):
            for name in ("prestaged", "fetched"):
                # every model at zero: no other replica's start, idle loop or drain shares the CPU
                plane.wait(lambda: all(plane.at_zero(m) for m in ("prestaged", "fetched")), 120, "all at zero")
                if name == "fetched":
                    tier.evict(version_of("fetched"), force=True)  # gone from the tier: fetch at first request
                start = time.perf_counter()
                r = requests.post(plane.url + "/v1/chat/completions", timeout=900, json={
                    "model": name, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]})
                r.raise_for_status()
                results[name].append({"first_token": time.perf_counter() - start,
                                      "phases": plane.status(name)["last_start_phases"]})
                progress.advance(task)
    finally:
        plane.server.stop(60)
    return results


def run_staging_bench(model_dir: Path, files: int, file_mib: int, rounds: int, runs: int, mbps: float, out: Path,
                      console: Console) -> dict:
    work = out.parent / "staging-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    with Progress(console=console) as progress:
        # One S3 server per part: the first holds the synthetic GiB in memory, which the second's
        # replicas should not have to live beside.
        for part in ("throughput", "first request"):
            moto, url = start_s3(work)
            try:
                client = s3_client(url)
                client.create_bucket(Bucket=BUCKET)
                if part == "throughput":
                    total = synthetic_model(client, "synthetic", files, file_mib)
                    throughput = bench_throughput(url, work, total, rounds, progress)
                else:
                    first = bench_first_request(url, work, model_dir.resolve(), runs, mbps, progress)
            finally:
                moto.terminate()
                moto.wait(10)
    result = {"synthetic_bytes": total, "throughput_bytes_per_s": throughput, "first_request": first,
              "bandwidth_mbps": mbps}
    write_json(out, result)
    ours, peer = mean(throughput["thaw stager"]), mean(throughput["boto3 download_file"])
    console.print(ratio_table(f"(a) staging {total / 2**30:.2f} GiB in {files + 1} files from S3 (MB/s, mean of "
                              f"{rounds})", [("throughput", ours / 1e6, peer / 1e6, ">= 1.5x")],
                              "thaw stager", "boto3 download_file"))
    pre = mean([r["first_token"] for r in first["prestaged"]])
    fetched = mean([r["first_token"] for r in first["fetched"]])
    def staging(runs: list[dict]) -> float:  # the replica staged it, or waited while the warmer did
        return mean([r["phases"].get("stage", 0) + r["phases"].get("cache_wait", 0) for r in runs])

    console.print(ratio_table(f"(b) first request after zero, seconds (mean of {runs}; origin at {mbps:g} Mbit/s)",
                              [("first response", fetched, pre, ">= 5x"),
                               ("of which staging (or waiting for it)", staging(first["fetched"]),
                                staging(first["prestaged"]), ""),
                               ("of which engine init", mean([r["phases"]["engine_init"] for r in first["fetched"]]),
                                mean([r["phases"]["engine_init"] for r in first["prestaged"]]), "")],
                              "fetched at first request", "pre-staged by the warmer"))
    console.print(f"results: {out}")
    return result
