"""`thaw bench function`: the function next to vLLM's own OpenAI server, same model and engine arguments.

(a) launch to first token, N cold starts each, interleaved;
(b) the warm path, measured by the field's own client (`vllm bench serve`: random dataset, greedy,
    `--ignore-eos`), at each concurrency in turn: vLLM's server, thaw's replica directly, and thaw through
    its gateway (`thaw up`, one replica kept ready), one after the other in one run. Beside them, thaw's own
    streaming client against the same three (its TTFT and tokens/s, as thaw's dashboards count them).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import Progress

from thaw.launch import DEMO_ENGINE_ARGS, ServerProcess, base_env, free_port, function_command, vllm_server_command
from thaw.loadtests.bench import serve_client
from thaw.loadtests.bench.common import (PlaneUnderTest, first_token_after_launch, mean, ratio_table,
                                         run_streaming_load, write_json)
from thaw.loadtests.metrics import percentile

MODEL = "bench"
TARGETS = ("vllm", "thaw", "gateway")
LABELS = {"vllm": "vLLM server", "thaw": "thaw replica directly", "gateway": "thaw through the gateway"}


def _launch(kind: str, model_dir: Path, log_dir: Path, engine: dict) -> tuple[ServerProcess, str, str]:
    port = free_port()
    if kind == "vllm":
        cmd, ready = vllm_server_command(model_dir, MODEL, port, engine), "/health"
    else:
        cmd, ready = function_command(model_dir, MODEL, port, engine), "/readyz"
    url = f"http://127.0.0.1:{port}"
    return ServerProcess(cmd, log_dir / f"{kind}-{port}.log", env=base_env()), url + ready, url


@contextlib.contextmanager
def _served(kind: str, model_dir: Path, work: Path, engine: dict, concurrency: int) -> Iterator[str]:
    """The base URL of a ready server of that kind, stopped afterwards."""
    if kind == "gateway":
        # One replica, kept ready (no scale-to-zero mid-run), taking every stream at once as vLLM's server
        # does: containerConcurrency is the engine's max_num_seqs (Model.replica_engine).
        spec = {"platform": {"gateway": {"port": free_port()}, "stateDir": str(work / "state")},
                "models": [{"name": MODEL, "source": str(model_dir), "engine": engine,
                            "containerConcurrency": concurrency,
                            "scaling": {"min-scale": 1, "max-scale": 1, "initial-scale": 1}}]}
        plane = PlaneUnderTest(work, spec)
        try:
            plane.wait(lambda: plane.status(MODEL)["replicas"].get("ready", 0) >= 1, 600, "a ready replica")
            yield plane.url
        finally:
            plane.server.stop()
        return
    server, ready_url, url = _launch(kind, model_dir, work, engine)
    try:
        server.wait_http(ready_url, 600)
        yield url
    finally:
        server.stop()


def _cold_starts(model_dir: Path, runs: int, log_dir: Path, progress: Progress) -> dict[str, list[dict]]:
    starts: dict[str, list[dict]] = {"thaw": [], "vllm": []}
    task = progress.add_task("cold starts", total=runs * 2 + 2)
    # One untimed launch of each first: both then read their code and weights from the page cache, and
    # neither pays alone for a cold disk.
    for i in range(runs + 1):
        for kind in ("thaw", "vllm"):  # interleaved, so drift on the machine hits both alike
            server, ready_url, url = _launch(kind, model_dir, log_dir, DEMO_ENGINE_ARGS)
            try:
                start = first_token_after_launch(server, ready_url, url, MODEL)
            finally:
                server.stop()
            if i:
                starts[kind].append(start)
            progress.advance(task)
    return starts


def _warm_paths(model_dir: Path, concurrency: list[int], prompts_per_stream: int, out_dir: Path,
                progress: Progress) -> dict:
    """{kind: {concurrency: vLLM client's figures, and thaw's own client's under "thaw_client"}}."""
    engine = {**DEMO_ENGINE_ARGS, "max_num_seqs": max(concurrency)}
    results: dict = {kind: {} for kind in TARGETS}
    task = progress.add_task("warm path (vllm bench serve)", total=len(TARGETS) * len(concurrency))
    for kind in TARGETS:
        work = out_dir / "work" / kind
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        with _served(kind, model_dir, work, engine, max(concurrency)) as url:
            for c in concurrency:
                load = serve_client.ServeLoad(concurrency=c, prompts=max(32, prompts_per_stream * c))
                figures = serve_client.run(url, MODEL, model_dir, load, out_dir / f"vllm-bench-{kind}-{c}.json",
                                           out_dir / "vllm-bench.log")
                own = run_streaming_load(url, MODEL, c, 1, load.output_len)
                figures["thaw_client"] = {"tokens_per_second": own.tokens_per_second, "ttft_p50": own.ttft_p50,
                                          "failures": own.failures}
                results[kind][str(c)] = figures
                progress.advance(task)
    return results


def run_function_bench(model_dir: Path, runs: int, concurrency: list[int], prompts_per_stream: int, out: Path,
                       console: Console) -> dict:
    model_dir = model_dir.resolve()
    out_dir = out.parent
    log_dir = out_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with Progress(console=console) as progress:
        starts = _cold_starts(model_dir, runs, log_dir, progress) if runs else {"thaw": [], "vllm": []}
        warm = _warm_paths(model_dir, concurrency, prompts_per_stream, out_dir, progress)
    result = {"model_dir": str(model_dir), "engine_args": DEMO_ENGINE_ARGS, "runs": runs, "starts": starts,
              "warm": warm, "concurrency": concurrency}
    write_json(out, result)
    report(result, console)
    plot_ratios(result, out.with_suffix(".png"))
    console.print(f"results: {out}, {out.with_suffix('.png')}")
    return result


def plot_ratios(result: dict, path: Path) -> None:
    """thaw / vLLM's server per metric, for each target and concurrency: bars left of 1 are better for the
    latencies, right of 1 for tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("tokens_per_second", "tokens/s"), ("ttft_p50", "TTFT p50"), ("ttft_p95", "TTFT p95"),
               ("itl_p50", "ITL p50"), ("itl_p99", "ITL p99")]
    warm, levels = result["warm"], [str(c) for c in result["concurrency"]]
    series = [(kind, c) for c in levels for kind in ("thaw", "gateway")]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(series)
    for i, (kind, c) in enumerate(series):
        ratios = [warm[kind][c][m] / warm["vllm"][c][m] for m, _ in metrics]
        ax.bar([j + i * width for j in range(len(metrics))], ratios, width, label=f"{LABELS[kind]}, {c} streams")
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(metrics))], [label for _, label in metrics])
    ax.set_ylabel("thaw / vLLM's server")
    ax.set_title("warm path, vllm bench serve (tokens/s: higher is better; latencies: lower)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(result: dict, console: Console) -> None:
    starts = result["starts"]
    if starts["thaw"]:
        first = {k: [s["first_token"] for s in v] for k, v in starts.items()}
        console.print(ratio_table(
            f"launch to first token, seconds (mean of {result['runs']}; median {percentile(first['thaw'], 50):.2f}"
            f" vs {percentile(first['vllm'], 50):.2f})",
            [("ready (mean)", mean([s["ready"] for s in starts["thaw"]]), mean([s["ready"] for s in starts["vllm"]]), ""),
             ("first token (mean)", mean(first["thaw"]), mean(first["vllm"]), "<= 0.5x")],
            "thaw", "vLLM server"))
    warm = result["warm"]
    for c in map(str, result["concurrency"]):
        peer = warm["vllm"][c]
        for kind in ("gateway", "thaw"):
            ours = warm[kind][c]
            console.print(ratio_table(
                f"warm path, {c} streams, vllm bench serve (random 64 in / 64 out, greedy, --ignore-eos): "
                f"{LABELS[kind]}",
                [("output tokens/s", ours["tokens_per_second"], peer["tokens_per_second"], ">= 1.0x"),
                 ("TTFT p50 (s)", ours["ttft_p50"], peer["ttft_p50"], "<= 1.05x"),
                 ("TTFT p95 (s)", ours["ttft_p95"], peer["ttft_p95"], "<= 1.2x"),
                 ("TPOT p50 (s)", ours["tpot_p50"], peer["tpot_p50"], ""),
                 ("ITL p50 (s)", ours["itl_p50"], peer["itl_p50"], ""),
                 ("ITL p99 (s)", ours["itl_p99"], peer["itl_p99"], "<= 1.2x"),
                 ("E2EL p50 (s)", ours["e2el_p50"], peer["e2el_p50"], ""),
                 ("thaw's client: tokens/s", ours["thaw_client"]["tokens_per_second"],
                  peer["thaw_client"]["tokens_per_second"], ""),
                 ("thaw's client: TTFT p50 (s)", ours["thaw_client"]["ttft_p50"], peer["thaw_client"]["ttft_p50"], ""),
                 ("failed requests", ours["failed"], peer["failed"], "0")],
                LABELS[kind], "vLLM server"))
