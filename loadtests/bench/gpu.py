"""`thaw bench gpu`: the first token on a GPU node, thaw next to vLLM's own server, in one run.

Variants (each `runs` times, the same model folder and engine arguments for all):
  (a) vllm:   vLLM's OpenAI server launched cold: launch -> first streamed token (the peer; its first
              launch also fills its own compile cache, the later ones find it warm);
  (b) zero:   thaw from zero, standby and caches warm: a request at zero -> first token, through the gateway;
  (c) parked: thaw parked (vLLM sleep mode) -> first token, through the gateway; GPU memory free meanwhile;
  (d) cold:   thaw from zero with the compile cache in the tier wiped and the page cache dropped (the first
              start of a new revision on a fresh node);
  (e) hibernated: thaw hibernated (sleep level 2, weights dropped) -> first token, and the host RAM it holds;
  (f) swap:   three models sharing the GPU with room for two awake: round robin (each request wakes its
              model and puts the least recently used to sleep), then a burst of 8 at a sleeping one;
  (g) density: N models of the bench's shape on one GPU (default 8, each 0.15 of it, host copies for 5):
              bring-up, round robin twice, the five most recent again, a burst of 16 at the least recently
              used; each request's rung (X-Thaw-Cold-Start) and first token, the lowest free host RAM
              against the node's floor, the most host copies held, the least free GPU, engine deaths.
Each sleep's seconds and the replica's rung are reported with (c) and (e).
  (s) stream: the weights' stream from the page cache to the GPU under several ring settings (stream.py).
  (w) warm:   the warm path, a part of its own: vLLM's own client (`vllm bench serve`) at 16 and 64 streams x
              128 tokens against vLLM's server and a ready thaw replica (through the gateway and directly),
              both batching up to 64 streams (max_num_seqs; thaw's containerConcurrency).
Parts (`--parts`) may run in separate calls; results accumulate in `--out`/results.json and the report and
plots are rewritten from whatever has been measured.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import time
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.table import Table

from thaw.loadtests.bench import serve_client
from thaw.loadtests.bench.common import PlaneUnderTest, first_answer, first_token_after_launch, mean, write_json
from thaw.loadtests.bench.stream import bench_stream, plot_stream, stream_report
from thaw.launch import ServerProcess, base_env, free_port, vllm_server_command
from thaw.vllm_platform import detect, gpu_memory

PARTS = ("vllm", "zero", "other-core", "park", "hibernate", "swap", "density", "warm", "adopt", "stream")
DENSITY_SHARE = 0.15  # of the GPU per model in the density part: six awake at most, the rest asleep
DENSITY_COPIES = 5  # host copies the density part's parking budget holds
# The warm path's concurrent streams. Both servers get max_num_seqs = the largest (thaw: its containerConcurrency,
# which Model.replica_engine makes the engine's), so both batch the same streams with the same arguments. The
# ladder's parts keep containerConcurrency 16: their starts are what the ladder's earlier figures measured.
WARM_STREAMS = (16, 64)
NAME = "bench"
SETTLE = {"scale-to-zero-grace-period": "1s", "tick-interval": "1s"}
VARIANT_LABELS = {"vllm": "(a) vLLM server launched cold", "zero": "(b) thaw from zero, standby + caches warm",
                  "parked": "(c) thaw parked -> first token", "cold": "(d) thaw from zero, caches cold",
                  "hibernated": "(e) thaw hibernated -> first token", "swap": "(f) swap: wake one, park another",
                  "adopt": "(g) thaw from zero, adopting a pooled engine (a model never started here)"}


def _load(out: Path) -> dict:
    import json

    path = out / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _drop_page_cache() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _warm_path(url: str, model_dir: Path, work: Path) -> dict:
    """vLLM's own client (`vllm bench serve`, random 128 in / 128 out, greedy, --ignore-eos) at each of
    WARM_STREAMS concurrent streams: {streams: its figures}."""
    out = {}
    for streams in WARM_STREAMS:
        load = serve_client.ServeLoad(concurrency=streams, prompts=2 * streams, input_len=128, output_len=128)
        out[str(streams)] = serve_client.run(url, NAME, model_dir, load, work / f"vllm-bench-{streams}.json",
                                             work / "vllm-bench.log")
    return out


def _plane_spec(work: Path, model_dir: Path, engine: dict, names=(NAME,), parking: dict | None = None,
                min_scale: int = 0, **model) -> dict:
    return {"platform": {"gateway": {"port": free_port()}, "stateDir": str(work / "state"),
                         "cache": {"path": str(work.parent / "tier"), "capacity": "200Gi"},
                         "autoscaler": SETTLE, **({"parking": parking} if parking else {})},
            "models": [{"name": name, "source": str(model_dir), "engine": engine, "containerConcurrency": 16,
                        "scaling": {"window": "6s", "max-scale": 1, "min-scale": min_scale}, **model}
                       for name in names]}


@contextlib.contextmanager
def _plane(work: Path, model_dir: Path, engine: dict, names=(NAME,), parking: dict | None = None,
           min_scale: int = 0, **model) -> Iterator[PlaneUnderTest]:
    """`thaw up` serving the model(s), once its standby is ready; stopped afterwards."""
    plane = PlaneUnderTest(work, _plane_spec(work, model_dir, engine, names, parking, min_scale, **model))
    try:
        plane.wait(plane.standby_ready, 300, "thaw up and its standby")
        yield plane
    finally:
        plane.server.stop()


def _from_zero(plane: PlaneUnderTest, name: str = NAME) -> dict:
    """One streamed request to a model at zero (or asleep): the user's first token, and where it went."""
    start = time.perf_counter()
    result = first_answer(plane.url, name)
    rev = plane.status(name)
    # the activator held the request while the replica started (or woke); then it went to the replica
    phases = {**rev["last_start_phases"], "activator_hold": result.queued,
              "after_release": result.ttft - result.queued}
    # the plane's and the replica's events, from the plane's "asked" (the request's arrival: its poke asks at
    # once), then the request's own: released by the activator, first token
    timeline = {**rev.get("last_start_timeline", {}), "released": result.queued, "first_token": result.ttft}
    return {"first_token": result.ttft, "queued": result.queued, "phases": phases, "timeline": timeline,
            "wall": time.perf_counter() - start, "rung": result.record.cold or "ready"}


