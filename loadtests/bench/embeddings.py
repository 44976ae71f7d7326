"""`thaw bench embeddings`: what KServe's users move over with, measured by vLLM's own client (`vllm bench serve`):

(a) embed: embeddings through thaw's gateway next to vLLM's own server, the same model and engine arguments,
    one after the other in one run: `--backend openai-embeddings`, random inputs of 64 tokens, `clients`
    concurrent clients each sending requests of `batch` inputs; inputs/s and latency;
(b) logging: the chat model's warm path through the gateway with payload logging off and on (every request
    and response to a CloudEvents sink on loopback), interleaved off, on, off, on: tokens/s and TTFT.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

from rich.console import Console

from thaw.launch import DEMO_ENGINE_ARGS, ServerProcess, base_env, free_port, vllm_server_command
from thaw.loadtests.bench import serve_client
from thaw.loadtests.bench.common import PlaneUnderTest, mean, ratio_table, write_json

MODEL = "bench"
EMBED_ENGINE = {"max_model_len": 256, "enforce_eager": True, "runner": "pooling"}


@contextlib.contextmanager
def _vllm(model_dir: Path, engine: dict, work: Path) -> Iterator[str]:
    port = free_port()
    server = ServerProcess(vllm_server_command(model_dir, MODEL, port, engine), work / "vllm.log", env=base_env())
    try:
        server.wait_http(f"http://127.0.0.1:{port}/health", 600)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def _gateway(model_dir: Path, engine: dict, work: Path, concurrency: int, logger: dict | None = None) -> Iterator[str]:
    """thaw up with one replica kept ready, taking every request at once as vLLM's server does."""
    model = {"name": MODEL, "source": str(model_dir), "engine": engine, "containerConcurrency": concurrency,
             "scaling": {"min-scale": 1, "max-scale": 1, "initial-scale": 1}}
    if logger:
        model["logger"] = logger
    plane = PlaneUnderTest(work, {"platform": {"gateway": {"port": free_port()}, "stateDir": str(work / "state")},
                                  "models": [model]})
    try:
        plane.wait(lambda: plane.status(MODEL)["replicas"].get("ready", 0) >= 1, 600, "a ready replica")
        yield plane.url
    finally:
        plane.server.stop()


