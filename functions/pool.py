"""A pooled replica: an engine built ahead, waiting without weights for a model of its key to adopt it.

An engine's start is mostly spent on what does not depend on the weights: the CUDA context, compiling,
capturing CUDA graphs, sizing the KV cache. A pooled replica does all of it on dummy weights (for the model it
was launched as) and then sleeps at vLLM's level 2: a hibernated engine with no weights of anyone's. A model
whose key matches (functions/engine_plan.py's `engine_key`: architecture view, tokenizer and engine
configuration) adopts it: its weights stream in as at a hibernated wake, the prefix cache is reset, and the
replica then serves that model as any replica started for it (its served name, payload logger, routes).

Before the adoption the replica answers its probes (/readyz is 200 once the engine waits) and
POST /thaw/adopt, whose body is the adopter's launch: {"boot": ReplicaBoot's fields, "served_name": ...,
"engine": its engine arguments}. The serving plane (knative/embedded/control/engine_pool.py) is its only
caller; the replica is in no revision's rotation until then.
"""

from __future__ import annotations

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
        boot = ReplicaBoot(**{**boot, "log_metadata_headers": tuple(boot.get("log_metadata_headers") or ()),
                              "pool": False})
        config = function_config(boot, served, engine)
    except (ValidationError, ValueError, TypeError) as exc:
        raise p.APIError(400, f"not a replica's launch: {exc}") from None
    if detect().resolve(engine) != engine_args:
        raise p.APIError(409, "This engine was built with other engine arguments: a model adopts only an engine "
                              "of its own key", code="engine_mismatch", param="engine")
    return config


class PooledReplica:
    """The replica's WSGI app: its waiting routes until adopted, then the adopter's whole app."""

    def __init__(self, config: FunctionConfig):
        self.waiting = Flask("thaw.pool")
        self.engine = start_engine(config, self.waiting)
        self.adopted: Flask | None = None
        self._adopting = threading.Lock()
        openai_error_handlers(self.waiting)
        engine = self.engine

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
            if not self._adopting.acquire(blocking=False):
                raise p.APIError(409, "Another model is adopting this engine", code="engine_not_pooled")
            try:
                if engine.state != "pooled":
                    raise p.APIError(409, f"This engine cannot be adopted: it is {engine.state}",
                                     code="engine_not_pooled")
                model_dir, timings = weights_fetcher(config)()
                result = engine.adopt(model_dir, config.served_name)
                self.adopted = create_app(config, engine)
            finally:
                self._adopting.release()
            # the adopter's phases (its weights' fetch, the adoption), not the pooled engine's start
            return jsonify({**result, "phases": {**timings, "adopt": result["seconds"]}, "engine_pid": engine.engine_pid})

    @property
    def extensions(self) -> dict:
        """What gunicorn's worker_exit reads (functions/gunicorn_conf.py): whose engine to stop."""
        return self.adopted.extensions if self.adopted is not None else {"thaw": self}

    def __call__(self, environ, start_response):
        return (self.adopted or self.waiting)(environ, start_response)
