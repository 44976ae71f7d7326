"""Small real HTTP servers (aiohttp) on 127.0.0.1, run on an event loop in a background thread:
the upstream "models" of graph tests and the subscribers of broker tests."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web


class LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, app: web.Application, port: int = 0, runner_class: type = web.AppRunner) -> str:
        async def start() -> str:
            runner = runner_class(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", port)
            await site.start()
            self.runners.append(runner)
            return f"http://127.0.0.1:{runner.addresses[0][1]}"

        return self.run(start())

    def close(self) -> None:
        async def stop():
            for runner in self.runners:
                await runner.cleanup()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class Seen:
    body: Any
    headers: dict[str, str]
    path: str
    at: float = field(default_factory=time.monotonic)


@dataclass
class Upstreams:
    """One server, one path per upstream: `reply(path, status, body)` sets what it answers; `seen[path]`
    lists what it was sent."""

    base: str = ""
    replies: dict[str, tuple[int, Any]] = field(default_factory=dict)
    handlers: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = field(default_factory=dict)
    seen: dict[str, list[Seen]] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"{self.base}/{path}"

    def reply(self, path: str, body: Any, status: int = 200) -> str:
        self.replies[path] = (status, body)
        return self.url(path)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        self.seen.setdefault(path, []).append(Seen(body, dict(request.headers), path))
        if path in self.handlers:
            return await self.handlers[path](request)
        status, reply = self.replies.get(path, (404, {"error": "no such upstream"}))
        return web.json_response(reply, status=status)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.handle)
        return app
