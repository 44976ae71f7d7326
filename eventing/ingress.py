"""The broker's ingress: Knative's `POST /<namespace>/<broker>`. It takes a CloudEvent in binary or structured
mode and answers 202 only once the event and its deliveries are committed (broker.py); 400 with what is wrong
for an invalid event, 401/403 for a sender the gate refuses, 404 for an unknown broker, 405 for another method,
413/408 for a body too large or too slow, 503 with Retry-After when the store cannot write (a full disk: the
event was not accepted). It notes the sender's models on the event (its token's scope), never the sender."""

from __future__ import annotations

import logging
from typing import Callable

from aiohttp import web

from thaw.http_body import read_body

from . import events
from .broker import Broker
from .store import StoreError

log = logging.getLogger("thaw.broker")

STORE_RETRY_AFTER = 5  # seconds: when the store cannot write (a full disk), what a sender is told to wait


class BrokerIngress:
    def __init__(self, broker: Broker, authorize: Callable[[str | None], tuple[int, str] | None] | None = None,
                 scope: Callable[[str | None], frozenset[str] | None] | None = None, read_timeout: float = 60.0):
        """`authorize(Authorization header)` returns (status, message) to refuse an event; `scope(Authorization
        header)` is the models the sender may use (None: all); `read_timeout` how long a body may take to
        arrive (thaw up: the gateway's idleTimeout)."""
        self.broker = broker
        self.authorize = authorize
        self.scope = scope
        self.read_timeout = read_timeout

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{namespace}/{broker}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["broker"]
        broker = self.broker
        if namespace != broker.namespace:
            raise web.HTTPNotFound()  # not a broker path at all: the host app answers it as its own
        if name not in broker.brokers:
            return web.json_response({"error": f"no broker {namespace}/{name}; brokers here: "
                                               f"{', '.join(f'{broker.namespace}/{b}' for b in sorted(broker.brokers))}"},
                                     status=404)
        if request.method != "POST":
            return web.json_response({"error": "a broker accepts CloudEvents by POST"}, status=405,
                                     headers={"Allow": "POST"})
        if self.authorize is not None:
            refused = self.authorize(request.headers.get("Authorization"))
            if refused:
                return web.json_response({"error": refused[1]}, status=refused[0])
        try:
            body = await read_body(request, self.read_timeout)
        except (web.HTTPRequestEntityTooLarge, web.HTTPRequestTimeout) as exc:
            return web.json_response({"error": exc.text}, status=exc.status)
        try:
            event = events.parse_http_event(request.headers, body)
        except events.InvalidEvent as exc:
            return web.json_response({"error": str(exc)}, status=400)
        try:
            await broker.publish(name, event, self.scope(request.headers.get("Authorization")) if self.scope else None)
        except StoreError as exc:  # not accepted: the sender keeps the event and retries
            log.warning("broker: refusing an event: %s", exc)
            return web.json_response({"error": f"{exc}; the event was not accepted, retry later"}, status=503,
                                     headers={"Retry-After": str(STORE_RETRY_AFTER)})
        return web.Response(status=202)
