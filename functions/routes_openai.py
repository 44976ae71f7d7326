"""The OpenAI routes: completions and chat completions (streamed or whole), embeddings, and the model list."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from thaw.json_body import InvalidJSON, decode

from . import protocol as p
from .service import FunctionService
from .serving import stream_bytes


def json_body() -> Any:
    if request.mimetype != "application/json":
        raise p.APIError(415, f"Content-Type must be application/json, got '{request.mimetype or 'none'}'",
                         code="unsupported_media_type")
    try:
        return decode(request.get_data())
    except InvalidJSON as exc:
        raise p.APIError(400, f"The request body is {exc.message}", param=exc.param,
                         code="invalid_json" if exc.param is None else "invalid_value") from None


def openai_routes(service: FunctionService) -> Blueprint:
    routes = Blueprint("openai", __name__)
    config, engine = service.config, service.engine

    def generate(kind: type):
        admitted = service.start(kind, json_body())
        req, gen, environ = admitted.req, admitted.gen, request.environ
        if not req.stream:
            return jsonify(service.complete(admitted, environ))
        takes = service.first_take(admitted, environ)
        encoder = p.ChunkEncoder(isinstance(req, p.ChatCompletionRequest), gen.request_id, p.now(),
                                 config.served_name, req.include_usage)
        return Response(stream_bytes(encoder, gen.choices, takes, admitted.prompt_tokens),
                        mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    routes.add_url_rule("/v1/chat/completions", "chat", lambda: generate(p.ChatCompletionRequest), methods=["POST"])
    routes.add_url_rule("/v1/completions", "completions", lambda: generate(p.CompletionRequest), methods=["POST"])

    @routes.post("/v1/embeddings")
    def embeddings():
        return jsonify(service.embed(json_body()))

    def model_card() -> dict:
        return {"id": config.served_name, "object": "model", "created": service.created, "owned_by": "thaw",
                "root": config.source or str(config.model_dir), "max_model_len": engine.max_model_len or None}

    @routes.get("/v1/models")
    def list_models():
        return jsonify({"object": "list", "data": [model_card()]})

    @routes.get("/v1/models/<path:model_id>")
    def get_model(model_id: str):
        if model_id != config.served_name:
            raise p.model_not_found(model_id)
        return jsonify(model_card())

    return routes
