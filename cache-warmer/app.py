"""The cache warmer's CloudEvents app (Flask, under gunicorn): stage a revision's weights before it scales up.

Accepts
- `dev.knative.apiserver.resource.add` / `.update` for Revisions, in Resource mode (data: the Revision)
  or Reference mode (data: apiVersion, kind, namespace, name), from the embedded plane or a real
  ApiServerSource;
- `dev.thaw.cache.warm` with data `{"model": NAME, "pin": bool}`.
Answers with Knative's reply convention: 200 and a `dev.thaw.cache.staged` or `dev.thaw.cache.failed`
event. A delete, or a Revision of no known model, gets 202 and no event. Invalid events get 400.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from thaw.eventing import events
from thaw.spec import Model, Spec, SpecError, load_spec

from .tier.commands import stage_settings
from .tier.ensure import ensure
from .tier.prewarm import read_into_page_cache
from .tier.origins import origin_for
from .tier.cache import CacheError, CacheTier

log = logging.getLogger("thaw.cache_warmer")

SOURCE = "/thaw/cache-warmer"
REVISION_NAME = re.compile(r"^(?P<model>[a-z0-9]([-a-z0-9]*[a-z0-9])?)-\d{5}$")


class BadEvent(ValueError):
    pass


def revision_source(data: dict) -> tuple[str, str | None]:
    """A Revision's name and the source of its weights (thaw's annotation; a Reference-mode event has none)."""
    metadata = data.get("metadata") if "metadata" in data else data
    return metadata["name"], (metadata.get("annotations") or {}).get("thaw.dev/source")


def model_of_revision(spec: Spec, data) -> Model | None:
    """The spec's model a Revision event is about, by its service label or its name."""
    if not isinstance(data, dict) or data.get("kind", "Revision") != "Revision":
        raise BadEvent("the event's data must be a Revision (Resource mode) or a reference to one")
    metadata = data.get("metadata") if "metadata" in data else data  # Resource mode / Reference mode
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str):
        raise BadEvent("the Revision has no metadata.name (Resource mode) or name (Reference mode)")
    service = (metadata.get("labels") or {}).get("serving.knative.dev/service")
    match = REVISION_NAME.match(metadata["name"])
    for name in filter(None, (service, match and match.group("model"))):
        for model in spec.models:
            if model.name == name:
                return model
    return None


class SpecFile:
    """The spec, re-read when its file changes (thaw up applies edits live; so does the warmer)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.mtime = None
        self.spec: Spec | None = None

    def get(self) -> Spec:
        mtime = self.path.stat().st_mtime
        if mtime != self.mtime:
            try:
                self.spec, self.mtime = load_spec(self.path), mtime
            except SpecError as exc:
                if self.spec is None:
                    raise
                log.error("keeping the previous spec: %s", exc)
        return self.spec


def create_warmer_app(spec_path: Path) -> Flask:
    app = Flask("thaw.cache_warmer")
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20  # an event is small: a larger body is a 413
    specs = SpecFile(spec_path)
    first = specs.get()
    tier = CacheTier(first.platform.cache.path, first.platform.cache.capacity_bytes)
    # revision -> the source staged for it: its later updates (status changes: replicas up and down) change
    # nothing about its weights, so they stage nothing and read nothing again
    staged: dict[str, str] = {}

    def stage(model: Model, pin: bool, cause: str) -> Response:
        spec = specs.get()
        if not model.stages_through_tier:  # served in place from its folder: at most, warm the page cache
            seconds = time.perf_counter()
            if model.cache.prewarm and Path(model.source).is_dir():
                read_into_page_cache(Path(model.source))
            return reply(events.CACHE_STAGED, model, {"key": None, "path": model.source, "staged_now": False,
                                                       "timings": {"prewarm": time.perf_counter() - seconds},
                                                       "cause": cause})
        try:
            result = ensure(tier, origin_for(model.source, spec.platform.origin.s3), pin=pin or model.cache.pin,
                            prewarm=model.cache.prewarm, settings=stage_settings(spec))
            log.info("%s: %s ready in the tier (%s)", model.name, result.key, cause)
            return reply(events.CACHE_STAGED, model, {"key": result.key, "path": str(result.path),
                                                       "staged_now": result.staged, "timings": result.timings,
                                                       "cause": cause})
        except (CacheError, OSError) as exc:
            log.error("%s: staging failed: %s", model.name, exc)
            return reply(events.CACHE_FAILED, model, {"error": str(exc), "cause": cause})

    def reply(kind: str, model: Model, data: dict) -> Response:
        event = events.make_event(kind, SOURCE, {"model": model.name, "source": model.source, **data},
                                  **{events.EXT_MODEL: model.name})
        headers, body = events.to_http(event)
        return Response(body, 200, headers)

    @app.post("/")
    def receive():
        try:
            event = events.parse_http_event(request.headers, request.get_data())
            kind, data = event.get_type(), event.get_data()
            spec = specs.get()
            if kind in (events.APISERVER_ADD, events.APISERVER_UPDATE):
                model = model_of_revision(spec, data)
                if model is None:
                    return "", 202
                revision, source = revision_source(data)
                if source and source != model.source:  # the revision's own weights, not the spec's newest
                    model = model.model_copy(update={"source": source})
                if kind == events.APISERVER_UPDATE and staged.get(revision) == model.source:
                    return "", 202
                response = stage(model, False, f"{kind.rsplit('.', 1)[1]} {event.get_subject() or ''}".strip())
                if response.headers.get("ce-type") == events.CACHE_STAGED:
                    staged[revision] = model.source
                return response
            if kind == events.APISERVER_DELETE:
                return "", 202
            if kind == events.CACHE_WARM:
                if not isinstance(data, dict) or not isinstance(data.get("model"), str):
                    raise BadEvent("dev.thaw.cache.warm needs data {\"model\": NAME}")
                try:
                    model = spec.model(data["model"])
                except KeyError:
                    raise BadEvent(f"no model {data['model']!r} in the spec") from None
                return stage(model, bool(data.get("pin")), "warm request")
            raise BadEvent(f"unsupported event type {kind!r}")
        except (events.InvalidEvent, BadEvent) as exc:
            return jsonify({"error": str(exc)}), 400

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        # unknown routes, wrong methods (with Allow), bodies over the limit: the same {"error"} as a bad event
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return jsonify({"error": exc.description or exc.name}), exc.code, headers

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "alive"})

    @app.get("/readyz")
    def readyz():
        return jsonify({"status": "ready", "versions": len(tier.keys())})

    return app