def bench_vllm(model_dir: Path, engine: dict, runs: int, work: Path, console: Console, save) -> dict:
    cache = work / "vllm-cache"
    out = {"runs": []}
    for i in range(runs):
        port = free_port()
        server = ServerProcess(vllm_server_command(model_dir, NAME, port, engine), work / f"vllm-{i}.log",
                               env=base_env(VLLM_CACHE_ROOT=str(cache)))
        try:
            url = f"http://127.0.0.1:{port}"
            run = first_token_after_launch(server, url + "/v1/models", url, NAME, deadline_s=900)
            run["compile_cache"] = "cold" if i == 0 else "warm"
            out["runs"].append(run)
            save(out)
            console.print(f"(a) vLLM server run {i + 1}: first token {run['first_token']:.2f}s")
        finally:
            server.stop()
    return out


def _compile_dir(work: Path, model_dir: Path, engine: dict, **model) -> Path:
    """The compile cache in the tier that this part's replicas use (their architecture and engine
    configuration, as functions/boot.py names it): the one (d) wipes, leaving other parts' warm."""
    from thaw.cache_warmer.tier.cache import CacheTier
    from thaw.functions.engine_plan import arch_id
    from thaw.spec import Model

    replica = Model.model_validate({"name": NAME, "source": str(model_dir), "engine": engine,
                                    "containerConcurrency": 16, **model}).replica_engine()
    platform = detect()
    return CacheTier(work.parent / "tier", 200 << 30).compile_dir(
        arch_id(model_dir), platform.resolve(replica).config_id(platform.vllm))


