"""vLLM's own benchmark client (`vllm bench serve`) against any OpenAI server: the figures the field compares
servers by. It runs in a process of its own (`python -m thaw.loadtests.bench.serve_client ARGS`, vLLM's
arguments), so the client's event loop never shares a GIL with the harness.

The `vllm` console script needs vLLM's package metadata, which a build from source may lack; the module
entry point calls the same code (`vllm.benchmarks.serve`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from thaw.launch import base_env

PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class ServeLoad:
    """One `vllm bench serve` run: the random dataset, greedy, `--ignore-eos`, a fixed concurrency."""

    concurrency: int
    prompts: int
    input_len: int = 64
    output_len: int = 64
    backend: str = "vllm"  # /v1/completions, streamed; "openai-chat" for /v1/chat/completions

    def args(self, base_url: str, model: str, tokenizer: Path, result: Path) -> list[str]:
        return ["--backend", self.backend, "--base-url", base_url, "--model", model, "--tokenizer", str(tokenizer),
                "--dataset-name", "random", "--random-input-len", str(self.input_len),
                "--random-output-len", str(self.output_len), "--num-prompts", str(self.prompts),
                "--max-concurrency", str(self.concurrency), "--request-rate", "inf", "--ignore-eos",
                "--temperature", "0", "--seed", "0", "--num-warmups", str(min(self.concurrency, 8)),
                "--percentile-metrics", "ttft,tpot,itl,e2el",
                "--metric-percentiles", ",".join(map(str, PERCENTILES)),
                "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
                "--disable-tqdm"]


def figures(result: dict) -> dict:
    """The figures a comparison reads, in seconds (vLLM writes milliseconds) and tokens/s."""
    out = {"tokens_per_second": result["output_throughput"], "completed": result["completed"],
           "failed": result.get("failed", result["num_prompts"] - result["completed"])}
    for metric in ("ttft", "tpot", "itl", "e2el"):
        out[f"{metric}_mean"] = result[f"mean_{metric}_ms"] / 1000
        for p in PERCENTILES:  # asked for with --metric-percentiles: vLLM writes p50_..., p95_..., p99_...
            out[f"{metric}_p{p}"] = result[f"p{p}_{metric}_ms"] / 1000
    return out


def run(base_url: str, model: str, tokenizer: Path, load: ServeLoad, result: Path, log: Path,
        timeout_s: float = 1800) -> dict:
    """Run vLLM's client once against `base_url`; its figures (see `figures`). Its output goes to `log`."""
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "thaw.loadtests.bench.serve_client", *load.args(base_url, model, tokenizer, result)]
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=base_env(), timeout=timeout_s)
    if done.returncode != 0 or not result.exists():
        raise RuntimeError(f"vllm bench serve failed (exit {done.returncode}); see {log}")
    return figures(json.loads(result.read_text()))


def main(argv: list[str] | None = None) -> None:
    from vllm.benchmarks import serve

    parser = argparse.ArgumentParser(prog="vllm bench serve")
    serve.add_cli_args(parser)
    serve.main(parser.parse_args(argv))


if __name__ == "__main__":
    main()
