"""`thaw bench eventing`: the broker's durable intake and delivery, and the graph router's overhead.

Broker: `thaw up` (no models) with one trigger to a no-op subscriber in its own process; 8 concurrent
senders post binary CloudEvents; an event counts as accepted at its 202 (committed with fsync) and as
delivered when the subscriber has it (latency = subscriber's receipt - the broker's knativearrivaltime).
Router: `thaw router` on 1-step and 3-step Sequences in front of the same no-op server, one request at a
time, rounds interleaved with direct calls; overhead per step is measured against the direct call.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import requests
import yaml
from rich.console import Console
from rich.progress import Progress

from thaw.loadtests.bench.common import PlaneUnderTest, ratio_table, write_json
from thaw.loadtests.metrics import percentile
from thaw.eventing import events
from thaw.launch import ServerProcess, free_port, wait_until


def _noop(work: Path) -> tuple[ServerProcess, str]:
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "thaw.loadtests.bench.noop_server", str(port)], work / "noop.log")
    url = f"http://127.0.0.1:{port}"
    server.wait_http(url + "/stats", 30)
    return server, url


async def _send_events(url: str, total: int, senders: int, progress, task) -> tuple[float, int]:
    template, body = events.to_http(events.make_event("dev.thaw.loadtests.bench", "/bench", {"n": 1}))
    failures = 0

    async def sender(session: aiohttp.ClientSession, count: int):
        nonlocal failures
        for _ in range(count):
            headers = {**template, "ce-id": uuid.uuid4().hex}
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status != 202:
                    failures += 1
            if progress is not None:
                progress.advance(task)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(sender(session, total // senders) for _ in range(senders)))
        return time.perf_counter() - start, failures


def bench_broker(work: Path, total: int, senders: int, console: Console) -> dict:
    noop, noop_url = _noop(work)
    port = free_port()
    spec = {"platform": {"gateway": {"port": port}, "stateDir": str(work / "state")},
            "triggers": [{"name": "bench", "subscriber": {"uri": noop_url + "/sink"}}]}
    plane = PlaneUnderTest(work, spec)
    try:
        plane.server.wait_http(plane.url + "/healthz", 60)
        ingress = plane.url + "/default/default"
        asyncio.run(_send_events(ingress, 400, senders, None, None))  # warm-up, not counted
        wait_until(lambda: requests.get(noop_url + "/stats", timeout=5).json()["received"] >= 400, 30, "warm-up")
        requests.delete(noop_url + "/stats", timeout=5)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("broker: sending events", total=total)
            sent_at = time.time()
            elapsed, failures = asyncio.run(_send_events(ingress, total, senders, progress, task))
        sent = total // senders * senders
        wait_until(lambda: requests.get(noop_url + "/stats", timeout=5).json()["received"] >= sent, 120,
                   "every event delivered")
        stats = requests.get(noop_url + "/stats", timeout=5).json()
        latencies = stats["latencies"]
        return {"events": sent, "senders": senders, "failures": failures, "accepted_per_s": sent / elapsed,
                "delivered_per_s": sent / (stats["last"] - sent_at), "delivered": stats["received"],
                "latency_p50_ms": percentile(latencies, 50) * 1000, "latency_p99_ms": percentile(latencies, 99) * 1000}
    finally:
        plane.server.stop()
        noop.stop()


def _graph_file(work: Path, name: str, url: str, steps: int) -> Path:
    step_list = [{"name": f"s{i}", "serviceUrl": url + f"/step{i}", **({"data": "$response"} if i else {})}
                 for i in range(steps)]
    doc = {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "InferenceGraph", "metadata": {"name": name},
           "spec": {"nodes": {"root": {"routerType": "Sequence", "steps": step_list}}}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def _timed_calls(url: str, count: int) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            start = time.perf_counter()
            async with session.post(url, json={"instances": [1]}) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url} answered {r.status}")
            out.append(time.perf_counter() - start)
    return out


def bench_router(work: Path, requests_per_variant: int, rounds: int, console: Console) -> dict:
    noop, noop_url = _noop(work)
    routers = {}
    try:
        for steps in (1, 3):
            port = free_port()
            graph = _graph_file(work, f"bench-{steps}", noop_url, steps)
            routers[steps] = ServerProcess([sys.executable, "-m", "thaw.cli", "router", "--graph", str(graph),
                                            "--port", str(port)], work / f"router-{steps}.log")
            routers[steps].wait_http(f"http://127.0.0.1:{port}/readyz", 60)
            routers[steps].url = f"http://127.0.0.1:{port}/"
        variants = {"direct": noop_url + "/direct", "router, 1 step": routers[1].url, "router, 3 steps": routers[3].url}
        for url in variants.values():  # warm-up: connections, first-call imports
            asyncio.run(_timed_calls(url, 100))
        samples: dict[str, list[float]] = {k: [] for k in variants}
        per_round = max(1, requests_per_variant // rounds)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("router: timed calls", total=per_round * rounds * len(variants))
            for _ in range(rounds):
                for name, url in variants.items():
                    samples[name] += asyncio.run(_timed_calls(url, per_round))
                    progress.advance(task, per_round)
        p50 = {k: percentile(v, 50) * 1000 for k, v in samples.items()}
        p99 = {k: percentile(v, 99) * 1000 for k, v in samples.items()}
        return {"requests_per_variant": per_round * rounds, "p50_ms": p50, "p99_ms": p99,
                "overhead_1_step_p50_ms": p50["router, 1 step"] - p50["direct"],
                "overhead_per_step_3_steps_p50_ms": (p50["router, 3 steps"] - 3 * p50["direct"]) / 3,
                "samples_ms": {k: [x * 1000 for x in v] for k, v in samples.items()}}
    finally:
        for server in routers.values():
            server.stop()
        noop.stop()


def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in result["router"]["samples_ms"].items():
        ordered = sorted(values)
        ax.plot(ordered, [i / len(ordered) for i in range(len(ordered))], label=name)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_xlim(0, percentile(result["router"]["samples_ms"]["router, 3 steps"], 99) * 1.2)
    ax.set_title("graph router vs direct call (loopback, no-op step)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_eventing_bench(events_total: int, senders: int, router_requests: int, rounds: int, out: Path,
                       console: Console) -> dict:
    work = out.parent / "eventing-work"
    work.mkdir(parents=True, exist_ok=True)
    console.print(f"broker: {events_total} events from {senders} concurrent senders ...")
    broker = bench_broker(work, events_total, senders, console)
    console.print(f"router: {router_requests} sequential calls per variant in {rounds} interleaved rounds ...")
    router = bench_router(work, router_requests, rounds, console)
    result = {"broker": broker, "router": router}
    write_json(out, result)
    _plot(result, out.with_suffix(".png"))
    console.print(ratio_table("broker (durable: 202 after fsync)", [
        ("events/s accepted", broker["accepted_per_s"], 1000.0, ">= 1000/s"),
        ("events/s delivered", broker["delivered_per_s"], 1000.0, ""),
    ], "thaw broker", "target"))
    console.print(f"delivery latency p50 {broker['latency_p50_ms']:.1f} ms, p99 {broker['latency_p99_ms']:.1f} ms; "
                  f"{broker['delivered']}/{broker['events']} delivered, {broker['failures']} refused")
    p50 = router["p50_ms"]
    console.print(ratio_table("graph router (p50 per request, ms)", [
        ("1-step graph vs direct", p50["router, 1 step"], p50["direct"], ""),
        ("3-step graph vs 3 direct calls", p50["router, 3 steps"], 3 * p50["direct"], ""),
    ], "through the router", "direct"))
    console.print(f"router overhead per step, p50: {router['overhead_1_step_p50_ms']:.2f} ms (1 step), "
                  f"{router['overhead_per_step_3_steps_p50_ms']:.2f} ms (3 steps); target <= 2 ms. "
                  f"Plot: {out.with_suffix('.png')}")
    return result