def bench_zero(model_dir: Path, engine: dict, runs: int, work: Path, console: Console, save) -> dict:
    """(d) and (b) interleaved: d, b, d, b, ...; (d) wipes its configuration's compile cache in the tier and
    the page cache."""
    compile_dir = _compile_dir(work, model_dir, engine, park=False)
    out = {"engine_core": detect().engine_core, "zero": [], "cold": []}
    with _plane(work, model_dir, engine, park=False) as plane:
        for i in range(runs):
            for variant in ("cold", "zero"):
                plane.wait(lambda: plane.at_zero(NAME), 120, "scale to zero")
                if variant == "cold":
                    shutil.rmtree(compile_dir, ignore_errors=True)
                    dropped = _drop_page_cache()
                run = _from_zero(plane)
                if variant == "cold":
                    run["page_cache_dropped"] = dropped
                out[variant].append(run)
                save(out)
                console.print(f"({'d' if variant == 'cold' else 'b'}) {variant} run {i + 1}: "
                              f"first token {run['first_token']:.2f}s {run['phases']}")
    return out


def bench_warm(model_dir: Path, engine: dict, runs: int, work: Path, console: Console, save) -> dict:
    """(w) vLLM's server, then a ready thaw replica through the gateway and directly (the gateway's share)."""
    seqs = max(WARM_STREAMS)
    out: dict = {"engine_core": detect().engine_core}
    port = free_port()
    server = ServerProcess(vllm_server_command(model_dir, NAME, port, {**engine, "max_num_seqs": seqs}),
                           work / "vllm.log", env=base_env(VLLM_CACHE_ROOT=str(work / "vllm-cache")))
    try:
        url = f"http://127.0.0.1:{port}"
        server.wait_http(url + "/v1/models", 900)
        out["vllm"] = _warm_path(url, model_dir, work / "vllm")
        save(out)
    finally:
        server.stop()
    # min-scale 1: the replica measured directly stays up between the client's runs (at 0 it went to zero
    # in the bench's 6 s window, and every request to its old port was refused)
    with _plane(work, model_dir, engine, park=False, min_scale=1, containerConcurrency=seqs) as plane:
        first_answer(plane.url, NAME)
        pod = next(p for p in plane.status(NAME)["pods"] if p["state"] == "ready")
        out["gateway"] = _warm_path(plane.url, model_dir, work / "gateway")
        out["direct"] = _warm_path(f"http://127.0.0.1:{pod['port']}", model_dir, work / "direct")
    console.print(f"(w) warm path: {out}")
    return out


def bench_other_core(model_dir: Path, engine: dict, runs: int, work: Path, console: Console, save) -> dict:
    """The engine core where the platform does not put it by default (thaw/vllm_platform.py): starts from
    zero with caches warm and the warm path, to check the platform's choice by measurement."""
    core = "mp" if detect().engine_core == "inproc" else "inproc"
    out = {"engine_core": core, "zero": []}
    with _plane(work, model_dir, {**engine, "engine_core": core}, park=False) as plane:
        for i in range(runs):
            plane.wait(lambda: plane.at_zero(NAME), 120, "scale to zero")
            out["zero"].append(_from_zero(plane))
            save(out)
            console.print(f"engine core {core} run {i + 1}: first token from zero {out['zero'][-1]['first_token']:.2f}s "
                          f"{out['zero'][-1]['phases']}")
    return out


def _asleep(plane: PlaneUnderTest, name: str = NAME) -> dict:
    """Wait for the model's replica to fall asleep; its status entry."""
    plane.wait(lambda: plane.status(name)["replicas"]["parked"] == 1, 180, f"{name} asleep")
    return _sleeping_pod(plane, name)


def _sleeping_pod(plane: PlaneUnderTest, name: str = NAME) -> dict:
    return next(p for p in plane.status(name)["pods"] if p["state"] == "parked")


def _sleep_runs(plane: PlaneUnderTest, runs: int, label: str, console: Console, save, out: dict, key: str,
                level: int) -> None:
    for i in range(runs):
        _asleep(plane)
        # parked: once its host copy is built (in the background, after it went to sleep if it was not yet)
        plane.wait(lambda: _sleeping_pod(plane)["sleep_level"] == level, 300, f"sleep level {level}")
        pod = _sleeping_pod(plane)
        time.sleep(0.5)  # let the driver settle its accounting before reading free memory
        memory = gpu_memory()
        run = _from_zero(plane)
        run.update({"gpu_free": memory.free if memory else None, "gpu_total": memory.total if memory else None,
                    "parked_gpu_bytes": pod["gpu_bytes"], "parked_host_bytes": pod["host_copy_bytes"],
                    "sleep_level": pod.get("sleep_level"), "park_seconds": pod.get("park_seconds"),
                    "rung": run.get("rung")})
        out[key].append(run)
        save(out)
        console.print(f"{label} run {i + 1}: first token {run['first_token']:.3f}s (slept in "
                      f"{run['park_seconds'] or 0:.2f}s, level {run['sleep_level']}), host held "
                      f"{(run['parked_host_bytes'] or 0) / 2**30:.1f} GiB, GPU free "
                      f"{(run['gpu_free'] or 0) / 2**30:.1f} of {(run['gpu_total'] or 0) / 2**30:.1f} GiB")


