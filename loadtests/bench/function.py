"""`thaw bench function`: the function next to vLLM's own OpenAI server, same model and engine args.

(a) launch to first token, N cold starts each; (b) steady state: concurrent streaming clients,
output tokens/s and TTFT. The function runs in both engine modes, so the table says which wins where.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from thaw.loadtests.metrics import percentile
from thaw.loadtests.bench.common import (first_token_after_launch, mean, ratio_table, run_streaming_load,
                               write_json)
from thaw.demo import DEMO_ENGINE_ARGS
from thaw.launch import ServerProcess, free_port, function_command, vllm_server_command

MODEL = "bench"


def _launch(kind: str, model_dir: Path, log_dir: Path) -> tuple[ServerProcess, str, str]:
    port = free_port()
    if kind == "vllm":
        cmd, ready = vllm_server_command(model_dir, MODEL, port, DEMO_ENGINE_ARGS), "/health"
    else:
        mode = "mp" if kind == "thaw-mp" else "inproc"
        cmd, ready = function_command(model_dir, MODEL, port, {**DEMO_ENGINE_ARGS, "engine_core": mode}), "/readyz"
    url = f"http://127.0.0.1:{port}"
    return ServerProcess(cmd, log_dir / f"{kind}-{port}.log"), url + ready, url


def run_function_bench(model_dir: Path, runs: int, clients: int, max_tokens: int, per_client: int, out: Path,
                       console: Console) -> dict:
    model_dir = model_dir.resolve()
    log_dir = out.parent / "logs"
    starts: dict[str, list[dict]] = {"thaw": [], "vllm": []}
    loads = {}
    with Progress(console=console) as progress:
        task = progress.add_task("cold starts", total=runs * 2 + 2)
        # One untimed launch of each first: both then read their code and weights from the page cache,
        # and neither pays alone for a cold disk.
        for kind in ("thaw", "vllm"):
            server, ready_url, url = _launch(kind, model_dir, log_dir)
            try:
                first_token_after_launch(server, ready_url, url, MODEL)
            finally:
                server.stop()
            progress.advance(task)
        for i in range(runs):
            for kind in ("thaw", "vllm"):  # interleaved, so drift on the machine hits both alike
                server, ready_url, url = _launch(kind, model_dir, log_dir)
                try:
                    starts[kind].append(first_token_after_launch(server, ready_url, url, MODEL))
                finally:
                    server.stop()
                progress.advance(task)
        total = clients * per_client
        for kind in ("thaw", "thaw-mp", "vllm"):
            task = progress.add_task(f"{clients} streams: {kind}", total=total)
            server, ready_url, url = _launch(kind, model_dir, log_dir)
            try:
                server.wait_http(ready_url, 600)
                run_streaming_load(url, MODEL, 2, 1, 8)  # first-request effects stay out of the numbers
                loads[kind] = run_streaming_load(url, MODEL, clients, per_client, max_tokens,
                                                 lambda t=task: progress.advance(t))
            finally:
                server.stop()

    first = {k: [s["first_token"] for s in v] for k, v in starts.items()}
    result = {"model_dir": str(model_dir), "engine_args": DEMO_ENGINE_ARGS, "runs": runs, "starts": starts,
              "load": {k: vars(v) for k, v in loads.items()}, "clients": clients, "max_tokens": max_tokens}
    write_json(out, result)

    console.print(ratio_table(
        f"launch to first token, seconds (mean of {runs}; median {percentile(first['thaw'], 50):.2f} vs "
        f"{percentile(first['vllm'], 50):.2f})",
        [("ready (mean)", mean([s["ready"] for s in starts["thaw"]]), mean([s["ready"] for s in starts["vllm"]]), ""),
         ("first token (mean)", mean(first["thaw"]), mean(first["vllm"]), "<= 0.5x")],
        "thaw", "vLLM server"))
    for kind in ("thaw", "thaw-mp"):
        a, b = loads[kind], loads["vllm"]
        console.print(ratio_table(
            f"{clients} concurrent streams x {per_client}, {max_tokens} tokens each ({kind}: engine core "
            f"{'in a process of its own' if kind == 'thaw-mp' else 'in-process'})",
            [("output tokens/s", a.tokens_per_second, b.tokens_per_second, ">= 0.9x"),
             ("TTFT p50 (s)", a.ttft_p50, b.ttft_p50, "<= 1.1x"),
             ("TTFT p95 (s)", a.ttft_p95, b.ttft_p95, ""),
             ("TPOT p50 (s)", a.metrics["tpot"]["p50"], b.metrics["tpot"]["p50"], ""),
             ("ITL p99 (s)", a.metrics["itl"]["p99"], b.metrics["itl"]["p99"], ""),
             ("E2EL p50 (s)", a.metrics["e2el"]["p50"], b.metrics["e2el"]["p50"], ""),
             ("failures", a.failures, b.failures, "0")],
            kind, "vLLM server"))
    console.print(f"results: {out}")
    return result
