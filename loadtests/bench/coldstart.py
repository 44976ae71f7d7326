"""`thaw bench coldstart -f thaw.yaml`: the first request after zero, side by side, N runs each, on the
spec's model and engine args:

- thaw, weights pre-staged (by the warmer at revision creation), replica forked from the standby;
- thaw, pre-staged, replica launched as a new process (standby off);
- thaw, not staged: fetched at first request from an S3 origin limited to a per-instance bandwidth;
- vLLM's own OpenAI server launched cold (what a Knative Service running vLLM's image pays).

Each thaw start is broken into phases from the platform's own timing (the activator's hold time in
`X-Thaw-Queue-Seconds`, the replica's start phases in `thaw status`). Then a burst of requests at zero.
Writes results JSON, a Markdown report and PNG plots (stacked phases per variant; the burst's latency CDF).
The S3 endpoint is moto's server on loopback, in its own process.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import aiohttp
import requests
from rich.console import Console
from rich.progress import Progress

from thaw.loadtests.bench.common import (PlaneUnderTest, first_token_after_launch, mean, ratio_table, stream_chat,
                                         write_json)
from thaw.loadtests.metrics import percentile, summary
from thaw.loadtests.bench.staging import BUCKET, s3_client, start_s3
from thaw.launch import ServerProcess, base_env, free_port, vllm_server_command
from thaw.spec import Model, Spec

VARIANTS = {"prestaged": "pre-staged, standby", "nostandby": "pre-staged, no standby",
            "fetched": "not staged, capped origin"}
PHASES = [("process_start", "process start"), ("imports", "imports"), ("staging", "staging"),
          ("weights", "weights + prewarm"), ("engine_init", "engine init"), ("warmup", "warm-up"),
          ("other", "probe + routing"), ("after_release", "first token after release")]


def _model_folder(model: Model, spec: Spec, work: Path, console: Console) -> Path:
    """A local folder with the model's weights (staged once from its origin if it has one)."""
    if not model.source.startswith("s3://"):
        return Path(model.source).resolve()
    from thaw.cache_warmer.tier.commands import warm_model

    local = spec.model_copy(update={"platform": spec.platform.model_copy(update={
        "cache": spec.platform.cache.model_copy(update={"path": str(work / "origin-copy")})})})
    return Path(warm_model(local, model, console).path)


def ask(url: str, model: str, n: int = 1) -> list[dict]:
    """`n` streamed requests at once: each one's first token and how long the activator held it."""
    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
            return await asyncio.gather(*(stream_chat(session, url, model, 8, "What is the capital of France?")
                                          for _ in range(n)))
    return [{"ok": r.ok, "first_token": r.ttft, "queued": r.queued, "error": r.error,
             "cold": r.record.cold if r.record else None} for r in asyncio.run(run())]


def breakdown(first_token: float, queued: float, phases: dict[str, float]) -> dict[str, float]:
    """A start from zero as stacked phases that add up to the first token."""
    staging = phases.get("cache_wait", 0.0) + phases.get("stage", 0.0)
    out = {"process_start": phases.get("process_start", 0.0), "imports": phases.get("imports", 0.0),
           "staging": staging, "weights": max(0.0, phases.get("weights", 0.0) - staging) + phases.get("prewarm", 0.0),
           "engine_init": phases.get("engine_init", 0.0), "warmup": phases.get("warmup", 0.0)}
    out["other"] = max(0.0, queued - sum(out.values()))
    out["after_release"] = max(0.0, first_token - queued)
    return out


def bench_models(model: Model, upload_prefixes: dict[str, str]) -> list[dict]:
    base = model.model_dump(mode="json", exclude={"name", "source", "servedName", "traffic", "standby", "scaling",
                                                  "containerConcurrency", "cache"})
    out = []
    for name, prefix in upload_prefixes.items():
        out.append({**base, "name": name, "source": f"s3://{BUCKET}/{prefix}", "standby": name != "nostandby",
                    "cache": {"prewarm": True},
                    # one replica takes the whole burst: on a 2-core machine a second replica starting beside
                    # the first only slows both (see docs/benchmarks.md)
                    "scaling": {"window": "6s", "max-scale": 1}, "containerConcurrency": 64})
    return out


