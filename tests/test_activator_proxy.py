"""The request path in front of replicas (activator.py, proxy.py), fast: real HTTP on 127.0.0.1 to stand-in
replicas (small aiohttp servers answering as a function replica would), no vLLM. The reconciler is the one
double here: it records the moves the activator asks of it (a real one needs replica processes).
"""

from __future__ import annotations

import asyncio
import json

import pytest
import requests
from aiohttp import web

from conftest import poll
from loop_servers import LoopThread
from thaw.openai_wire import LOADING_HEADER
from thaw.knative.embedded.control.autoscaler import Autoscaler, ConcurrencyWindow, resolve_spec
from thaw.knative.embedded.control.revision import Revision
from thaw.knative.embedded.dataplane.activator import Activator
from thaw.knative.embedded.dataplane.replica import Replica, State
from thaw.knative.embedded.dataplane.throttler import Throttler
from thaw.launch import free_port
from thaw.spec import Model, Scaling


class RecordedMoves:
    """Stands in for the reconciler: records what the activator asks of it, and takes a lost or not-ready
    replica out of the activator's rotation, as the reconciler's moves do."""

    def __init__(self, throttler: Throttler):
        self.throttler = throttler
        self.moves: list[tuple[str, str | None]] = []

    def poke(self, rev) -> None:
        self.moves.append(("poke", None))

    def wake_parked(self, rev, replica) -> None:
        self.moves.append(("wake_parked", replica.id))

    def lost(self, rev, replica) -> None:
        self.moves.append(("lost", replica.id))
        self.throttler.remove_replica(replica)

    def not_ready(self, rev, replica) -> None:
        self.moves.append(("not_ready", replica.id))
        self.throttler.remove_replica(replica)


