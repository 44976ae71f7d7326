"""`thaw router`: one InferenceGraph file served standalone on 127.0.0.1 (what a graph's Knative Service runs)."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import aiohttp
import uvloop
import yaml
from aiohttp import web

from thaw.graph_spec import GraphInvalid, InferenceGraphSpec, parse_graph

from .router import GraphRouter, header_patterns, router_app

log = logging.getLogger("thaw.router")


def load_inference_graph(path: Path) -> tuple[str, InferenceGraphSpec]:
    """Name and validated spec of a KServe InferenceGraph manifest; ValueError says what is wrong."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the graph: {exc}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "InferenceGraph":
        raise ValueError(f"{path}: not an InferenceGraph manifest (kind: InferenceGraph, with metadata and spec)")
    if not str(doc.get("apiVersion", "")).startswith("serving.kserve.io/"):
        raise ValueError(f"{path}: apiVersion must be serving.kserve.io/v1alpha1, not {doc.get('apiVersion')!r}")
    name = (doc.get("metadata") or {}).get("name")
    if not name:
        raise ValueError(f"{path}: metadata.name is missing")
    try:
        return name, parse_graph(name, doc.get("spec") or {})
    except GraphInvalid as exc:
        raise ValueError("\n".join(f"{path}: {p}" for p in exc.problems)) from None


async def _serve(name: str, graph: InferenceGraphSpec, host: str, port: int, gateway: str | None) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    router = GraphRouter(name, graph, session, models_url=gateway, patterns=header_patterns())
    # routerTimeouts.serverIdle: aiohttp's keep-alive timer closes a connection with no whole request by then
    runner = web.AppRunner(router_app(router), access_log=None,
                           keepalive_timeout=graph.routerTimeouts.serverIdle or 60)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("graph %s on http://%s:%d", name, host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await session.close()


def run_router(name: str, graph: InferenceGraphSpec, port: int, gateway: str | None, host: str = "127.0.0.1") -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    uvloop.run(_serve(name, graph, host, port, gateway))
