"""Proxy one request to one replica, streaming passed through chunk by chunk.

What the replica did with it decides what the caller (the activator) does next: an answer goes back
to the client; `NotReady` (its engine is loading again) and `NotAnswered` (its connection failed before
any answer) mean nothing reached the client, so another replica may take the request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Mapping

import aiohttp
from aiohttp import web

from thaw.openai_wire import LOADING_HEADER

from .openai_errors import error_response, sse_error

# Not passed on either way: RFC 9110's connection-specific headers, the length and host the hop sets
# again, and the client's credentials (the gateway checked them; replicas never see them).
NOT_FORWARDED = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
                 "transfer-encoding", "upgrade", "host", "content-length", "authorization"}


@dataclass(frozen=True)
class LocalCall:
    """A request made inside the gateway's process (the broker's deliveries to a model): what the proxy reads of
    a client's request, with no connection to stream an answer to, so its answer comes back whole."""

    method: str
    headers: Mapping[str, str] = field(default_factory=dict)
    query_string: str = ""


class NotReady(Exception):
    """The replica answered that its engine is (again) loading: nothing was done with the request."""


class NotAnswered(Exception):
    """The replica's connection failed before any answer: refused, or reset or closed under the request."""

    def __init__(self, refused: bool):
        super().__init__()
        self.refused = refused


async def proxy(session: aiohttp.ClientSession, request: web.Request | LocalCall, replica_url: str, path: str, body: bytes,
                remaining: float, answer_headers: dict[str, str], model: str,
                timeout_seconds: int) -> web.StreamResponse:
    """Send the request to the replica and its answer back; a timeout is a 504, a replica dying under an
    answer a 502 (a stream gets an error chunk and [DONE] instead, since its status has gone out)."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in NOT_FORWARDED}
    url = replica_url + path + (f"?{request.query_string}" if request.query_string else "")
    response: web.StreamResponse | None = None
    answered = False
    try:
        async with session.request(request.method, url, data=body, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=max(0.001, remaining))) as upstream:
            if upstream.status == 503 and LOADING_HEADER in upstream.headers:
                raise NotReady()
            answered = True
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in NOT_FORWARDED}
            out_headers.update(answer_headers)
            if not (upstream.headers.get("Content-Type", "").startswith("text/event-stream")
                    and isinstance(request, web.BaseRequest)):
                return web.Response(body=await upstream.read(), status=upstream.status, headers=out_headers)
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except ConnectionResetError:  # our client left; leaving the block closed the upstream request too
        return response or web.Response(status=499)
    except asyncio.TimeoutError:
        message, code, status = f"The request ran past timeoutSeconds ({timeout_seconds}s)", "timeout", 504
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        if not answered and isinstance(exc, aiohttp.ClientConnectionError):
            raise NotAnswered(refused=isinstance(exc, aiohttp.ClientConnectorError)) from exc
        message, code, status = (f"The replica serving '{model}' went away mid-request ({type(exc).__name__})",
                                 "replica_failed", 502)
    if response is None:
        return error_response(status, message, "server_error", code=code)
    try:
        await response.write(sse_error(message, code))
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass
    return response