def bench_park(model_dir: Path, engine: dict, runs: int, work: Path, console: Console, save) -> dict:
    out = {"first_start": None, "parked": []}
    with _plane(work, model_dir, engine, park=True) as plane:
        out["first_start"] = _from_zero(plane)
        save(out)
        _sleep_runs(plane, runs, "(c) parked", console, save, out, "parked", level=1)
    return out


def bench_hibernate(model_dir: Path, engine: dict, runs: int, work: Path, console: Console, save) -> dict:
    """A parking budget of 0: every sleep is a hibernation (its weights dropped, streamed back at a wake)."""
    out = {"first_start": None, "hibernated": []}
    with _plane(work, model_dir, engine, park=True, parking={"hostMemory": "0"}) as plane:
        out["first_start"] = _from_zero(plane)
        save(out)
        _sleep_runs(plane, runs, "(e) hibernated", console, save, out, "hibernated", level=2)
    return out


def bench_adopt(model_dir: Path, engine: dict, runs: int, work: Path, console: Console, save) -> dict:
    """(g) An engine pool of one for the model's shape (launched as "a-shape", never asked for); each run asks a
    model of that shape never started on this node ("m-1", "m-2", ...: the same weights' folder) once the pool
    has an engine waiting again."""
    out = {"adopt": []}
    names = ("a-shape", *(f"m-{i + 1}" for i in range(runs)))
    with _plane(work, model_dir, engine, names=names, park=True, parking={"enginePool": 1}) as plane:
        for name in names[1:]:
            plane.wait(lambda: plane.pool_waiting() == 1, 600, "an engine waiting in the pool")
            run = _from_zero(plane, name)
            out["adopt"].append(run)
            save(out)
            console.print(f"(g) adopt by {name}: first token {run['first_token']:.3f}s {run['timeline']}")
    return out


def bench_swap(model_dir: Path, engine: dict, runs: int, work: Path, console: Console, save) -> dict:
    """Three models, each claiming 45 % of the GPU: two awake at most. Round robin, then a burst."""
    import asyncio

    import aiohttp

    from thaw.loadtests.bench.common import stream_chat

    names = ("swap-a", "swap-b", "swap-c")
    swap_engine = {**engine, "gpu_memory_utilization": 0.45}
    out = {"swap": [], "burst": None}
    with _plane(work, model_dir, swap_engine, names, park=True) as plane:
        for name in names:  # each started once, and put to sleep (the third start parks the first)
            _from_zero(plane, name)
        for i in range(max(2, runs) * len(names)):
            name = names[i % len(names)]
            _asleep(plane, name)
            run = _from_zero(plane, name)
            run["model"] = name
            out["swap"].append(run)
            save(out)
            console.print(f"(f) swap to {name}: first token {run['first_token']:.3f}s {run['phases']}")
        target = names[len(out["swap"]) % len(names)]
        _asleep(plane, target)

        async def burst():
            async with aiohttp.ClientSession() as session:
                return await asyncio.gather(*(stream_chat(session, plane.url, target, 32) for _ in range(8)))

        results = asyncio.run(burst())
        out["burst"] = {"model": target, "requests": len(results), "failed": sum(not r.ok for r in results),
                        "ttft": sorted(r.ttft for r in results if r.ok)}
        save(out)
        console.print(f"(f) burst of 8 at sleeping {target}: {out['burst']['failed']} failed, TTFT "
                      f"{[round(t, 3) for t in out['burst']['ttft']]}")
    return out


