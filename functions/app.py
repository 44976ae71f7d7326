"""The function's Flask app: the OpenAI routes, the replica's own routes (probes, metrics, sleep) and a
CloudEvents route, each a blueprint over one FunctionService; errors in OpenAI's shape.

`create_app` returns at once; the engine loads on its own thread, so /healthz answers from the first
moment and /readyz turns 200 when the engine has loaded and served its warm-up generation.
"""

from __future__ import annotations

import logging
import os
import time

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from . import protocol as p
from .boot import FunctionConfig, weights_fetcher
from .engine import Engine
from .metrics import FunctionMetrics
from .payload_log import PayloadLogger
from .routes_engine import engine_routes
from .routes_events import event_routes
from .routes_openai import openai_routes
from .service import FunctionService
from .serving import ClientGone

log = logging.getLogger("thaw.function")


LOGGED_ROUTES = frozenset({"openai.chat", "openai.completions", "openai.embeddings"})


def log_payloads(app: Flask, logger: PayloadLogger) -> None:
    """Each OpenAI request and its response to the payload logger (KServe's logger), the response once whole."""

    @app.before_request
    def log_request():
        if request.endpoint in LOGGED_ROUTES:
            request.environ["thaw.log_id"] = log_id = logger.new_id(request.headers)
            logger.request(log_id, request.get_data(cache=True), request.mimetype, request.headers)

    @app.after_request
    def log_response(response: Response):
        log_id = request.environ.get("thaw.log_id")
        if log_id is not None:
            if response.is_streamed:
                response.response = logger.tee(log_id, response.response)
            else:
                logger.response(log_id, response.get_data(), response.mimetype)
        return response


def start_engine(config: FunctionConfig, app: Flask) -> Engine:
    """The replica's engine, loading on its own thread (adoptable: functions/pool.py)."""
    # The launcher stamps the wall-clock time before exec; the gap to here is process start.
    launched = os.environ.get("THAW_LAUNCH_TIME")
    phases = {"process_start": max(0.0, time.time() - float(launched))} if launched else {}
    # vLLM's kernel registration calls hasattr() on every module global; on werkzeug's context-local
    # proxies (flask.request, ...) that raises outside a request, so the engine loads inside one.
    return Engine(config.engine, weights_fetcher(config), load_context=app.test_request_context, phases=phases,
                  served_name=config.served_name, view_root=config.cache.root / "views" if config.cache else None,
                  adoptable=config.pool).start()


def create_app(config: FunctionConfig, engine: Engine | None = None) -> Flask:
    """The function's WSGI app. Starts loading the engine unless one is given."""
    app = Flask("thaw.function")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    metrics = FunctionMetrics()
    engine = engine or start_engine(config, app)
    service = FunctionService(config, engine, metrics)
    app.extensions["thaw"] = service
    for routes in (openai_routes(service), engine_routes(service), event_routes(service)):
        app.register_blueprint(routes)
    openai_error_handlers(app)

    @app.after_request
    def count(response: Response):
        rule = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(rule, str(response.status_code)).inc()
        return response

    if config.logger is not None:
        log_payloads(app, PayloadLogger(config.logger, metrics))

    return app


def openai_error_handlers(app: Flask) -> None:
    """Every error in OpenAI's shape."""

    @app.errorhandler(p.APIError)
    def api_error(exc: p.APIError):
        return jsonify(exc.body()), exc.status, exc.headers

    @app.errorhandler(ClientGone)
    def client_left(exc: ClientGone):
        # Nobody reads this answer; 499 is what nginx (and Knative's queue-proxy logs) call it.
        return Response(status=499)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        kind = "not_found_error" if exc.code == 404 else "invalid_request_error"
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}  # 405's Allow
        return jsonify(p.error_body(exc.description or exc.name, kind, None, None)), exc.code, headers

    @app.errorhandler(Exception)
    def internal_error(exc: Exception):
        log.exception("unhandled error")
        return jsonify(p.error_body("The server had an error processing your request", "server_error")), 500
