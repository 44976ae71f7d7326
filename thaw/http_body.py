"""Reading a request body on the aiohttp surfaces (gateway, broker, graph router), with a deadline."""

from __future__ import annotations

import asyncio

from aiohttp import web


async def read_body(request: web.Request, timeout: float | None) -> bytes:
    """The whole body. Raises aiohttp's HTTPRequestEntityTooLarge past the app's client_max_size, and
    HTTPRequestTimeout when the client sends it slower than `timeout` seconds allow (None: no limit);
    each surface answers either in its own shape."""
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(text=f"The request body did not arrive within {timeout:g}s") from None
