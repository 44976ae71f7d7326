"""Pieces every benchmark shares: a streaming load generator, cold-start timing, ratio tables."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import requests
import yaml
from rich.table import Table

from thaw.launch import ServerProcess, base_env, wait_until
from thaw.loadtests.metrics import RequestRecord, percentile, report


@dataclass
class StreamResult:
    ok: bool
    ttft: float = float("nan")
    total: float = float("nan")
    output_tokens: int = 0
    error: str | None = None
    queued: float = float("nan")  # how long thaw's activator held the request (X-Thaw-Queue-Seconds)
    record: RequestRecord | None = None  # its timings, for metrics.report


async def stream_chat(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int,
                      prompt: str = "Write a story about a lighthouse.") -> StreamResult:
    """One streamed chat completion, timed chunk by chunk (metrics.RequestRecord)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    record = RequestRecord(time.perf_counter())
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            if r.status != 200:
                return StreamResult(False, error=f"HTTP {r.status}: {(await r.text())[:200]}")
            queued = float(r.headers.get("X-Thaw-Queue-Seconds", "nan"))
            record.cold = r.headers.get("X-Thaw-Cold-Start")
            async for raw in r.content:
                error = record.read_line(raw)
                if error:
                    return StreamResult(False, error=error)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return StreamResult(False, error=f"{type(exc).__name__}: {exc}")
    if not record.chunks:
        return StreamResult(False, total=time.perf_counter() - record.sent, error="no token", queued=queued)
    return StreamResult(True, record.ttft, time.perf_counter() - record.sent, record.output_tokens, None, queued,
                        record)


@dataclass
class LoadResult:
    clients: int
    requests: int
    failures: int
    wall_seconds: float
    output_tokens: int
    tokens_per_second: float
    ttft_p50: float
    ttft_p95: float
    errors: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # metrics.report: TTFT, TPOT, ITL, E2EL p50/p90/p99


async def _load(url: str, model: str, clients: int, per_client: int, max_tokens: int, on_done) -> LoadResult:
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=clients * 2)
    results: list[StreamResult] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async def client(i: int):
            for j in range(per_client):
                results.append(await stream_chat(session, url, model, max_tokens, f"Story {i}-{j}: a lighthouse."))
                on_done()

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - start
    good = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in good)
    ttfts = [r.ttft for r in good]
    return LoadResult(clients, len(results), len(results) - len(good), wall, tokens, tokens / wall,
                      percentile(ttfts, 50), percentile(ttfts, 95),
                      sorted({r.error for r in results if r.error})[:5], report([r.record for r in good], wall))


def run_streaming_load(url: str, model: str, clients: int, per_client: int, max_tokens: int,
                       on_done=lambda: None) -> LoadResult:
    """`clients` concurrent streaming clients, each sending `per_client` requests one after another."""
    return asyncio.run(_load(url, model, clients, per_client, max_tokens, on_done))


def first_answer(url: str, model: str) -> StreamResult:
    """One short streamed question; raises if it fails."""

    async def one():
        async with aiohttp.ClientSession() as session:
            return await stream_chat(session, url, model, 16, "What is the capital of France?")

    result = asyncio.run(one())
    if not result.ok:
        raise RuntimeError(f"request to {model} failed: {result.error}")
    return result


def first_token_after_launch(server, ready_url: str, base_url: str, model: str, deadline_s: float = 600) -> dict:
    """Poll readiness every 50 ms from launch, then stream one request: seconds to ready and to first token."""
    server.wait_http(ready_url, deadline_s)
    ready = time.time() - server.launched_at
    result = first_answer(base_url, model)
    return {"ready": ready, "first_token": ready + result.ttft}


def ratio_table(title: str, rows: list[tuple[str, float, float, str]], ours: str, peer: str) -> Table:
    """Rows of (metric, ours, peer, target) with ours/peer ratios."""
    table = Table(title=title)
    for col, justify in (("metric", "left"), (ours, "right"), (peer, "right"), ("ratio", "right"),
                         ("target", "left")):
        table.add_column(col, justify=justify)
    for metric, a, b, target in rows:
        table.add_row(metric, f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}x" if b else "-", target)
    return table


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))
    tmp.replace(path)


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")



class PlaneUnderTest:
    """`thaw up` on a generated spec, in its own process, with the status queries benchmarks need."""

    def __init__(self, work: Path, spec: dict):
        self.url = f"http://127.0.0.1:{spec['platform']['gateway']['port']}"
        spec_path = work / "thaw.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        self.server = ServerProcess([sys.executable, "-m", "thaw.cli", "up", "-f", str(spec_path)], work / "up.log",
                                    env=base_env())

    def status(self, model: str) -> dict:
        models = requests.get(self.url + "/thaw/v1/status", timeout=10).json()["models"]
        return next(m for m in models if m["name"] == model)["revisions"][0]

    def wait(self, condition, timeout: float, what: str) -> None:
        wait_until(condition, timeout, what, self.server)

    def pool_waiting(self) -> int:
        """Engines waiting in the engine pool, all shapes."""
        pool = requests.get(self.url + "/thaw/v1/status", timeout=10).json().get("engine_pool") or []
        return sum(len(shape["waiting"]) for shape in pool)

    def standby_ready(self) -> bool:
        return requests.get(self.url + "/thaw/v1/status", timeout=10).json()["standby"]

    def at_zero(self, model: str) -> bool:
        rev = self.status(model)
        return rev["desired"] == 0 and not any(rev["replicas"].values())
