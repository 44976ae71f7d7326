"""Eventing inside `thaw up`: the broker at `/<namespace>/<broker>` and the spec's graphs at
`/graphs/<name>`, on the gateway's port, following spec changes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import aiohttp
from aiohttp import web

from thaw.durations import parse_duration
from thaw.graph_spec import parse_graph
from thaw.spec import Spec

from .broker import Broker
from .ingress import BrokerIngress
from .triggers import brokers_in, triggers_from_spec
from .router import GraphRouter, error_response, header_patterns

log = logging.getLogger("thaw.eventing")


class EventingHost:
    def __init__(self, spec: Spec, gateway_url: str, state_dir: Path,
                 on_graph_begin: Callable[[str, object], None] | None = None,
                 authorize: Callable[[str | None], tuple[int, str] | None] | None = None,
                 internal_token: str | None = None, warmer_url: str | None = None,
                 scope: Callable[[str | None], frozenset[str] | None] | None = None):
        """With auth on, `authorize` gates the broker and the graphs, and the broker reaches models with
        `internal_token` (graphs pass on their caller's token, so a model's allow list still applies), never
        further than the sender's own `scope` (its token's models) allows.
        With `warmer_url`, the broker has the cache warmer's triggers, as a cluster's broker does."""
        self.authorize = authorize
        self.warmer_url = warmer_url
        self.gateway_url = gateway_url
        self.on_graph_begin = on_graph_begin
        self.patterns = header_patterns()
        self.session: aiohttp.ClientSession | None = None
        self.spec = spec
        # brokers and triggers come from apply_spec, at start and on each spec change
        self.broker = Broker(Path(state_dir) / "broker.db", spec.platform.namespace, set(), [],
                             gateway_auth=(gateway_url + "/", f"Bearer {internal_token}") if internal_token else None)
        self.ingress = BrokerIngress(self.broker, authorize, scope)
        self.graphs: dict[str, GraphRouter] = {}

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.broker.session = self.session
        self.apply_spec(self.spec)
        await self.broker.start()

    async def stop_dispatching(self) -> None:
        await self.broker.stop_dispatching()

    async def stop(self) -> None:
        await self.broker.stop()
        await self.session.close()

    def apply_spec(self, spec: Spec) -> None:
        self.spec = spec
        self.broker.brokers = brokers_in(spec)
        self.broker.triggers = triggers_from_spec(spec, self.gateway_url, self.warmer_url)
        read_timeout = parse_duration(spec.platform.gateway.idleTimeout)
        self.ingress.read_timeout = read_timeout
        self.graphs = {}
        for name, raw in spec.graphs.items():
            graph = parse_graph(name, raw)
            begin = (lambda n, g=graph: self.on_graph_begin(n, g)) if self.on_graph_begin else None
            self.graphs[name] = GraphRouter(name, graph, self.session, models_url=self.gateway_url,
                                            patterns=self.patterns, on_begin=begin, read_timeout=read_timeout)

    async def publish(self, event) -> None:
        """An event into the default broker from inside thaw up (the plane's revision events, the
        optimizer's warm requests)."""
        await self.broker.publish("default", event)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/graphs/{name}", self.graph)
        self.ingress.add_routes(app)

    async def graph(self, request: web.Request) -> web.StreamResponse:
        if self.authorize is not None:
            refused = self.authorize(request.headers.get("Authorization"))
            if refused:
                return error_response(*refused)
        router = self.graphs.get(request.match_info["name"])
        if router is None:
            return error_response(404, f"no graph named {request.match_info['name']!r}; graphs here: "
                                       f"{', '.join(sorted(self.graphs)) or 'none'}")
        return await router.handle(request)
