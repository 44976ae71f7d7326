"""A no-op HTTP server for the eventing benchmark, in its own process: answers every POST at once with a
small JSON body, and keeps each CloudEvent's delivery latency (now - knativearrivaltime).
`GET /stats` returns {"received": n, "latencies": [...], "first": t, "last": t}; `DELETE /stats` resets."""

from __future__ import annotations

import sys
import time
from datetime import datetime

import uvloop
from aiohttp import web

STATS: dict = {"received": 0, "latencies": [], "first": None, "last": None}
ANSWER = b'{"predictions": [1]}'


async def receive(request: web.Request) -> web.Response:
    await request.read()
    now = time.time()
    arrived = request.headers.get("ce-knativearrivaltime")
    if arrived:
        STATS["received"] += 1
        STATS["latencies"].append(now - datetime.fromisoformat(arrived.replace("Z", "+00:00")).timestamp())
        STATS["first"] = STATS["first"] or now
        STATS["last"] = now
    return web.Response(body=ANSWER, content_type="application/json")


async def stats(request: web.Request) -> web.Response:
    if request.method == "DELETE":
        STATS.update(received=0, latencies=[], first=None, last=None)
    return web.json_response(STATS)


def main(port: int) -> None:
    app = web.Application()
    app.router.add_route("GET", "/stats", stats)
    app.router.add_route("DELETE", "/stats", stats)
    app.router.add_post("/{tail:.*}", receive)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main(int(sys.argv[1]))
