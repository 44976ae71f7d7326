"""The gateway: HTTP, auth, and routing each request to a revision, whose activator (activator.py) takes it
from there (wake, throttle, proxy to a replica: proxy.py).

Routes
- `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/embeddings`: to the model named in the
  body's `model`. The same under `/openai/v1/` (KServe's OpenAI routes).
- `/models/<name>/...` and `/models/<name>@<tag>/...`: to that model (that tagged revision); the rest of
  the path goes to the replica as is (`/models/m/v1/chat/completions`, `/models/m/` for CloudEvents).
- `GET /v1/models`, `GET /v1/models/<id>` (and under `/openai/v1/`): every model and its state, without
  waking anything; a model's object carries KServe's v1 readiness fields too (`name`, `ready`).
- A request whose Host is `<model>.<namespace>.<platform.gateway.domain>` (KServe's InferenceService URL, or
  `<model>-predictor...`) goes to that model, whatever its body says, and its model list is that model.
- `GET /healthz`, `GET /thaw/v1/status` (what `thaw status` shows).
- The broker (`/<namespace>/<broker>`) and graphs (`/graphs/<name>`) join this app from eventing/host.py.
Errors use OpenAI's error object: 404 unknown model, 401/403 auth, and the activator's own (503 queue
full, 504 past timeoutSeconds, 502 a replica died under the request). So do the answers aiohttp itself
gives: unknown routes (404), wrong methods (405 with `Allow`), bodies over
`platform.gateway.maxBodySize` (413), bodies slower than the idle timeout (408), and requests its HTTP
parser refuses (400); graph routes answer in KServe's shape instead, the broker in its own.
With auth on, the token is checked before anything else, so no answer tells a stranger which models exist.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
from http import HTTPStatus

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from thaw.openai_wire import error_body
from thaw.http_body import read_body
from thaw.json_body import InvalidJSON, decode

from .auth import AuthError, Authenticator
from .control.plane import ServingPlane, UnknownModel
from .dataplane.openai_errors import error_response as _error
from .dataplane.proxy import LocalCall

log = logging.getLogger("thaw.gateway")

# A body up to this size is decoded on the event loop (microseconds); a larger one in a thread, so one
# client's megabytes of prompt never hold up the other streams' chunks.
DECODE_ON_LOOP = 64 << 10


def _auth_error(exc: AuthError) -> web.Response:
    return _error(exc.status, str(exc), "authentication_error" if exc.status == 401 else "permission_error")


# The routes by which the plane puts a replica to sleep and wakes it: no client reaches them through the
# gateway (a client could otherwise park a replica behind the plane's back).
REPLICA_CONTROL = frozenset({"/sleep", "/wake_up", "/is_sleeping", "/host_copy"})


def _not_found(model: str) -> web.Response:
    return _error(404, f"The model '{model}' does not exist", code="model_not_found", param="model")


def _surface_error(request: web.Request, status: int, message: str, headers: dict | None = None) -> web.Response:
    """An error aiohttp raised (routing, body size), in the shape of the surface the path belongs to."""
    if request.path.startswith("/graphs/"):
        from thaw.eventing.router import error_response

        response = error_response(status, message)
        response.headers.update(headers or {})
        return response
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return _error(status, message, kind, headers=headers)


@web.middleware
async def shaped_errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if isinstance(exc, web.HTTPMethodNotAllowed):
            message = f"{request.method} is not allowed here; use {', '.join(sorted(exc.allowed_methods))}"
            return _surface_error(request, 405, message, {"Allow": ",".join(sorted(exc.allowed_methods))})
        if isinstance(exc, web.HTTPNotFound):
            return _surface_error(request, 404, f"No route {request.path}: the OpenAI routes are under /v1/, "
                                                "a model's own under /models/<name>/")
        return _surface_error(request, exc.status, exc.text or HTTPStatus(exc.status).phrase)


class _JSONErrorHandler(RequestHandler):
    """aiohttp answers requests its HTTP parser refuses (a bad request line, a header over the size limit)
    in plain text; here they get OpenAI's error object instead."""

    def handle_error(self, request, status: int = 500, exc=None, message=None) -> web.StreamResponse:
        if status < 500:
            # The client's own malformed request: one line, no traceback, nothing of what it sent (an
            # over-long header may be a credential).
            self.logger.info("refused a malformed request from %s: %s", request.remote,
                             type(exc).__name__ if exc is not None else status)
            if request.writer.output_size > 0:
                raise ConnectionError("the answer has begun; the connection closes")
        else:
            super().handle_error(request, status, exc, message)  # logs, and refuses once the answer has begun
        text = message if status < 500 and message else HTTPStatus(status).description
        response = web.json_response(error_body(text, "invalid_request_error" if status < 500 else "server_error"),
                                     status=status)
        response.force_close()
        return response