def replica_app(mode: str) -> web.Application:
    """A stand-in replica: `stream` answers 3 SSE chunks then [DONE]; `loading` is an engine still loading
    (503 with thaw's loading header); `die` sends one chunk and drops the connection; `slow` answers past
    a short timeoutSeconds; `echo` answers with the request's headers and body."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if mode == "loading":
            return web.json_response({"error": {"message": "loading"}}, status=503, headers={LOADING_HEADER: "1"})
        if mode == "slow":
            await asyncio.sleep(4)  # past the timeoutSeconds (2) of the test that uses it
        if mode == "echo":
            return web.json_response({"headers": dict(request.headers), "body": body.decode(), "path": request.path,
                                      "query": request.query_string})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(1 if mode == "die" else 3):
            await response.write(f'data: {{"n": {i}}}\n\n'.encode())
        if mode == "die":
            request.transport.abort()  # the replica's process died under the answer
            return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest.fixture
def path_under_test():
    """One revision with an activator in front, behind a small gateway route; `add(mode)` gives it a ready
    replica of that kind (or `refused`: a port nobody listens on)."""
    loop = LoopThread()
    model = Model(name="m", source="/nowhere", containerConcurrency=4, timeoutSeconds=60)
    decider = resolve_spec(model.scaling, model.containerConcurrency)
    throttler = Throttler(8, model.containerConcurrency)
    rev = Revision(name="m-00001", model=model, generation=1, autoscaler=Autoscaler.new(decider, 0, 0.0),
                   window=ConcurrencyWindow(decider.stable_window), desired=1, throttler=throttler)
    moves = RecordedMoves(throttler)
    rev.activator = Activator(rev, throttler, moves)
    session = {}

    async def forward(request: web.Request) -> web.StreamResponse:
        import aiohttp

        if "s" not in session:
            session["s"] = aiohttp.ClientSession(auto_decompress=False)
        return await rev.activator.forward(session["s"], request, "m", "/v1/completions", await request.read())

    front = web.Application()
    front.router.add_post("/v1/completions", forward)
    url = loop.serve(front)

    def add(mode: str) -> Replica:
        port = free_port() if mode == "refused" else int(loop.serve(replica_app(mode)).rsplit(":", 1)[1])
        replica = Replica(id=f"r{len(rev.replicas)}-{mode}", revision=rev.name, port=port, pid=0, via_standby=False,
                          log_path=None, state=State.READY)
        rev.replicas.append(replica)
        loop.run(_add(throttler, replica))
        return replica

    yield url + "/v1/completions", add, moves, rev
    if "s" in session:
        loop.run(session["s"].close())
    loop.close()


async def _add(throttler, replica) -> None:
    throttler.add_replica(replica)


def sse(r: requests.Response) -> list[str]:
    return [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]


def test_a_stream_passes_through_with_the_activators_headers_and_no_credentials(path_under_test):
    url, add, moves, _ = path_under_test
    add("stream")
    r = requests.post(url, json={"model": "m"}, headers={"Authorization": "Bearer secret"}, timeout=60)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    assert sse(r) == ['{"n": 0}', '{"n": 1}', '{"n": 2}', "[DONE]"]
    assert r.headers["X-Thaw-Revision"] == "m-00001" and float(r.headers["X-Thaw-Queue-Seconds"]) >= 0
    assert "X-Thaw-Cold-Start" not in r.headers  # a ready replica: a warm request


def test_the_replica_gets_the_body_path_and_query_but_never_the_clients_token(path_under_test):
    url, add, _, _ = path_under_test
    add("echo")
    r = requests.post(url + "?x=1", data=b'{"model": "m"}', headers={"Authorization": "Bearer secret",
                                                                     "Content-Type": "application/json"}, timeout=60)
    seen = r.json()
    assert seen["body"] == '{"model": "m"}' and seen["path"] == "/v1/completions" and seen["query"] == "x=1"
    assert "Authorization" not in seen["headers"]


def test_a_refused_connection_goes_to_another_replica_and_the_dead_one_is_reported(path_under_test):
    url, add, moves, _ = path_under_test
    dead = add("refused")
    add("stream")
    statuses = [requests.post(url, json={"model": "m"}, timeout=60).status_code for _ in range(4)]
    assert statuses == [200] * 4  # the client never sees the dead replica
    assert moves.moves.count(("lost", dead.id)) == 1


def test_a_replica_whose_engine_is_loading_again_hands_the_request_on(path_under_test):
    url, add, moves, _ = path_under_test
    loading = add("loading")
    add("stream")
    statuses = [requests.post(url, json={"model": "m"}, timeout=60).status_code for _ in range(4)]
    assert statuses == [200] * 4
    assert moves.moves.count(("not_ready", loading.id)) == 1


def test_a_replica_dying_mid_stream_ends_the_stream_with_an_error_chunk_and_done(path_under_test):
    url, add, _, _ = path_under_test
    add("die")
    r = requests.post(url, json={"model": "m"}, timeout=60)
    events = sse(r)
    assert r.status_code == 200 and events[0] == '{"n": 0}' and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "replica_failed" and error["type"] == "server_error"


def test_a_request_past_timeout_seconds_is_a_504_in_openais_shape(path_under_test):
    url, add, _, rev = path_under_test
    rev.model = rev.model.model_copy(update={"timeoutSeconds": 2})
    add("slow")
    r = requests.post(url, json={"model": "m"}, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


def test_only_refusing_replicas_is_a_502_after_bounded_tries(path_under_test):
    url, add, moves, _ = path_under_test
    for _ in range(3):
        add("refused")
    r = requests.post(url, json={"model": "m"}, timeout=60)
    assert r.status_code == 502 and r.json()["error"]["code"] == "replica_failed"
    assert [m for m, _ in moves.moves].count("lost") == 3  # ATTEMPTS, then it gives up


def test_a_revision_with_nothing_ready_is_woken_and_the_request_held_to_its_timeout(path_under_test):
    url, add, moves, rev = path_under_test
    rev.model = rev.model.model_copy(update={"timeoutSeconds": 2})
    # No replica: the activator pokes the reconciler to start one and holds the request until its timeout.
    r = requests.post(url, json={"model": "m"}, timeout=60)
    assert r.status_code == 504 and ("poke", None) in moves.moves
    assert r.json()["error"]["message"].startswith("No replica of 'm' could take the request within 2s")


# ---- the gateway in front (gateway.py), over the same stand-in replicas ---------------------------------

class StandInPlane:
    """Stands in for the serving plane (whose real one starts replica processes): one model, one revision."""

    def __init__(self, rev):
        self.rev = rev
        self.calls: list[str] = []

    def route(self, model: str, tag: str | None = None):
        from thaw.knative.embedded.control.plane import UnknownModel

        if model != "m" or tag is not None:
            raise UnknownModel(model)
        return self.rev

    def record_call(self, name: str) -> None:
        self.calls.append(name)

    def status(self) -> dict:
        return {"models": []}

    def model_states(self) -> list[dict]:
        return [{"name": "m", "served_name": "m", "routed": True, "ready_replicas": len(self.rev.ready),
                 "available": True, "revisions": []},
                {"name": "x", "served_name": "x", "routed": True, "ready_replicas": 0, "available": True,
                 "revisions": []}]


@pytest.fixture
def gateway(path_under_test):
    """The real gateway app (real auth: token `all` for every model, `other` for model `x` only) in front of
    the revision of `path_under_test`, with a 1 MiB body limit."""
    from thaw.knative.embedded.auth import Authenticator, Token
    from thaw.knative.embedded.gateway import Gateway, GatewayRunner

    _, add, moves, rev = path_under_test
    loop = LoopThread()
    auth = Authenticator([Token("all", None), Token("other", frozenset({"x"}))])
    gw = Gateway(StandInPlane(rev), auth, max_body_bytes=1 << 20, idle_timeout=30)
    url = loop.serve(gw.app(), runner_class=GatewayRunner)
    yield url, add, gw.plane
    loop.close()


ALL = {"Authorization": "Bearer all"}


def test_the_gateway_routes_by_the_bodys_model_and_passes_the_body_through(gateway):
    url, add, plane = gateway
    add("echo")
    body = {"model": "m", "prompt": "é" * 10}
    r = requests.post(url + "/v1/completions", json=body, headers=ALL, timeout=60)
    assert r.status_code == 200 and json.loads(r.json()["body"]) == body
    assert r.headers["X-Thaw-Revision"] == "m-00001" and plane.calls == ["m"]


def test_a_large_body_is_routed_too(gateway):
    url, add, _ = gateway
    add("echo")
    prompt = "x" * (512 << 10)  # past what the gateway decodes on its event loop: decoded in a thread
    r = requests.post(url + "/v1/completions", json={"model": "m", "prompt": prompt}, headers=ALL, timeout=60)
    assert r.status_code == 200 and json.loads(r.json()["body"])["prompt"] == prompt


@pytest.mark.parametrize("data, status, code", [
    (b'{"model": "nope", "prompt": "x"}', 404, "model_not_found"),
    (b'{"prompt": "x"}', 400, "missing_required_parameter"),
    (b'{"model": "m", "prompt": ', 400, "invalid_json"),
    (b'{"model": "m", "prompt": "\\ud800"}', 400, "invalid_value"),
    (b'{"model": "m", "prompt": "' + b"x" * (1 << 20) + b'"}', 413, None),
])
def test_the_gateway_answers_bad_requests_in_openais_shape_without_reaching_a_replica(gateway, data, status, code):
    url, add, plane = gateway
    add("echo")
    r = requests.post(url + "/v1/completions", data=data, headers={**ALL, "Content-Type": "application/json"},
                      timeout=60)
    assert r.status_code == status and "message" in r.json()["error"]
    assert r.json()["error"]["code"] == code and plane.calls == []


def test_the_gateway_checks_the_token_before_anything_else(gateway):
    url, add, plane = gateway
    add("echo")
    assert requests.post(url + "/v1/completions", json={"model": "nope"}, timeout=60).status_code == 401
    r = requests.post(url + "/v1/completions", json={"model": "m"}, headers={"Authorization": "Bearer other"},
                      timeout=60)
    assert r.status_code == 403 and plane.calls == []
    # a replica's sleep routes are the plane's: no client reaches them, whatever its token
    assert requests.post(url + "/models/m/sleep", headers=ALL, timeout=60).status_code == 404


@pytest.mark.parametrize("path, replica_path", [
    ("/openai/v1/chat/completions", "/v1/chat/completions"),  # KServe's OpenAI routes
    ("/openai/v1/completions", "/v1/completions"),
    ("/openai/v1/embeddings", "/v1/embeddings"),
    ("/v1/embeddings", "/v1/embeddings"),
])
def test_kserves_openai_paths_reach_the_replica_as_openais(gateway, path, replica_path):
    url, add, plane = gateway
    add("echo")
    r = requests.post(url + path, json={"model": "m", "input": "x"}, headers=ALL, timeout=60)
    assert r.status_code == 200 and r.json()["path"] == replica_path and plane.calls == ["m"]


@pytest.mark.parametrize("host, status", [
    ("m.default.example.com", 200),  # KServe's InferenceService URL: the Host names the model
    ("m-predictor.default.example.com:8080", 200),
    ("M.default.example.com.", 200),
    ("m.other.example.com", 404),  # another namespace: not a model here, so the body's model decides
    ("nope.default.example.com", 404),
])
def test_a_kserve_host_names_the_model(gateway, host, status):
    url, add, plane = gateway
    add("echo")
    r = requests.post(url + "/openai/v1/completions", json={"model": "nope", "prompt": "x"},
                      headers={**ALL, "Host": host}, timeout=60)
    assert r.status_code == status, r.text
    models = requests.get(url + "/openai/v1/models", headers={**ALL, "Host": host}, timeout=60).json()["data"]
    assert [m["id"] for m in models] == (["m"] if status == 200 else ["m", "x"] if "other" in host else [])


def test_a_models_object_carries_kserves_v1_readiness_and_the_tokens_limits(gateway):
    url, add, _ = gateway
    add("echo")
    card = requests.get(url + "/v1/models/m", headers=ALL, timeout=60).json()
    assert card["id"] == "m" and card["object"] == "model" and card["name"] == "m" and card["ready"] is True
    assert requests.get(url + "/v1/models/m", timeout=60).status_code == 401
    other = {"Authorization": "Bearer other"}
    assert requests.get(url + "/v1/models/m", headers=other, timeout=60).status_code == 403
    assert [m["id"] for m in requests.get(url + "/v1/models", headers=other, timeout=60).json()["data"]] == ["x"]
    assert requests.get(url + "/v1/models/none", headers=ALL, timeout=60).status_code == 404


def test_each_request_counts_once_for_the_rps_metric_retries_too(path_under_test):
    url, add, _, rev = path_under_test
    rev.autoscaler.update(resolve_spec(Scaling(metric="rps"), rev.model.containerConcurrency))
    add("refused")  # a request that meets the dead replica first is tried again, and still counts once
    add("stream")
    assert [requests.post(url, json={"model": "m"}, timeout=60).status_code for _ in range(5)] == [200] * 5
    assert rev.sample() == 5 and rev.sample() == 0  # what arrived since the last sample
    rev.autoscaler.update(resolve_spec(Scaling(), rev.model.containerConcurrency))
    # the proxy lets go of a request just after its client has the last byte
    poll(lambda: rev.concurrency == 0, 30, what="the finished requests leaving the in-flight count")
    assert (rev.sample(), rev.sample(poke=True)) == (0, 1)  # concurrency: none now, the poking request