def run_coldstart_bench(spec: Spec, model_name: str | None, runs: int, burst: int, mbps: float, out_dir: Path,
                        console: Console) -> dict:
    model = spec.model(model_name) if model_name else spec.models[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    folder = _model_folder(model, spec, work, console)
    engine_args = model.engine.model_dump(exclude_none=True, exclude={"kv_cache_gib", "engine_core"})
    results: dict[str, list[dict]] = {k: [] for k in [*VARIANTS, "vllm"]}
    burst_results: list[dict] = []
    moto, s3_url = start_s3(work)
    plane = None
    try:
        client = s3_client(s3_url)
        client.create_bucket(Bucket=BUCKET)
        prefixes = {name: f"bench-{name}" for name in VARIANTS}
        for prefix in prefixes.values():
            for f in sorted(folder.iterdir()):
                if f.is_file():
                    client.upload_file(str(f), BUCKET, f"{prefix}/{f.name}")
        port = free_port()
        bench_spec = {"platform": {"gateway": {"port": port}, "stateDir": str(work / "state"),
                                   "cache": {"path": str(work / "cache"), "capacity": "20Gi"},
                                   "origin": {"s3": {"endpointUrl": s3_url, "region": "us-east-1",
                                                     "bandwidthMbps": mbps}},
                                   "autoscaler": {"scale-to-zero-grace-period": "1s", "tick-interval": "1s"}},
                      "models": bench_models(model, prefixes)}
        plane = PlaneUnderTest(work, bench_spec)
        from thaw.cache_warmer.tier.cache import CacheTier

        tier = CacheTier(work / "cache", 20 << 30)

        def version_of(name: str) -> str | None:
            return next((k for k in tier.keys() if tier.manifest(k)["source"].endswith(prefixes[name])), None)

        def all_at_zero() -> bool:
            return all(plane.at_zero(name) for name in VARIANTS)

        with Progress(console=console) as progress:
            setup = progress.add_task("platform up, weights staged by the warmer", total=3)
            plane.server.wait_http(plane.url + "/healthz", 60)
            progress.advance(setup)
            plane.wait(lambda: requests.get(plane.url + "/thaw/v1/status", timeout=5).json()["standby"], 300, "standby")
            progress.advance(setup)
            plane.wait(lambda: all(version_of(n) for n in VARIANTS), 1800, "the warmer staged every variant")
            progress.advance(setup)

            warm = progress.add_task("untimed first start of each (page cache)", total=len(VARIANTS) + 1)
            for name in VARIANTS:
                plane.wait(all_at_zero, 120, "all at zero")
                ask(plane.url, name)
                progress.advance(warm)
            _vllm_start(folder, engine_args, work / "vllm-warmup.log")
            progress.advance(warm)

            timed = progress.add_task("timed starts from zero", total=runs * (len(VARIANTS) + 1))
            for i in range(runs):
                for name in VARIANTS:
                    plane.wait(all_at_zero, 120, "all at zero")
                    if name == "fetched":
                        tier.evict(version_of("fetched"), force=True)  # gone: fetched at first request
                    answer = ask(plane.url, name)[0]
                    if not answer["ok"]:
                        raise RuntimeError(f"{name}: {answer['error']}")
                    phases = plane.status(name)["last_start_phases"]
                    results[name].append({**answer, "phases": phases,
                                          "breakdown": breakdown(answer["first_token"], answer["queued"], phases)})
                    progress.advance(timed)
                results["vllm"].append(_vllm_start(folder, engine_args, work / f"vllm-{i}.log"))
                progress.advance(timed)

            task = progress.add_task(f"burst of {burst} at zero", total=1)
            plane.wait(all_at_zero, 120, "all at zero")
            burst_results = ask(plane.url, "prestaged", burst)
            progress.advance(task)
    finally:
        if plane is not None:
            plane.server.stop(60)
        moto.terminate()
        moto.wait(10)

    result = {"model": model.name, "engine_args": engine_args, "runs": runs, "bandwidth_mbps": mbps,
              "starts": results, "burst": burst_results}
    write_json(out_dir / "coldstart.json", result)
    report = _report(result, out_dir)
    (out_dir / "coldstart.md").write_text(report)
    _print(result, console)
    console.print(f"report: {out_dir / 'coldstart.md'}; plots: {out_dir / 'coldstart-phases.png'}, "
                  f"{out_dir / 'coldstart-burst-cdf.png'}")
    return result


def _vllm_start(folder: Path, engine_args: dict, log: Path) -> dict:
    port = free_port()
    server = ServerProcess(vllm_server_command(folder, "vllm", port, engine_args), log, env=base_env())
    try:
        timing = first_token_after_launch(server, f"http://127.0.0.1:{port}/health", f"http://127.0.0.1:{port}", "vllm")
    finally:
        server.stop()
    return {"ok": True, "first_token": timing["first_token"],
            "breakdown": {"server start (launch to /health)": timing["ready"],
                          "first token after ready": timing["first_token"] - timing["ready"]}}


def _summary(result: dict) -> dict:
    starts = result["starts"]
    first = {k: mean([r["first_token"] for r in v]) for k, v in starts.items()}
    burst = [r["first_token"] for r in result["burst"] if r.get("ok")]
    # every thaw request that found its revision at zero: each run's first request and the whole burst
    cold = [r["first_token"] for k, v in starts.items() if k != "vllm" for r in v if r.get("cold")]
    cold += [r["first_token"] for r in result["burst"] if r.get("ok") and r.get("cold")]
    return {"first": first, "burst_ok": len(burst), "burst_total": len(result["burst"]),
            "burst_p50": percentile(burst, 50), "burst_p95": percentile(burst, 95), "cold_ttft": summary(cold)}


def _print(result: dict, console: Console) -> None:
    s = _summary(result)
    vllm = s["first"]["vllm"]
    console.print(ratio_table(f"first token from zero, seconds (mean of {result['runs']}; origin capped at "
                              f"{result['bandwidth_mbps']:g} Mbit/s)", [
        ("thaw: pre-staged, standby", s["first"]["prestaged"], vllm, "<= 0.3x"),
        ("thaw: pre-staged, no standby", s["first"]["nostandby"], vllm, ""),
        ("thaw: not staged, capped origin", s["first"]["fetched"], vllm, ""),
    ], "thaw", "vLLM server cold"))
    c = s["cold_ttft"]
    console.print(f"cold TTFT over {c['count']} cold requests (all variants and the burst): p50 {c['p50']:.2f} s, "
                  f"p90 {c['p90']:.2f} s, p99 {c['p99']:.2f} s")
    console.print(ratio_table(f"burst of {s['burst_total']} requests at zero ({s['burst_ok']} succeeded)", [
        ("p95 first response vs one cold start", s["burst_p95"], s["first"]["prestaged"], "<= 1.5x"),
        ("p50 first response vs one cold start", s["burst_p50"], s["first"]["prestaged"], ""),
    ], "burst", "single"))


def _report(result: dict, out_dir: Path) -> str:
    s = _summary(result)
    vllm = s["first"]["vllm"]
    lines = [f"# Cold start: `{result['model']}`", "",
             f"Engine args: `{json.dumps(result['engine_args'])}`; {result['runs']} timed runs per variant after one "
             f"untimed start each; origin (moto's S3 on loopback) capped at {result['bandwidth_mbps']:g} Mbit/s.", "",
             "## First token from zero (seconds)", "",
             "| variant | mean | median | min | max | vs vLLM cold |", "|---|---|---|---|---|---|"]
    names = {**VARIANTS, "vllm": "vLLM's server, launched cold"}
    for key, label in names.items():
        values = [r["first_token"] for r in result["starts"][key]]
        lines.append(f"| {label} | {mean(values):.2f} | {percentile(values, 50):.2f} | {min(values):.2f} | "
                     f"{max(values):.2f} | {mean(values) / vllm:.2f}x |")
    lines += ["", "## Where a start goes (seconds, mean)", "",
              "| variant | " + " | ".join(label for _, label in PHASES) + " |",
              "|---" * (len(PHASES) + 1) + "|"]
    for key in VARIANTS:
        row = [mean([r["breakdown"][p] for r in result["starts"][key]]) for p, _ in PHASES]
        lines.append(f"| {VARIANTS[key]} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    vllm_parts = result["starts"]["vllm"][0]["breakdown"].keys()
    lines.append("| vLLM's server | " + "; ".join(
        f"{p}: {mean([r['breakdown'][p] for r in result['starts']['vllm']]):.2f}" for p in vllm_parts) + " |")
    lines += ["", f"## Burst of {s['burst_total']} requests at zero", "",
              f"{s['burst_ok']}/{s['burst_total']} succeeded; first response p50 {s['burst_p50']:.2f} s, "
              f"p95 {s['burst_p95']:.2f} s = {s['burst_p95'] / s['first']['prestaged']:.2f}x one cold start "
              f"({s['first']['prestaged']:.2f} s; target <= 1.5x).", "",
              "![phases](coldstart-phases.png)", "", "![burst](coldstart-burst-cdf.png)", ""]
    _plots(result, out_dir)
    return "\n".join(lines)


def _plots(result: dict, out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    labels = [VARIANTS[k] for k in VARIANTS] + ["vLLM server, cold"]
    left = [0.0] * len(labels)
    for phase, label in PHASES:
        widths = [mean([r["breakdown"][phase] for r in result["starts"][k]]) for k in VARIANTS] + [0.0]
        ax.barh(labels, widths, left=left, label=label)
        left = [a + b for a, b in zip(left, widths)]
    for part in result["starts"]["vllm"][0]["breakdown"]:
        widths = [0.0] * len(VARIANTS) + [mean([r["breakdown"][part] for r in result["starts"]["vllm"]])]
        ax.barh(labels, widths, left=left, label=f"vLLM: {part}", hatch="//")
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("seconds to first token from zero")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("where a cold start goes")
    fig.tight_layout()
    fig.savefig(out_dir / "coldstart-phases.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    burst = sorted(r["first_token"] for r in result["burst"] if r.get("ok"))
    if burst:
        ax.step(burst, [(i + 1) / len(burst) for i in range(len(burst))], where="post", label="burst at zero")
    single = mean([r["first_token"] for r in result["starts"]["prestaged"]])
    ax.axvline(single, color="gray", linestyle="--", label="one request at zero (mean)")
    ax.axvline(single * 1.5, color="red", linestyle=":", label="1.5x target")
    ax.set_xlabel("first response (s)")
    ax.set_ylabel("fraction of the burst")
    ax.set_title(f"burst of {len(result['burst'])} requests at zero")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "coldstart-burst-cdf.png", dpi=120)
    plt.close(fig)