class MemorySampler:
    """The node's memory every 0.2 s while a part runs: the lowest free host RAM and GPU memory, the most host
    copies held (thaw's status, every second)."""

    def __init__(self, plane: PlaneUnderTest):
        import threading

        self.plane = plane
        self.low_host = self.low_gpu = float("inf")
        self.copies = 0
        self.floor = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        import psutil
        import requests

        tick = 0
        while not self._stop.wait(0.2):
            self.low_host = min(self.low_host, psutil.virtual_memory().available)
            memory = gpu_memory()
            if memory is not None:
                self.low_gpu = min(self.low_gpu, memory.free)
            tick += 1
            if tick % 5 == 0:
                try:
                    host = requests.get(self.plane.url + "/thaw/v1/status", timeout=5).json()["host"]
                    self.copies, self.floor = max(self.copies, host["host_copies"]), host["floor"]
                except (requests.RequestException, KeyError, ValueError):
                    pass

    def figures(self) -> dict:
        finite = lambda v: v if v != float("inf") else None  # noqa: E731
        return {"host_available_min": finite(self.low_host), "host_floor": self.floor,
                "host_copies_max": self.copies, "gpu_free_min": finite(self.low_gpu)}


def _density_request(plane: PlaneUnderTest, name: str, phase: str) -> dict:
    import asyncio

    import aiohttp

    from thaw.loadtests.bench.common import stream_chat

    async def one():
        async with aiohttp.ClientSession() as session:
            return await stream_chat(session, plane.url, name, 16, "What is the capital of France?")

    result = asyncio.run(one())
    rung = (result.record.cold or "ready") if result.record else None
    # a start or a wake: where its wall went (the plane's and the replica's events, seconds since asked)
    timeline = plane.status(name).get("last_start_timeline") if rung not in (None, "ready") else None
    return {"phase": phase, "model": name, "ok": result.ok, "error": result.error, "rung": rung,
            "first_token": result.ttft, "queued": result.queued, "timeline": timeline}


def bench_density(model_dir: Path, engine: dict, runs: int, work: Path, console: Console, save,
                  models: int = 8) -> dict:
    """(g) `models` models of the bench's shape sharing one GPU (DENSITY_SHARE each), host copies for
    DENSITY_COPIES: bring-up, round robin twice, the five most recent again, a burst of 16 at the least
    recently used. One request at a time but the burst; every request's rung and first token."""
    import asyncio

    import aiohttp

    from thaw.loadtests.bench.common import stream_chat

    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    names = [f"m{i}" for i in range(models)]
    parking = {"hostMemory": str(int(weights * (DENSITY_COPIES + 0.5))), "gpuContexts": models}
    out: dict = {"models": models, "share": DENSITY_SHARE, "weights": weights, "parking": parking, "requests": [],
                 "burst": None, "memory": None, "deaths": None}

    def ask(name: str, phase: str) -> None:
        run = _density_request(plane, name, phase)
        out["requests"].append(run)
        save(out)
        console.print(f"(g) {phase} {name}: {run['rung']} {run['first_token']:.3f}s" if run["ok"]
                      else f"(g) {phase} {name}: FAILED {run['error']}")

    with _plane(work, model_dir, {**engine, "gpu_memory_utilization": DENSITY_SHARE}, names, parking=parking,
                park=True, containerConcurrency=4) as plane, MemorySampler(plane) as memory:
        for name in names:
            ask(name, "bring-up")
        used = []
        for i in range(2 * models):
            ask(names[i % models], "round robin")
            used.append(names[i % models])
        recent = list(dict.fromkeys(reversed(used)))[:max(1, min(5, models - 1))]
        for name in recent:
            ask(name, "by recency")
        target = next((n for n in used if n not in recent), names[0])  # the least recently used

        async def burst():
            async with aiohttp.ClientSession() as session:
                return await asyncio.gather(*(stream_chat(session, plane.url, target, 16) for _ in range(16)))

        results = asyncio.run(burst())
        out["burst"] = {"model": target, "requests": len(results), "failed": sum(not r.ok for r in results),
                        "rung": next((r.record.cold for r in results if r.record and r.record.cold), "ready"),
                        "ttft": sorted(r.ttft for r in results if r.ok)}
        out["memory"] = memory.figures()
        out["deaths"] = (work / "up.log").read_text(errors="replace").count(" died (")
        save(out)
    return out


