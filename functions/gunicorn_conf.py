"""gunicorn settings for a function replica: one worker per engine, threads for concurrency.

The worker owns the engine; gthread's threads each carry one request (a stream holds its thread
until its last token), so `threads` bounds concurrent requests per replica.
"""

from __future__ import annotations

import logging


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
        "worker_exit": worker_exit,
    }


def worker_exit(server, worker) -> None:
    """Shut the engine (and an engine-core process, if any) down with the worker."""
    app = getattr(worker, "wsgi", None)
    service = getattr(app, "extensions", {}).get("thaw") if app is not None else None
    if service is not None:
        logging.getLogger("thaw.function").info("stopping engine")
        service.engine.stop()
