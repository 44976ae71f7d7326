"""The gateway's and activator's answers in OpenAI's error object (functions/protocol.py builds it)."""

from __future__ import annotations

import json

from aiohttp import web

from thaw.openai_wire import error_body


def error_response(status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None, headers: dict | None = None) -> web.Response:
    return web.json_response(error_body(message, type, param, code), status=status, headers=headers)


def sse_error(message: str, code: str) -> bytes:
    """The end of a stream whose status has already gone out: an error chunk, then [DONE]."""
    return (f"data: {json.dumps(error_body(message, 'server_error', None, code))}\n\n"
            "data: [DONE]\n\n").encode()
