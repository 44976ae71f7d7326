"""gunicorn settings for a function replica: one worker per engine, threads for concurrency.

The worker owns the engine; gthread's threads each carry one request (a stream holds its thread
until its last token), so `threads` bounds concurrent requests per replica.
"""

from __future__ import annotations

import json
import logging

from gunicorn import util

from thaw.openai_wire import error_body


def options(host: str, port: int, threads: int = 64) -> dict:
    return {
        "bind": f"{host}:{port}",
        "workers": 1,
        "worker_class": "gthread",
        "threads": threads,
        # The engine loads on a thread while the worker's main loop keeps heartbeating, so a long load
        # does not trip the timeout; the timeout only catches a worker that is truly stuck.
        "timeout": 120,
        "graceful_timeout": 30,
        "keepalive": 75,
        "accesslog": None,
        # gunicorn's control socket has one default path per user: many replicas would fight over it.
        "control_socket_disable": True,
        "loglevel": "info",
        "post_worker_init": json_parser_errors,
        "worker_exit": worker_exit,
    }


def json_parser_errors(worker) -> None:
    """Requests gunicorn's own parser refuses (a request line or header over its limits, a malformed one) get
    OpenAI's error object, as every other answer does, instead of gunicorn's HTML page. On a cluster these
    reach users: Knative's queue-proxy passes on a URL or header count that gunicorn's limits refuse.
    gunicorn writes these pages through `util.write_error` and has no setting for their body."""
    def write_error(sock, status_int: int, reason: str, mesg: str) -> None:
        kind = "invalid_request_error" if status_int < 500 else "server_error"
        body = json.dumps(error_body(mesg or reason, kind)).encode()
        head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        util.write_nonblock(sock, head + body)

    util.write_error = write_error


def worker_exit(server, worker) -> None:
    """Shut the engine (and an engine-core process, if any) down with the worker."""
    app = getattr(worker, "wsgi", None)
    service = getattr(app, "extensions", {}).get("thaw") if app is not None else None
    if service is not None:
        logging.getLogger("thaw.function").info("stopping engine")
        service.engine.stop()
