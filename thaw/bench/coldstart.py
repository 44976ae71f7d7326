"""`thaw bench coldstart`: first token from zero through `thaw up`, next to vLLM's own server launched cold.

Variants, N runs each, on the same model and engine args:
- thaw, standby on: the gateway receives a request for a model at zero; a replica is forked from the
  standby (torch and vLLM already imported) and answers;
- thaw, standby off: the same, with the replica launched as a new process;
- vLLM's server: `python -m vllm.entrypoints.openai.api_server` launched at the moment of the request
  (what a Knative service running vLLM's image pays), first token once it is up.
Then the warm path: concurrent streams through the gateway versus straight to the replica behind it.
"""

from __future__ import annotations

from pathlib import Path

import requests
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from thaw.bench.common import (PlaneUnderTest, first_token_after_launch, mean, percentile, ratio_table,
                               run_streaming_load, write_json)
from thaw.demo import DEMO_ENGINE_ARGS
from thaw.launch import ServerProcess, base_env, free_port, vllm_server_command


def bench_spec(model_dir: Path, state_dir: Path, port: int) -> dict:
    def model(name: str, standby: bool, min_scale: int = 0) -> dict:
        return {"name": name, "source": str(model_dir), "servedName": name, "standby": standby,
                "engine": dict(DEMO_ENGINE_ARGS), "scaling": {"window": "6s", "min-scale": min_scale}}

    return {"platform": {"gateway": {"port": port}, "stateDir": str(state_dir),
                         "autoscaler": {"scale-to-zero-grace-period": "1s", "tick-interval": "1s"}},
            # "warm" stays up (min-scale 1): the direct half of the warm path bypasses the gateway, so the
            # autoscaler sees no load from it and would otherwise scale the replica away mid-run.
            "models": [model("standby", True), model("cold", False), model("warm", True, min_scale=1)]}


def run_coldstart_bench(model_dir: Path, runs: int, clients: int, per_client: int, max_tokens: int, out: Path,
                        console: Console) -> dict:
    model_dir = model_dir.resolve()
    work = out.parent / "coldstart-work"
    work.mkdir(parents=True, exist_ok=True)
    plane = PlaneUnderTest(work, bench_spec(model_dir, work / "state", free_port()))
    starts: dict[str, list] = {"standby": [], "cold": [], "vllm": []}
    warm: dict[str, list] = {"gateway": [], "direct": []}
    with Progress(console=console) as progress:
        try:
            plane.server.wait_http(plane.url + "/healthz", 60)
            plane.wait(lambda: requests.get(plane.url + "/thaw/v1/status", timeout=5).json()["standby"], 180,
                       "standby ready")
            # One untimed start of each path first, so every timed one reads its files from the page cache.
            task = progress.add_task("warming the page cache", total=3)
            for model in ("standby", "cold"):
                plane.first_token_from_zero(model)
                progress.advance(task)
            vllm = ServerProcess(vllm_server_command(model_dir, "vllm", free_port(), DEMO_ENGINE_ARGS),
                                 work / "vllm-warmup.log", env=base_env())
            try:
                port = vllm.cmd[vllm.cmd.index("--port") + 1]
                first_token_after_launch(vllm, f"http://127.0.0.1:{port}/health", f"http://127.0.0.1:{port}", "vllm")
            finally:
                vllm.stop()
            progress.advance(task)

            task = progress.add_task("cold starts", total=runs * 3)
            for i in range(runs):
                for model in ("standby", "cold"):
                    starts[model].append(plane.first_token_from_zero(model))
                    progress.advance(task)
                port = free_port()
                vllm = ServerProcess(vllm_server_command(model_dir, "vllm", port, DEMO_ENGINE_ARGS),
                                     work / f"vllm-{i}.log", env=base_env())
                try:
                    starts["vllm"].append(first_token_after_launch(
                        vllm, f"http://127.0.0.1:{port}/health", f"http://127.0.0.1:{port}", "vllm"))
                finally:
                    vllm.stop()
                progress.advance(task)

            task = progress.add_task("warm path", total=6 * clients * per_client)
            plane.wait(lambda: plane.status("warm")["replicas"]["ready"] == 1, 120, "warm replica")
            run_streaming_load(plane.url, "warm", 2, 1, 8)  # first-request effects stay out of the numbers
            pod = next(p for p in plane.status("warm")["pods"] if p["state"] == "ready")
            direct = f"http://127.0.0.1:{pod['port']}"
            for _ in range(3):  # interleaved rounds, so drift hits both paths alike
                for name, url in (("gateway", plane.url), ("direct", direct)):
                    warm[name].append(run_streaming_load(url, "warm", clients, per_client, max_tokens,
                                                         lambda: progress.advance(task)))
        finally:
            plane.server.stop(60)

    first = {k: [s["first_token"] for s in v] for k, v in starts.items()}
    result = {"model_dir": str(model_dir), "engine_args": DEMO_ENGINE_ARGS, "runs": runs, "starts": starts,
              "warm": {k: [vars(r) for r in v] for k, v in warm.items()}}
    write_json(out, result)

    vllm_mean = mean(first["vllm"])
    console.print(ratio_table(f"first token from zero, seconds (mean of {runs})", [
        ("thaw, standby on", mean(first["standby"]), vllm_mean, "<= 0.35x"),
        ("thaw, standby off", mean(first["cold"]), vllm_mean, ""),
    ], "thaw", "vLLM server cold"))
    phases = Table(title="where a start from zero goes (seconds, mean; from the replica's /readyz)")
    names = ["process_start", "imports", "weights", "engine_init", "warmup"]
    phases.add_column("variant")
    for n in names + ["first token"]:
        phases.add_column(n, justify="right")
    for variant in ("standby", "cold"):
        row = [mean([s["phases"].get(n, 0.0) for s in starts[variant]]) for n in names]
        phases.add_row(variant, *(f"{v:.2f}" for v in row), f"{mean(first[variant]):.2f}")
    console.print(phases)
    g = {k: sum(r.output_tokens for r in warm[k]) / sum(r.wall_seconds for r in warm[k]) for k in warm}
    ttft = {k: mean([r.ttft_p50 for r in warm[k]]) for k in warm}
    failures = {k: sum(r.failures for r in warm[k]) for k in warm}
    console.print(ratio_table(f"warm path: {clients} streams x {per_client}, {max_tokens} tokens", [
        ("failed requests", failures["gateway"], failures["direct"], "0"),
        ("output tokens/s", g["gateway"], g["direct"], ">= 0.97x"),
        ("TTFT p50 (ms)", ttft["gateway"] * 1000, ttft["direct"] * 1000,
         f"overhead {1000 * (ttft['gateway'] - ttft['direct']):.1f} ms (<= 5 ms)"),
        ("TTFT p95 (ms)", mean([r.ttft_p95 for r in warm["gateway"]]) * 1000,
         mean([r.ttft_p95 for r in warm["direct"]]) * 1000, ""),
    ], "gateway", "direct"))
    console.print(f"results: {out} (first token medians: standby {percentile(first['standby'], 50):.2f}s, "
                  f"cold {percentile(first['cold'], 50):.2f}s, vLLM {percentile(first['vllm'], 50):.2f}s)")
    return result