def run_gpu_bench(model_dir: Path, engine: dict, runs: int, parts: list[str], out: Path, console: Console,
                  density_models: int = 8) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    results = _load(out)
    results.update({"model_dir": str(model_dir), "engine": engine})
    benches = {"vllm": ("vllm", bench_vllm), "zero": ("zero", bench_zero),
               "other-core": ("other_core", bench_other_core), "park": ("park", bench_park),
               "hibernate": ("hibernate", bench_hibernate), "swap": ("swap", bench_swap),
               "density": ("density", functools.partial(bench_density, models=density_models)),
               "warm": ("warm", bench_warm), "adopt": ("adopt", bench_adopt), "stream": ("stream", bench_stream)}
    for part in parts:
        work = out / "work" / part
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        key, bench = benches[part]

        def save(partial: dict, key: str = key) -> None:  # after every run: a part cut short keeps its runs
            results[key] = partial
            write_json(out / "results.json", results)

        save(bench(model_dir, engine, runs, work, console, save))
    write_report(results, out, console)
    return results


def _variants(results: dict) -> dict[str, list[dict]]:
    return {"vllm": results.get("vllm", {}).get("runs", []), "zero": results.get("zero", {}).get("zero", []),
            "parked": results.get("park", {}).get("parked", []), "cold": results.get("zero", {}).get("cold", []),
            "hibernated": results.get("hibernate", {}).get("hibernated", []),
            "swap": results.get("swap", {}).get("swap", []), "adopt": results.get("adopt", {}).get("adopt", [])}


