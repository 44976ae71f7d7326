"""The replica's own routes: probes, metrics, and vLLM's sleep-mode routes the serving plane drives."""

from __future__ import annotations

import json
import os

from flask import Blueprint, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from thaw.vllm_platform import gpu_memory

from . import protocol as p
from .service import FunctionService


def _gpu_held() -> dict | None:
    """This replica's GPU memory (its own processes') and the card's, in bytes; None without a GPU."""
    memory = gpu_memory()
    if memory is None:
        return None
    return {"held": memory.held_by(os.getpid()), "free": memory.free, "total": memory.total}


def engine_routes(service: FunctionService) -> Blueprint:
    routes = Blueprint("engine", __name__)
    engine, metrics = service.engine, service.metrics

    @routes.get("/healthz")
    def healthz():
        if engine.state == "failed":
            return jsonify({"status": "failed", "error": engine.error}), 500
        return jsonify({"status": "alive"})

    @routes.get("/readyz")
    def readyz():
        status = 200 if engine.state == "ready" else 503
        body = {"status": engine.state, "error": engine.error, "phases": engine.phases, "marks": engine.marks}
        if engine.state == "ready" and engine.engine_pid:
            body["engine_pid"] = engine.engine_pid  # the plane watches it: its death is the replica's
        return Response(json.dumps(body), status, mimetype="application/json")  # keeps the phases in order

    # vLLM's own routes for its sleep mode (its server has them in dev mode), used by the serving plane to put
    # an idle replica to sleep (level 1: keeping its host copy, so parked once that is built; level 2: without
    # it, hibernated; on a sleeping engine: drop the copy) and wake it for the next request; and thaw's host
    # copy of the weights, which the plane asks a replica to build or drop (parking.py decides who holds one).
    @routes.post("/sleep")
    def sleep():
        level = request.args.get("level", "1")
        if not level.isdigit():
            raise p.APIError(400, f"level must be 1 or 2, got {level!r}", param="level")
        seconds = engine.park(int(level))
        return jsonify({"is_sleeping": True, "level": engine.sleep_level, "seconds": seconds, "gpu": _gpu_held(),
                        "host_copy": engine.host_copy})

    @routes.post("/wake_up")
    def wake_up():
        woken = engine.wake()
        return jsonify({"is_sleeping": False, **woken, "gpu": _gpu_held()})

    @routes.post("/host_copy")
    def build_host_copy():
        return jsonify({"bytes": engine.build_host_copy(), "level": engine.sleep_level})

    @routes.delete("/host_copy")
    def drop_host_copy():
        return jsonify({"released": engine.drop_host_copy(), "level": engine.sleep_level})

    @routes.get("/is_sleeping")
    def is_sleeping():
        return jsonify({"is_sleeping": engine.state == "parked", "level": engine.sleep_level,
                        "host_copy": engine.host_copy})

    @routes.get("/metrics")
    def metrics_route():
        for phase, seconds in engine.phases.items():
            metrics.start_phase.labels(phase).set(seconds)
        metrics.engine_requests.set(engine.active_requests())
        metrics.parked.set(engine.state == "parked")
        # vLLM's own metrics (its stat logger registers them in prometheus_client's global registry) after thaw's;
        # an adopted engine's stat logger still says the name it was built with (functions/pool.py)
        vllm_metrics = generate_latest(REGISTRY)
        if engine.metrics_name and engine.served_name != engine.metrics_name:
            vllm_metrics = vllm_metrics.replace(f'model_name="{engine.metrics_name}"'.encode(),
                                                f'model_name="{engine.served_name}"'.encode())
        return Response(generate_latest(metrics.registry) + vllm_metrics, mimetype=CONTENT_TYPE_LATEST)

    return routes
