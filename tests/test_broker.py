"""The local broker: Knative trigger filters and delivery rules as tables; ingress, retries, backoff,
dead letters, replies over real HTTP; durability across a SIGKILL of `thaw up`."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys

import pytest
import requests
import yaml
from aiohttp import web

from conftest import poll
from loop_servers import Upstreams
from thaw.eventing import events
from thaw.eventing.broker import Broker
from thaw.eventing.ingress import BrokerIngress
from thaw.eventing.triggers import BrokerTrigger
from thaw.durations import parse_iso_duration
from thaw.eventing.delivery import DeliveryPolicy, backoff, dead_letter_extensions, next_step, should_retry
from thaw.eventing.filters import matches
from thaw.trigger_filters import FilterInvalid, check_filters
from thaw.launch import ServerProcess, free_port

ATTRS = {"type": "dev.thaw.inference.request", "source": "/apps/chat", "id": "1", "specversion": "1.0",
         "thawmodel": "smollm2", "subject": "order-42"}


# ---- pure tables --------------------------------------------------------------------------------


@pytest.mark.parametrize("attributes, filters, expected", [
    ({}, None, True),
    ({"type": "dev.thaw.inference.request"}, None, True),
    ({"type": "dev.thaw.inference.response"}, None, False),
    ({"type": "dev.thaw.inference.request", "source": "/apps/chat"}, None, True),
    ({"type": "dev.thaw.inference.request", "source": "/other"}, None, False),
    ({"thawmodel": ""}, None, True),  # empty value: the attribute exists
    ({"missingext": ""}, None, False),
    ({"type": "ignored"}, [{"exact": {"type": "dev.thaw.inference.request"}}], True),  # filters win over filter
    (None, [{"prefix": {"type": "dev.thaw."}}], True),
    (None, [{"prefix": {"type": "dev.knative."}}], False),
    (None, [{"suffix": {"source": "/chat"}}], True),
    (None, [{"suffix": {"nosuch": "x"}}], False),
    (None, [{"exact": {"type": "dev.thaw.inference.request", "subject": "order-42"}}], True),
    (None, [{"exact": {"type": "dev.thaw.inference.request", "subject": "order-7"}}], False),
    (None, [{"any": [{"exact": {"subject": "order-7"}}, {"prefix": {"subject": "order-4"}}]}], True),
    (None, [{"all": [{"exact": {"subject": "order-42"}}, {"prefix": {"source": "/nope"}}]}], False),
    (None, [{"not": {"exact": {"thawmodel": "other"}}}], True),
    (None, [{"not": {"prefix": {"type": "dev.thaw."}}}], False),
    (None, [{"prefix": {"type": "dev."}}, {"exact": {"thawmodel": "nope"}}], False),  # the list is AND-ed
])
def test_trigger_filters(attributes, filters, expected):
    assert matches(ATTRS, attributes, filters) is expected


@pytest.mark.parametrize("filters, message", [
    ([{"cesql": "type = 'x'"}], "cesql dialect is not supported"),
    ([{"regex": {"type": "x"}}], "unknown filter dialect 'regex'"),
    ([{"exact": {"type": "a"}, "prefix": {"type": "b"}}], "exactly one key"),
    ([{"exact": {"type": ""}}], "values must not be empty"),
    ([{"any": []}], "non-empty list"),
    ([{"not": {"suffix": "x"}}], "filters[0].not.suffix"),
])
def test_malformed_filters_are_refused(filters, message):
    with pytest.raises(FilterInvalid) as err:
        check_filters(filters)
    assert message in str(err.value)


@pytest.mark.parametrize("status, retried", [
    (None, True), (500, True), (502, True), (503, True), (404, True), (408, True), (409, True), (429, True),
    (400, False), (401, False), (403, False), (413, False), (200, False), (202, False),
])
def test_what_is_retried(status, retried):
    assert should_retry(status) is retried


@pytest.mark.parametrize("policy, n, delay", [
    ("linear", 1, 0.5), ("linear", 2, 1.0), ("linear", 3, 1.5),
    ("exponential", 1, 1.0), ("exponential", 2, 2.0), ("exponential", 3, 4.0),
])
def test_backoff(policy, n, delay):
    assert backoff(DeliveryPolicy(backoff_policy=policy, backoff_delay=0.5), n) == pytest.approx(delay)


@pytest.mark.parametrize("retry, dls, status, attempts, expected", [
    (2, None, 200, 1, "done"),
    (2, None, 503, 1, "retry"),
    (2, None, 503, 2, "retry"),
    (2, None, 503, 3, "drop"),
    (2, "http://dls", 503, 3, "dead-letter"),
    (2, "http://dls", 400, 1, "dead-letter"),  # not retryable: straight to the dead-letter sink
    (0, None, None, 1, "drop"),
])
def test_next_step(retry, dls, status, attempts, expected):
    assert next_step(DeliveryPolicy(retry=retry, dead_letter=dls), status, attempts) == expected


@pytest.mark.parametrize("text, seconds", [("PT0.2S", 0.2), ("PT1M", 60), ("PT1H30M", 5400), ("P1D", 86400)])
def test_iso_durations(text, seconds):
    assert parse_iso_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5s", "", "PTXS", "-PT1S"])
def test_bad_iso_durations(text):
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_iso_duration(text)


def test_dead_letter_extensions_keep_1kib_of_the_body():
    ext = dead_letter_extensions("http://sub", 500, b"x" * 5000)
    assert ext["knativeerrordest"] == "http://sub" and ext["knativeerrorcode"] == "500"
    assert base64.b64decode(ext["knativeerrordata"]) == b"x" * 1024
    assert dead_letter_extensions("http://sub", None, b"") == {"knativeerrordest": "http://sub"}


# ---- the broker over HTTP -----------------------------------------------------------------------


@pytest.fixture
def broker_url(loop, tmp_path):
    started = []

    def start(triggers: list[BrokerTrigger], brokers=("default",), path=None) -> str:
        async def build():
            broker = Broker(path or tmp_path / "broker.db", "default", set(brokers), triggers)
            await broker.start()
            return broker

        broker = loop.run(build())
        started.append(broker)
        app = web.Application()
        BrokerIngress(broker).add_routes(app)
        url = loop.serve(app)
        start.broker = broker
        return url

    yield start
    for broker in started:
        loop.run(broker.stop())


def trigger(name: str, url: str, attributes=None, filters=None, **policy) -> BrokerTrigger:
    return BrokerTrigger(name, "default", attributes or {}, filters or [], lambda attrs, u=url: u,
                         DeliveryPolicy(**{"timeout": 10, **policy}))


def send(url: str, structured: bool = False, **attrs) -> requests.Response:
    event = events.make_event(attrs.pop("type", "com.example.order"), attrs.pop("source", "/tests"),
                              attrs.pop("data", {"n": 1}), **attrs)
    headers, body = events.to_http(event, structured=structured)
    return requests.post(url, data=body, headers=headers, timeout=10)


@pytest.mark.parametrize("structured", [False, True])
def test_ingress_accepts_and_delivers_with_arrival_time_and_ttl(broker_url, upstreams, structured):
    url = broker_url([trigger("all", upstreams.reply("s", {}, 202))])
    r = send(url + "/default/default", structured, subject="abc")
    assert r.status_code == 202
    seen = poll(lambda: upstreams.seen.get("s"), 10, what="delivery")[0]
    assert seen.headers["ce-subject"] == "abc"
    assert seen.headers["ce-knativebrokerttl"] == "255"
    assert seen.headers["ce-knativearrivaltime"].endswith("Z")
    assert seen.body == {"n": 1}


def test_ingress_errors(broker_url, upstreams):
    url = broker_url([trigger("all", upstreams.reply("s", {}))])
    missing_id = {"ce-specversion": "1.0", "ce-type": "t", "ce-source": "/s", "Content-Type": "application/json"}
    r = requests.post(url + "/default/default", data=b"{}", headers=missing_id, timeout=10)
    assert r.status_code == 400 and "id" in r.json()["error"]
    r = requests.post(url + "/default/default", data=b"{}", headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400 and "not a CloudEvent" in r.json()["error"]
    r = requests.post(url + "/default/default", data=b"{not json",
                      headers={"Content-Type": "application/cloudevents+json"}, timeout=10)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    deep = b'{"specversion": "1.0", "id": "1", "type": "t", "source": "/s", "data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = requests.post(url + "/default/default", data=deep, headers={"Content-Type": "application/cloudevents+json"},
                      timeout=10)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]
    lone = b'{"specversion": "1.0", "id": "1", "type": "t", "source": "/s\\ud800"}'
    r = requests.post(url + "/default/default", data=lone, headers={"Content-Type": "application/cloudevents+json"},
                      timeout=10)
    assert r.status_code == 400 and "'source'" in r.json()["error"]
    r = requests.post(url + "/default/default", data=b"{}", timeout=10,
                      headers={**missing_id, "ce-id": "1", "ce-source": b"/s\xff"})  # header bytes not UTF-8
    assert r.status_code == 400 and "'source'" in r.json()["error"]
    r = requests.post(url + "/default/default", data=b"[" * 100_000, headers={**missing_id, "ce-id": "1"}, timeout=10)
    assert r.status_code == 400 and "event data is nested too deeply" in r.json()["error"]
    assert send(url + "/default/nosuch").status_code == 404
    assert send(url + "/otherns/default").status_code == 404
    assert requests.get(url + "/default/default", timeout=10).status_code == 405
    assert requests.put(url + "/default/default", data=b"", timeout=10).status_code == 405
    assert "s" not in upstreams.seen  # nothing invalid was delivered


def test_filters_choose_the_subscribers(broker_url, upstreams):
    url = broker_url([
        trigger("orders", upstreams.reply("orders", {}), {"type": "com.example.order"}),
        trigger("vip", upstreams.reply("vip", {}), filters=[{"prefix": {"subject": "vip-"}}]),
    ])
    assert send(url + "/default/default", subject="vip-1").status_code == 202
    assert send(url + "/default/default", type="com.example.refund", subject="vip-2").status_code == 202
    poll(lambda: len(upstreams.seen.get("vip", [])) == 2 and upstreams.seen.get("orders"), 10, what="deliveries")
    assert [s.headers["ce-subject"] for s in upstreams.seen["orders"]] == ["vip-1"]


def test_retries_with_linear_backoff_then_success(broker_url, upstreams):
    answers = iter([503, 429, 200])

    async def flaky(request):
        return web.json_response({}, status=next(answers))

    upstreams.handlers["flaky"] = flaky
    url = broker_url([trigger("t", upstreams.url("flaky"), retry=3, backoff_policy="linear", backoff_delay=0.2)])
    assert send(url + "/default/default").status_code == 202
    calls = poll(lambda: len(upstreams.seen.get("flaky", [])) == 3 and upstreams.seen["flaky"], 10, what="three attempts")
    gaps = [b.at - a.at for a, b in zip(calls, calls[1:])]
    assert 0.18 <= gaps[0] < 1.0 and 0.38 <= gaps[1] < 1.5  # 0.2 s then 0.4 s (linear)
    poll(lambda: broker_url.broker.stats.delivered == 1, 5, what="delivered")
    assert broker_url.broker.stats.retried == 2


def test_exhausted_retries_go_to_the_dead_letter_sink(broker_url, upstreams):
    failing = upstreams.reply("failing", {"error": "model exploded"}, 500)
    url = broker_url([trigger("t", failing, retry=1, backoff_delay=0.05, dead_letter=upstreams.reply("dls", {}, 202))])
    assert send(url + "/default/default", subject="lost").status_code == 202
    dead = poll(lambda: upstreams.seen.get("dls"), 10, what="dead letter")[0]
    assert len(upstreams.seen["failing"]) == 2  # the attempt and one retry
    assert dead.headers["ce-knativeerrordest"] == failing
    assert dead.headers["ce-knativeerrorcode"] == "500"
    assert json.loads(base64.b64decode(dead.headers["ce-knativeerrordata"])) == {"error": "model exploded"}
    assert dead.headers["ce-subject"] == "lost" and dead.body == {"n": 1}


def test_no_response_is_retried_then_dead_lettered_without_a_code(broker_url, upstreams):
    gone = f"http://127.0.0.1:{free_port()}/"
    url = broker_url([trigger("t", gone, retry=2, backoff_delay=0.02, dead_letter=upstreams.reply("dls", {}, 202))])
    assert send(url + "/default/default").status_code == 202
    dead = poll(lambda: upstreams.seen.get("dls"), 10, what="dead letter")[0]
    assert dead.headers["ce-knativeerrordest"] == gone and "ce-knativeerrorcode" not in dead.headers


def test_a_400_is_not_retried(broker_url, upstreams):
    url = broker_url([trigger("t", upstreams.reply("bad", {"error": "no"}, 400), retry=5, backoff_delay=0.01)])
    assert send(url + "/default/default").status_code == 202
    poll(lambda: broker_url.broker.stats.dropped == 1, 10, what="dropped")
    assert len(upstreams.seen["bad"]) == 1


def test_a_reply_event_goes_back_into_the_broker(broker_url, upstreams):
    async def answer(request):
        reply = events.make_event("com.example.answer", "/sub", {"answer": 42})
        headers, body = events.to_http(reply)
        return web.Response(body=body, headers=headers)

    upstreams.handlers["ask"] = answer
    url = broker_url([
        trigger("ask", upstreams.url("ask"), {"type": "com.example.question"}),
        trigger("answers", upstreams.reply("answers", {}, 202), {"type": "com.example.answer"}),
    ])
    assert send(url + "/default/default", type="com.example.question").status_code == 202
    got = poll(lambda: upstreams.seen.get("answers"), 10, what="reply delivered")[0]
    assert got.body == {"answer": 42}
    assert got.headers["ce-knativebrokerttl"] == "254"


def test_a_reply_whose_trigger_left_the_spec_meanwhile_still_finishes_its_delivery(broker_url, upstreams, loop):
    """A spec reload removes the trigger while its subscriber is answering: the reply goes back into the broker the
    event came into, and the delivery ends (it raised AttributeError and stayed unfinished until a restart)."""
    import threading

    answering, release = threading.Event(), threading.Event()

    async def slow_answer(request):
        answering.set()
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
        reply = events.make_event("com.example.answer", "/sub", {"answer": 42})
        headers, body = events.to_http(reply)
        return web.Response(body=body, headers=headers)

    upstreams.handlers["ask"] = slow_answer
    url = broker_url([trigger("ask", upstreams.url("ask"), {"type": "com.example.question"}),
                      trigger("answers", upstreams.reply("answers", {}, 202), {"type": "com.example.answer"})])
    broker = broker_url.broker
    assert send(url + "/default/default", type="com.example.question").status_code == 202
    assert answering.wait(10)
    broker.triggers = [t for t in broker.triggers if t.name != "ask"]  # what a spec reload does
    release.set()
    got = poll(lambda: upstreams.seen.get("answers"), 10, what="the reply delivered")[0]
    assert got.body == {"answer": 42}
    assert poll(lambda: not loop.run(asyncio.to_thread(broker.store.pending)), 10, what="no delivery left")


def test_a_models_events_go_in_process_where_the_broker_shares_the_gateways_process(broker_url, upstreams):
    """thaw up runs the broker and the gateway in one process: an event for a model goes to the gateway's
    in-process entry (standing in here: the real one is test_serving_plane's event tests), not over HTTP to a
    gateway port (nothing listens on this one), and its answer comes back into the broker as any reply does."""
    gateway = f"http://127.0.0.1:{free_port()}"
    calls = []

    async def in_process(model, headers, body):
        calls.append((model, headers["ce-type"], json.loads(body)))
        headers, body = events.to_http(events.make_event("com.example.answer", f"/models/{model}", {"answer": 42}))
        return 200, headers, body

    url = broker_url([
        BrokerTrigger("ask", "default", {"type": "com.example.question"}, [],
                      lambda attrs: f"{gateway}/models/tiny/", DeliveryPolicy(timeout=10), lambda attrs: "tiny"),
        BrokerTrigger("graph", "default", {"type": "com.example.question"}, [],
                      lambda attrs: f"{gateway}/graphs/chain", DeliveryPolicy(timeout=10, retry=0)),
        trigger("answers", upstreams.reply("answers", {}, 202), {"type": "com.example.answer"}),
    ])
    broker = broker_url.broker
    broker.gateway_url, broker.in_process = gateway, in_process
    assert send(url + "/default/default", type="com.example.question", data={"q": 1}).status_code == 202
    got = poll(lambda: upstreams.seen.get("answers"), 10, what="the model's answer delivered")[0]
    assert got.body == {"answer": 42}
    assert calls == [("tiny", "com.example.question", {"q": 1})]  # the graph's delivery went over HTTP, and failed
    assert poll(lambda: broker.stats.dropped == 1, 10, what="the graph's delivery given up")


@pytest.fixture
def small_disk(tmpfs):
    """A real 1 MiB filesystem (tmpfs) for the broker's store."""
    return tmpfs("1m")


def test_a_full_disk_refuses_events_with_503_and_loses_none_it_accepted(broker_url, upstreams, small_disk):
    """Accepted means stored: once the store's disk is full the ingress answers 503 with Retry-After (the
    sender keeps the event), and what it accepted before is still delivered, its retries kept in memory."""
    url = broker_url([trigger("s", upstreams.reply("s", {}, 503), retry=100, backoff_delay=0.2,
                              backoff_policy="linear")], path=small_disk / "broker.db")
    accepted, refused = [], None
    for i in range(200):
        r = send(url + "/default/default", subject=f"e-{i}", data={"pad": "p" * 20_000})
        if r.status_code != 202:
            refused = r
            break
        accepted.append(f"e-{i}")
    assert refused is not None and accepted, "the disk never filled"
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
    assert "disk is full" in refused.json()["error"]
    upstreams.replies["s"] = (202, {})  # the subscriber recovers while the disk is still full
    poll(lambda: {s.headers["ce-subject"] for s in upstreams.seen.get("s", [])} >= set(accepted), 60, 0.2,
         "every accepted event delivered")


def test_on_a_full_disk_the_optimizers_warm_request_is_put_off_not_fatal(broker_url, upstreams, small_disk, loop):
    """The optimizer asks for warm-ups through the broker; a store that cannot write makes it try again at its
    next pass (warm() is False) instead of ending its loop with an exception. The disk is filled to its
    last byte before anything is written to the store's log (an event this small could otherwise fit in
    log space sqlite reuses after a checkpoint). The plane is a stand-in with the parts the backend reads;
    the broker and its store are real."""
    from types import SimpleNamespace

    from thaw.knative.embedded.control.backend import EmbeddedBackend

    url = broker_url([trigger("all", upstreams.reply("all", {}, 503), retry=100)], path=small_disk / "broker.db")
    with open(small_disk / "filler", "wb", buffering=0) as filler:
        with pytest.raises(OSError):
            while True:
                filler.write(b"\0" * 4096)
    assert send(url + "/default/default").status_code == 503
    broker = broker_url.broker
    backend = EmbeddedBackend(SimpleNamespace(models={}, calls={}, route=None,
                                              publish=lambda event: broker.publish("default", event)))
    assert loop.run(backend.warm("tiny")) is False


@pytest.mark.parametrize("moved", [False, True])
def test_accepted_events_survive_a_sigkill_of_thaw_up(tmp_path, loop, moved):
    """At least once: accepted while the subscriber is down, the broker killed, the subscriber up, the
    broker restarted: the event arrives. Where the subscriber came back at another URL (the spec edited
    meanwhile), the event goes there, as Knative's dispatcher sends to a trigger's subscriber as it is now."""
    port, sub_port = free_port(), free_port()
    spec = {"platform": {"gateway": {"port": port}, "stateDir": str(tmp_path / "state")},
            "triggers": [{"name": "keep", "filter": {"attributes": {"type": "com.example.order"}},
                          "subscriber": {"uri": f"http://127.0.0.1:{sub_port}/keep"},
                          "delivery": {"retry": 100, "backoffPolicy": "linear", "backoffDelay": "PT0.2S"}}]}
    path = tmp_path / "thaw.yaml"
    path.write_text(yaml.safe_dump(spec))

    def up() -> ServerProcess:
        server = ServerProcess([sys.executable, "-m", "thaw.cli", "up", "-f", str(path)], tmp_path / "up.log")
        server.wait_http(f"http://127.0.0.1:{port}/healthz", 60)
        return server

    server = up()
    sent = [send(f"http://127.0.0.1:{port}/default/default", subject=f"order-{i}") for i in range(5)]
    assert [r.status_code for r in sent] == [202] * 5
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(10)
    if moved:
        sub_port = free_port()
        spec["triggers"][0]["subscriber"]["uri"] = f"http://127.0.0.1:{sub_port}/keep"
        path.write_text(yaml.safe_dump(spec))
    sub = Upstreams()
    sub.replies["keep"] = (202, {})
    sub.base = loop.serve(sub.app(), sub_port)
    server = up()
    try:
        poll(lambda: len({s.headers["ce-subject"] for s in sub.seen.get("keep", [])}) == 5, 30,
             what="all five delivered after the restart")
    finally:
        server.stop()


def test_inference_events_accepted_before_a_sigterm_are_answered_after_the_restart(tmp_path, loop, tiny_model):
    """thaw up stopped (SIGTERM) with inference events accepted and on their way to a model at zero: none
    is dropped for want of the gateway the broker delivers through; each is answered after the restart."""
    port, sink_port = free_port(), free_port()
    spec = {"platform": {"gateway": {"port": port}, "stateDir": str(tmp_path / "state"),
                         "autoscaler": {"scale-to-zero-grace-period": "1s", "tick-interval": "1s"}},
            "models": [{"name": "tiny", "source": str(tiny_model), "engine": {"max_model_len": 512},
                        "standby": False}],
            "triggers": [{"name": "answers", "filter": {"attributes": {"type": events.INFERENCE_RESPONSE}},
                          "subscriber": {"uri": f"http://127.0.0.1:{sink_port}/answers"}}]}
    path = tmp_path / "thaw.yaml"
    path.write_text(yaml.safe_dump(spec))
    sink = Upstreams()
    sink.replies["answers"] = (202, {})
    sink.base = loop.serve(sink.app(), sink_port)

    def up() -> ServerProcess:
        server = ServerProcess([sys.executable, "-m", "thaw.cli", "up", "-f", str(path)], tmp_path / "up.log")
        server.wait_http(f"http://127.0.0.1:{port}/healthz", 60)
        return server

    server = up()
    sent = [send(f"http://127.0.0.1:{port}/default/default", type=events.INFERENCE_REQUEST,
                 data={"prompt": "x", "max_tokens": 1}, thawmodel="tiny") for _ in range(20)]
    assert [r.status_code for r in sent] == [202] * 20
    os.kill(server.pid, signal.SIGTERM)  # thaw up alone, as a service manager stops it
    server.proc.wait(60)
    assert "dropping event" not in (tmp_path / "up.log").read_text()
    server = up()
    try:
        poll(lambda: len({s.headers["ce-thawrequestid"] for s in sink.seen.get("answers", [])}) == 20, 120, 0.5,
             "every accepted event answered")
    finally:
        server.stop()
