"""The replica's WSGI app, and its engine pool side: an engine built ahead, waiting without weights for a model
of its key to adopt it.

An engine's start is mostly spent on what does not depend on the weights: the CUDA context, compiling,
capturing CUDA graphs, sizing the KV cache. A pooled replica (`thaw function serve --pool`) does all of it on
dummy weights (for the model it was launched as) and then sleeps at vLLM's level 2: a hibernated engine with no
weights of anyone's. A model whose key matches (functions/engine_plan.py's `engine_key`: architecture view,
tokenizer and engine configuration) adopts it: its weights stream in as at a hibernated wake, the prefix cache
is reset, and the replica then serves that model as any replica started for it (its served name, payload
logger, routes). A sleeping replica the plane would stop goes back to the pool instead (`release`): its host
copy dropped, it waits as a pooled one does.

While it waits the replica answers its probes (/readyz is 200 once the engine waits) and POST /thaw/adopt, whose
body is the adopter's launch as the standby gets it (knative/embedded/control/standby.py's ReplicaLaunch:
{"boot", "served_name", "engine", ...}); serving, POST /thaw/release gives the model up. The serving plane
(knative/embedded/control/engine_pool.py) is their only caller: the gateway routes neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading

from flask import Flask, Response, jsonify, request
from pydantic import ValidationError

from thaw.launch import ReplicaBoot
from thaw.spec import EngineArgs
from thaw.vllm_platform import detect

from . import protocol as p
from .app import create_app, openai_error_handlers, start_engine
from .boot import FunctionConfig, function_config, weights_fetcher

BOOT_FIELDS = {f.name for f in dataclasses.fields(ReplicaBoot)}
RELEASE = "/thaw/release"


def adoption(body, engine_args: EngineArgs) -> FunctionConfig:
    """The adopter's configuration from the adopt call's body, or the 4xx that says what is wrong with it."""
    if not isinstance(body, dict):
        raise p.APIError(400, "The body must be a JSON object: {boot, served_name, engine}")
    served = body.get("served_name")
    if not isinstance(served, str) or not served:
        raise p.APIError(400, "served_name must be a non-empty string", param="served_name")
    boot = body.get("boot")
    if not isinstance(boot, dict) or set(boot) - BOOT_FIELDS:
        raise p.APIError(400, f"boot must be an object of ReplicaBoot's fields ({', '.join(sorted(BOOT_FIELDS))})",
                         param="boot")
    try:
        engine = EngineArgs.model_validate(body.get("engine") or {})
        config = function_config(ReplicaBoot.from_json({**boot, "pool": False}), served, engine)
    except (ValidationError, ValueError, TypeError) as exc:
        raise p.APIError(400, f"not a replica's launch: {exc}") from None
    if config.model_dir is not None and not config.model_dir.is_dir():
        raise p.APIError(400, f"boot.model_dir {str(config.model_dir)!r} is not a folder here", param="boot")
    if detect().resolve(engine) != engine_args:
        raise p.APIError(409, "This engine was built with other engine arguments: a model adopts only an engine "
                              "of its own key", code="engine_mismatch", param="engine")
    return config


class ReplicaApp:
    """The replica's WSGI app: its model's app (functions/app.py) while it serves one; the waiting routes while
    its engine is pooled."""

    def __init__(self, config: FunctionConfig):
        self.waiting = Flask("thaw.pool")
        self.engine = engine = start_engine(config, self.waiting)
        self.adopted: Flask | None = None if config.pool else create_app(config, engine)
        self._moving = threading.Lock()  # one adoption or release at a time
        openai_error_handlers(self.waiting)

        @self.waiting.get("/healthz")
        def healthz():
            if engine.state == "failed":
                return jsonify({"status": "failed", "error": engine.error}), 500
            return jsonify({"status": "alive"})

        @self.waiting.get("/readyz")
        def readyz():
            body = {"status": engine.state, "error": engine.error, "phases": engine.phases, "marks": engine.marks,
                    "pooled": True}
            if engine.state == "pooled" and engine.engine_pid:
                body["engine_pid"] = engine.engine_pid
            return Response(json.dumps(body), 200 if engine.state == "pooled" else 503, mimetype="application/json")

        @self.waiting.post("/thaw/adopt")
        def adopt():
            config = adoption(request.get_json(silent=True), engine.args)
            with self._move():
                model_dir, timings = weights_fetcher(config, read_ahead=False)()
                result = engine.adopt(model_dir, config.served_name)
                self.adopted = create_app(config, engine)
            # the adopter's phases (its weights' fetch, the adoption), not the pooled engine's start
            return jsonify({**result, "phases": {**timings, "adopt": result["seconds"]}, "engine_pid": engine.engine_pid})

        @self.waiting.post(RELEASE)
        def release():
            with self._move():
                if self.adopted is None:
                    raise p.APIError(409, "This engine serves no model", code="engine_not_releasable")
                engine.release()
                self.adopted = None
            return jsonify({"status": engine.state})

    @contextlib.contextmanager
    def _move(self):
        if not self._moving.acquire(blocking=False):
            raise p.APIError(409, "Another model is adopting or releasing this engine", code="engine_moving")
        try:
            yield
        finally:
            self._moving.release()

    @property
    def extensions(self) -> dict:
        """What gunicorn's worker_exit reads (functions/gunicorn_conf.py): whose engine to stop."""
        return self.adopted.extensions if self.adopted is not None else {"thaw": self}

    def __call__(self, environ, start_response):
        app = self.adopted
        if app is None or environ.get("PATH_INFO") == RELEASE:
            app = self.waiting
        return app(environ, start_response)