def write_report(results: dict, out: Path, console: Console) -> None:
    variants = _variants(results)
    peer = mean([r["first_token"] for r in variants["vllm"]])
    peer_warm = mean([r["first_token"] for r in variants["vllm"] if r.get("compile_cache") == "warm"])
    lines = [f"# thaw on the GPU: first token ({results.get('model_dir')})", "",
             "| variant | runs | first token, mean (s) | min / max | vs (a) mean | vs (a) compile-warm | phases (mean s) |",
             "|---|---|---|---|---|---|---|"]
    table = Table(title="first token")
    for col in ("variant", "runs", "mean s", "min/max", "vs (a)", "vs (a) warm"):
        table.add_column(col)
    for key, runs in variants.items():
        if not runs:
            continue
        ft = [r["first_token"] for r in runs]
        phases: dict[str, list[float]] = {}
        for r in runs:
            for k, v in (r.get("phases") or {}).items():
                phases.setdefault(k, []).append(v)
        phase_text = ", ".join(f"{k} {mean(v):.2f}" for k, v in phases.items())
        ratio = f"{mean(ft) / peer:.3f}x" if key != "vllm" and peer == peer else "-"
        ratio_warm = f"{mean(ft) / peer_warm:.3f}x" if key != "vllm" and peer_warm == peer_warm else "-"
        lines.append(f"| {VARIANT_LABELS[key]} | {len(ft)} | {mean(ft):.3f} | {min(ft):.3f} / {max(ft):.3f} | "
                     f"{ratio} | {ratio_warm} | {phase_text} |")
        table.add_row(VARIANT_LABELS[key], str(len(ft)), f"{mean(ft):.3f}", f"{min(ft):.2f}/{max(ft):.2f}", ratio,
                      ratio_warm)
    for key in ("parked", "hibernated"):
        sleeps = [r.get("park_seconds") for r in variants[key] if r.get("park_seconds") is not None]
        if sleeps:
            lines += ["", f"{VARIANT_LABELS[key]}: the replica fell asleep in {', '.join(f'{s:.2f}' for s in sleeps)} s "
                          f"(first sleep first), holding {mean([r['parked_host_bytes'] or 0 for r in variants[key]]) / 2**30:.1f} "
                          f"GiB of host RAM asleep."]
    burst = (results.get("swap") or {}).get("burst")
    if burst:
        lines += ["", f"(f) burst of {burst['requests']} at sleeping {burst['model']}: {burst['failed']} failed; "
                      f"TTFT {', '.join(f'{t:.2f}' for t in burst['ttft'])} s."]
    lines += timeline_report(variants)
    lines += density_report(results.get("density"))
    lines += stream_report(results.get("stream"))
    parked = variants["parked"]
    if parked and parked[0].get("gpu_total"):
        free = mean([r["gpu_free"] / r["gpu_total"] for r in parked])
        held = mean([r["parked_gpu_bytes"] or 0 for r in parked]) / 2**30
        host = mean([r["parked_host_bytes"] or 0 for r in parked]) / 2**30
        lines += ["", f"GPU memory free while parked: {free:.1%} of the card (the parked replica holds {held:.2f} GiB "
                      f"of GPU memory and {host:.1f} GiB of host RAM)."]
    warm = results.get("warm") or {}
    core = {"inproc": "engine core in-process", "mp": "engine core in its own process"}.get(warm.get("engine_core"))
    rows = [(f"thaw through the gateway, {core}", warm.get("gateway")),
            (f"thaw's replica directly, {core}", warm.get("direct")),
            ("vLLM's OpenAI server", warm.get("vllm"))]
    for streams in map(str, WARM_STREAMS):
        at = [(label, (w or {}).get(streams)) for label, w in rows]  # results from before 2026-11-30 lack these
        base = at[-1][1]
        if not any(w for _, w in at):
            continue
        lines += ["", f"## Warm path: vllm bench serve, {streams} streams (random 128 in / 128 out, greedy, "
                      "--ignore-eos), ready replica", "",
                  "| server | tokens/s | TTFT p50 (s) | TTFT p95 (s) | TPOT p50 (ms) | ITL p50 / p99 (ms) | "
                  "E2EL p50 (s) | tokens/s vs vLLM | TTFT p50 vs vLLM | ITL p99 vs vLLM |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for label, w in at:
            if not w:
                continue
            peer = base if label != at[-1][0] else None  # the last row is vLLM's server itself
            vs = {k: f"{w[k] / peer[k]:.2f}x" if peer else "-" for k in ("tokens_per_second", "ttft_p50", "itl_p99")}
            lines.append(f"| {label} | {w['tokens_per_second']:.0f} | {w['ttft_p50']:.4f} | {w['ttft_p95']:.4f} | "
                         f"{w['tpot_p50'] * 1000:.1f} | {w['itl_p50'] * 1000:.1f} / {w['itl_p99'] * 1000:.1f} | "
                         f"{w['e2el_p50']:.3f} | {vs['tokens_per_second']} | {vs['ttft_p50']} | {vs['itl_p99']} |")
    other = (results.get("other_core") or {}).get("zero") or []
    if other:
        ft = [r["first_token"] for r in other]
        lines += ["", f"From zero with the engine core {'in its own process' if results['other_core']['engine_core'] == 'mp' else 'in-process'}"
                      f" (caches warm): {mean(ft):.3f} s mean of {len(ft)} ({min(ft):.2f} / {max(ft):.2f})."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    console.print(table)
    console.print("\n".join(lines))
    _plot(variants, out)
    _plot_density(results.get("density"), out)
    plot_stream(results.get("stream"), out)


def timeline_report(variants: dict[str, list[dict]]) -> list[str]:
    """Each rung's timeline as Markdown: the mean time of each event since the plane was asked, in order, and
    the step from the event before (where a start or a wake spends its wall beyond the replica's phases)."""
    lines = []
    for key, runs in variants.items():
        timelines = [r["timeline"] for r in runs if r.get("timeline")]
        if not timelines:
            continue
        events: dict[str, list[float]] = {}
        for t in timelines:
            for event, at in t.items():
                events.setdefault(event, []).append(at)
        ordered = sorted(((event, mean(ats)) for event, ats in events.items()), key=lambda e: e[1])
        lines += ["", f"### Timeline: {VARIANT_LABELS[key]} ({len(timelines)} runs, mean s since asked)", "",
                  "| event | at (s) | step (s) |", "|---|---|---|"]
        before = 0.0
        for event, at in ordered:
            lines.append(f"| {event} | {at:.3f} | {at - before:+.3f} |")
            before = at
    return lines


def density_report(density: dict | None) -> list[str]:
    """(g) as Markdown: each request's rung and first token, the targets' counts, memory, deaths."""
    if not density or not density.get("requests"):
        return []
    gib = 2**30
    reqs = density["requests"]
    lines = ["", f"## (g) density: {density['models']} models on one GPU ({density['share']:.2f} of it each; "
                 f"host copies for {DENSITY_COPIES}: hostMemory {int(density['parking']['hostMemory']) / gib:.1f} GiB)",
             "", "| # | phase | model | rung | first token (s) |", "|---|---|---|---|---|"]
    for i, r in enumerate(reqs, 1):
        ft = f"{r['first_token']:.3f}" if r["ok"] else f"failed: {r['error']}"
        lines.append(f"| {i} | {r['phase']} | {r['model']} | {r['rung']} | {ft} |")
    for phase, within in (("round robin", 2.0), ("by recency", 1.0)):
        runs = [r for r in reqs if r["phase"] == phase]
        if runs:
            ok = [r for r in runs if r["ok"]]
            fts = [r["first_token"] for r in ok]
            rungs = ", ".join(f"{k} {sum(r['rung'] == k for r in ok)}" for k in ("ready", "parked", "hibernated", "zero")
                              if any(r["rung"] == k for r in ok))
            lines.append(f"\n{phase}: {len(ok)}/{len(runs)} answered, {sum(f <= within for f in fts)} within {within:.0f} s"
                         f" (max {max(fts, default=float('nan')):.3f} s; {rungs}).")
    burst = density.get("burst")
    if burst:
        lines.append(f"\nburst of {burst['requests']} at {burst['model']} ({burst['rung']}): {burst['failed']} failed; "
                     f"TTFT p50 {percentile_of(burst['ttft'], 50):.3f} s, max {max(burst['ttft'], default=float('nan')):.3f} s.")
    memory = density.get("memory") or {}
    if memory.get("host_available_min") is not None:
        lines.append(f"\nhost RAM free at its lowest {memory['host_available_min'] / gib:.1f} GiB (the node's floor "
                     f"{memory['host_floor'] / gib:.1f} GiB); host copies at most {memory['host_copies_max'] / gib:.1f} GiB"
                     + (f"; GPU free at its lowest {memory['gpu_free_min'] / gib:.1f} GiB" if memory.get("gpu_free_min") else "")
                     + f". Engine deaths: {density.get('deaths')}.")
    return lines


def percentile_of(values: list[float], q: float) -> float:
    from thaw.loadtests.metrics import percentile

    return percentile(values, q) if values else float("nan")


def _plot_density(density: dict | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not density or not density.get("requests"):
        return
    colors = {"ready": "#2a7", "parked": "#27a", "hibernated": "#a72", "zero": "#a27"}
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, r in enumerate(density["requests"]):
        if r["ok"]:
            ax.scatter(i + 1, r["first_token"], color=colors.get(r["rung"], "#888"), s=18)
    for rung, color in colors.items():
        ax.scatter([], [], color=color, label=rung)
    for limit in (1.0, 2.0):
        ax.axhline(limit, color="#bbb", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_xlabel("request (bring-up, round robin x2, by recency)")
    ax.set_ylabel("first token, s (log)")
    ax.set_title(f"{density['models']} models on one GPU: each request's rung")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "density.png", dpi=120)
    plt.close(fig)


def _plot(variants: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, v in variants.items() if v]
    if not keys:
        return
    fig, ax = plt.subplots(figsize=(9, 4))
    values = [mean([r["first_token"] for r in variants[k]]) for k in keys]
    ax.barh([VARIANT_LABELS[k] for k in keys], values, color=["#888", "#2a7", "#27a", "#a72", "#72a", "#a27", "#2aa"][:len(keys)])
    for i, (k, v) in enumerate(zip(keys, values)):
        runs = [r["first_token"] for r in variants[k]]
        ax.text(max(runs + [v]) * 1.15, i, f"mean {v:.2f} s", va="center")
        ax.scatter(runs, [i] * len(runs), color="black", s=8, zorder=3)
    ax.set_xscale("log")
    every = [r["first_token"] for k in keys for r in variants[k]]
    ax.set_xlim(min(every) * 0.5, max(every) * 4)
    ax.set_xlabel("first token, seconds (log scale; dots are single runs)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "first_token.png", dpi=120)
    plt.close(fig)