class _JSONErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JSONErrorHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """An AppRunner whose connections are _JSONErrorHandlers (aiohttp has no setting for the class)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JSONErrorServer
        return server


def host_model(host: str | None, namespace: str, domain: str) -> str | None:
    """The model a KServe-style Host names (`<model>.<namespace>.<domain>`, or `<model>-predictor.<namespace>
    .<domain>`, any port), or None."""
    name = (host or "").rsplit(":", 1)[0].lower().removesuffix(".")
    suffix = f".{namespace}.{domain}".lower()
    if not name.endswith(suffix) or "." in name[:-len(suffix)] or not name[:-len(suffix)]:
        return None
    return name[:-len(suffix)].removesuffix("-predictor")


class Gateway:
    def __init__(self, plane: ServingPlane, auth: Authenticator, max_body_bytes: int = 32 << 20,
                 idle_timeout: float = 60, namespace: str = "default", domain: str = "example.com"):
        """`namespace` and `domain` make KServe's host-style URLs (`<model>.<namespace>.<domain>`)."""
        self.plane = plane
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.idle_timeout = idle_timeout
        self.namespace, self.domain = namespace, domain
        self.session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[shaped_errors, self.authenticate])
        for prefix in ("/v1", "/openai/v1"):  # OpenAI's paths, and KServe's for them
            app.router.add_post(prefix + "/chat/completions", self.by_body)
            app.router.add_post(prefix + "/completions", self.by_body)
            app.router.add_post(prefix + "/embeddings", self.by_body)
            app.router.add_get(prefix + "/models", self.list_models)
            app.router.add_get(prefix + "/models/{model:.+}", self.get_model)
        app.router.add_route("*", "/models/{model}/{tail:.*}", self.by_path)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/thaw/v1/status", self.status)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, app) -> None:
        # No pool limit: each request in flight holds one connection to its replica, and a limit here would queue
        # requests the activator has already let through (containerConcurrency bounds them, where it is set).
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False),
                                             auto_decompress=False)

    async def _close(self, app) -> None:
        await self.session.close()

    @web.middleware
    async def authenticate(self, request: web.Request, handler) -> web.StreamResponse:
        """The token, checked before anything else on every route of the gateway's own but /healthz (the
        broker's and the graphs' routes check it themselves, in their own shapes); what a token may reach of
        each model is checked where the model is known."""
        if getattr(handler, "__self__", None) is self and handler != self.healthz:
            try:
                self.auth.check(request.headers.get("Authorization"))
            except AuthError as exc:
                return _auth_error(exc)
        return await handler(request)

    def _host_model(self, request: web.Request) -> str | None:
        return host_model(request.headers.get("Host"), self.namespace, self.domain)

    # ---- routes ----------------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def status(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization")
        status = self.plane.status()
        allowed = self.auth.models_of(header)
        if allowed is not None:
            # A token limited to some models sees those only (their pods and weights included), as its
            # /v1/models does; the spec's refusals name any model, so they are for unlimited tokens.
            status["models"] = [m for m in status["models"] if m["name"] in allowed]
            status["spec_refused"] = []
        return web.json_response(status)

    @staticmethod
    def _card(model: dict) -> dict:
        """OpenAI's model object, with KServe's v1 readiness (`name`, `ready`: it can take a request now; at
        zero a request wakes it, as Knative's activator would) and thaw's state."""
        ready = model["ready_replicas"]
        return {"id": model["served_name"], "object": "model", "owned_by": "thaw",
                "name": model["name"], "ready": model["available"],
                "thaw": {"name": model["name"], "ready_replicas": ready,
                         "state": "ready" if ready else "scaled-to-zero", "revisions": model["revisions"]}}

    def _visible(self, request: web.Request) -> list[dict]:
        """The models this request may see: routed, allowed to its token, the Host's only where it names one."""
        header, only = request.headers.get("Authorization"), self._host_model(request)
        return [m for m in self.plane.model_states()
                if m["routed"] and self.auth.allowed(header, m["name"]) and only in (None, m["name"])]

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._card(m) for m in self._visible(request)]})

    async def get_model(self, request: web.Request) -> web.Response:
        name, only = request.match_info["model"], self._host_model(request)
        for model in self.plane.model_states():
            if model["routed"] and name in (model["name"], model["served_name"]) and only in (None, model["name"]):
                try:
                    self.auth.check(request.headers.get("Authorization"), model["name"])
                except AuthError as exc:
                    return _auth_error(exc)
                return web.json_response(self._card(model))
        return _not_found(name)

    async def by_body(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request, self.idle_timeout)
        try:
            data = decode(body) if len(body) <= DECODE_ON_LOOP else await asyncio.to_thread(decode, body)
        except InvalidJSON as exc:
            return _error(400, f"The request body is {exc.message}", param=exc.param,
                          code="invalid_json" if exc.param is None else "invalid_value")
        model = self._host_model(request) or (data.get("model") if isinstance(data, dict) else None)
        if not isinstance(model, str) or not model:
            return _error(400, "Missing required parameter: 'model'", code="missing_required_parameter",
                          param="model")
        return await self._forward(request, model, None, request.path.removeprefix("/openai"), body)

    async def by_path(self, request: web.Request) -> web.StreamResponse:
        model, _, tag = request.match_info["model"].partition("@")
        path = "/" + request.match_info["tail"]
        if posixpath.normpath(path).rstrip("/") in REPLICA_CONTROL:
            return _surface_error(request, 404, f"No route {request.path}: a replica's sleep routes are the "
                                                "serving plane's, not a client's")
        return await self._forward(request, model, tag or None, path, await read_body(request, self.idle_timeout))

    async def deliver_event(self, model: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        """An event from the broker in this process to a model's CloudEvents route (`/models/<model>/`), without
        an HTTP hop back in through this gateway: the broker has already checked what its sender may reach,
        which is what the gateway's auth check would do with the broker's own token."""
        try:
            rev = self.plane.route(model, None)
        except UnknownModel:
            response = _not_found(model)
        else:
            self.plane.record_call(rev.model.name)
            response = await rev.activator.forward(self.session, LocalCall("POST", headers), model, "/", body)
        return response.status, dict(response.headers), response.body

    # ---- to the revision's activator -------------------------------------------------------------

    async def _forward(self, request: web.Request, model: str, tag: str | None, path: str,
                       body: bytes) -> web.StreamResponse:
        try:
            rev = self.plane.route(model, tag)
            self.auth.check(request.headers.get("Authorization"), rev.model.name)
        except UnknownModel:
            return _not_found(model if tag is None else f"{model}@{tag}")
        except AuthError as exc:
            return _auth_error(exc)
        self.plane.record_call(rev.model.name)
        return await rev.activator.forward(self.session, request, model, path, body)