@contextlib.contextmanager
def _sink() -> Iterator[tuple[str, list]]:
    """A CloudEvents sink on loopback that counts what it gets."""
    got: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            got.append(len(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
            self.send_response(202)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", got
    finally:
        server.shutdown()


def _embed_load(url: str, model_dir: Path, clients: int, batch: int, requests: int, result: Path, log: Path) -> dict:
    """vLLM's client, embeddings: inputs/s and end-to-end latency per request (of `batch` inputs)."""
    result.unlink(missing_ok=True)
    args = ["--backend", "openai-embeddings", "--endpoint", "/v1/embeddings", "--base-url", url, "--model", MODEL,
            "--tokenizer", str(model_dir), "--dataset-name", "random", "--random-input-len", "64",
            "--random-batch-size", str(batch), "--num-prompts", str(requests), "--max-concurrency", str(clients),
            "--request-rate", "inf", "--seed", "0", "--num-warmups", str(clients), "--percentile-metrics", "e2el",
            "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(result.parent),
            "--result-filename", result.name, "--disable-tqdm"]
    with log.open("a") as out:
        done = subprocess.run([sys.executable, "-m", "thaw.loadtests.bench.serve_client", *args], stdout=out,
                              stderr=subprocess.STDOUT, env=base_env(), timeout=1800)
    if done.returncode != 0 or not result.exists():
        raise RuntimeError(f"vllm bench serve (embeddings) failed; see {log}")
    r = json.loads(result.read_text())
    return {"inputs_per_second": r["input_sequence_throughput"], "requests_per_second": r["request_throughput"],
            "completed": r["completed"], "failed": r.get("failed", 0), "e2el_p50": r["p50_e2el_ms"] / 1000,
            "e2el_p99": r["p99_e2el_ms"] / 1000}


def bench_embed(model_dir: Path, clients: int, batch: int, requests: int, out: Path, console: Console) -> dict:
    engine = dict(EMBED_ENGINE, max_num_seqs=clients * batch)
    work = out / "work" / "embed"
    results = {}
    for kind in ("vllm", "gateway"):
        (work / kind).mkdir(parents=True, exist_ok=True)
        served = _vllm(model_dir, engine, work / kind) if kind == "vllm" else _gateway(
            model_dir, engine, work / kind, clients * batch)
        with served as url:
            results[kind] = _embed_load(url, model_dir, clients, batch, requests, out / f"embed-{kind}.json",
                                        out / "vllm-bench.log")
        console.print(f"(a) {kind}: {results[kind]['inputs_per_second']:.0f} inputs/s, "
                      f"p50 {results[kind]['e2el_p50'] * 1000:.1f} ms")
    return results


def bench_logging(model_dir: Path, concurrency: int, runs: int, out: Path, console: Console) -> dict:
    engine = {**DEMO_ENGINE_ARGS, "max_num_seqs": concurrency}
    results: dict = {"off": [], "on": [], "events": 0}
    for i in range(runs):
        for mode in ("off", "on"):  # interleaved: drift on the machine hits both alike
            work = out / "work" / f"logging-{mode}-{i}"
            work.mkdir(parents=True, exist_ok=True)
            with _sink() as (sink_url, got):
                logger = {"mode": "all", "url": sink_url} if mode == "on" else None
                with _gateway(model_dir, engine, work, concurrency, logger) as url:
                    load = serve_client.ServeLoad(concurrency=concurrency, prompts=8 * concurrency)
                    figures = serve_client.run(url, MODEL, model_dir, load, out / f"logging-{mode}-{i}.json",
                                               out / "vllm-bench.log")
                results["events"] += len(got)
            results[mode].append(figures)
            console.print(f"(b) logging {mode}, run {i + 1}: {figures['tokens_per_second']:.1f} tokens/s, "
                          f"TTFT p50 {figures['ttft_p50'] * 1000:.1f} ms")
    return results


def report(result: dict, console: Console) -> list[str]:
    lines = [f"# thaw bench embeddings ({result.get('embed_model')}; {result.get('chat_model')})"]
    embed = result.get("embed")
    if embed:
        ours, peer = embed["gateway"], embed["vllm"]
        rows = [("inputs/s", ours["inputs_per_second"], peer["inputs_per_second"], ">= 1.0x"),
                ("latency p50 (s)", ours["e2el_p50"], peer["e2el_p50"], ""),
                ("latency p99 (s)", ours["e2el_p99"], peer["e2el_p99"], ""),
                ("failed", ours["failed"], peer["failed"], "0")]
        console.print(ratio_table(f"(a) embeddings, {result['clients']} clients x {result['batch']} inputs per request "
                                  "(vllm bench serve --backend openai-embeddings)", rows, "thaw gateway", "vLLM server"))
        lines += ["", f"## (a) embeddings: {result['clients']} concurrent clients, {result['batch']} inputs of 64 tokens "
                      "per request", "", "| metric | thaw through the gateway | vLLM's server | ratio | target |",
                  "|---|---|---|---|---|"]
        lines += [f"| {m} | {a:.4g} | {b:.4g} | {f'{a / b:.2f}x' if b else '-'} | {t} |" for m, a, b, t in rows]
    logging = result.get("logging")
    if logging and logging["off"] and logging["on"]:
        off_tps, on_tps = (mean([r["tokens_per_second"] for r in logging[k]]) for k in ("off", "on"))
        off_ttft, on_ttft = (mean([r["ttft_p50"] for r in logging[k]]) for k in ("off", "on"))
        rows = [("output tokens/s", on_tps, off_tps, ">= 0.97x"), ("TTFT p50 (s)", on_ttft, off_ttft, "<= +2 ms")]
        console.print(ratio_table(f"(b) payload logging on vs off, warm path through the gateway, "
                                  f"{result['concurrency']} streams (means of {len(logging['on'])})", rows,
                                  "logging on", "logging off"))
        lines += ["", f"## (b) payload logging, warm path through the gateway, {result['concurrency']} streams "
                      f"(vllm bench serve, random 64 in / 64 out; means of {len(logging['on'])} runs each, interleaved)",
                  "", "| metric | logging on | logging off | on / off | target |", "|---|---|---|---|---|",
                  f"| output tokens/s | {on_tps:.1f} | {off_tps:.1f} | {on_tps / off_tps:.3f}x | >= 0.97x |",
                  f"| TTFT p50 (ms) | {on_ttft * 1000:.1f} | {off_ttft * 1000:.1f} | "
                  f"{(on_ttft - off_ttft) * 1000:+.1f} ms | <= +2 ms |",
                  "", f"Events the sink received: {logging['events']} (a request and a response each)."]
    return lines


def plot(result: dict, path: Path) -> None:
    """(a) thaw / vLLM's server per metric; (b) logging on / off: above 1 is better for throughput, below for
    latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []
    embed = result.get("embed")
    if embed:
        ours, peer = embed["gateway"], embed["vllm"]
        bars += [("(a) inputs/s", ours["inputs_per_second"] / peer["inputs_per_second"]),
                 ("(a) latency p50", ours["e2el_p50"] / peer["e2el_p50"]),
                 ("(a) latency p99", ours["e2el_p99"] / peer["e2el_p99"])]
    logging = result.get("logging")
    if logging and logging["off"] and logging["on"]:
        for key, label in (("tokens_per_second", "(b) tokens/s"), ("ttft_p50", "(b) TTFT p50")):
            bars.append((label, mean([r[key] for r in logging["on"]]) / mean([r[key] for r in logging["off"]])))
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=["#2a7" if b[0].startswith("(a)") else "#27a" for b in bars])
    ax.axhline(1.0, color="black", linewidth=1)
    for i, (_, v) in enumerate(bars):
        ax.text(i, v, f"{v:.2f}x", ha="center", va="bottom")
    ax.set_ylabel("ratio")
    ax.set_title("(a) thaw's gateway / vLLM's server, embeddings; (b) payload logging on / off, warm path")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_embeddings_bench(embed_model: Path, chat_model: Path, parts: list[str], clients: int, batch: int,
                         requests: int, concurrency: int, runs: int, out: Path, console: Console) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"embed_model": str(embed_model), "chat_model": str(chat_model), "clients": clients,
                    "batch": batch, "concurrency": concurrency}
    if "embed" in parts:
        result["embed"] = bench_embed(embed_model.resolve(), clients, batch, requests, out, console)
    if "logging" in parts:
        result["logging"] = bench_logging(chat_model.resolve(), concurrency, runs, out, console)
    write_json(out / "results.json", result)
    (out / "report.md").write_text("\n".join(report(result, console)) + "\n")
    plot(result, out / "embeddings.png")
    console.print(f"results: {out / 'results.json'}, {out / 'report.md'}, {out / 'embeddings.png'}")
    return result
