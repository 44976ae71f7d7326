"""Payload logging as CloudEvents (KServe's logger): a real function logging to a real CloudEvents sink on
loopback, parsed with the cloudevents SDK. A request and its response share one id and KServe's types and
attributes; a stream is logged once whole; nothing a request sends as a credential is logged; a dead sink
costs the request nothing and is counted."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from conftest import poll, start_function
from event_sink import EventSink
from thaw.functions.payload_log import assemble_stream

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


class Sink(EventSink):
    def of(self, log_id: str) -> list:
        return [e for e in self.events if e.get_id() == log_id]


@pytest.fixture(scope="module")
def sink():
    s = Sink()
    yield s
    s.close()


@pytest.fixture(scope="module")
def logged(tiny_model, sink, tmp_path_factory):
    flags = ["--log-url", sink.url, "--log-mode", "all", "--log-service", "tiny", "--log-namespace", "team-a",
             "--log-max-body", "2Ki", "--log-metadata-header", "X-Tenant", "--log-metadata-header", "Authorization"]
    running = start_function(tiny_model, tmp_path_factory.mktemp("logs"), flags=flags)
    yield running
    running.server.stop()


def pair(sink: Sink, log_id: str) -> tuple:
    found = poll(lambda: (lambda es: es if len(es) == 2 else None)(sink.of(log_id)), 30, 0.05, "both events")
    request = next(e for e in found if e.get_type() == "org.kubeflow.serving.inference.request")
    response = next(e for e in found if e.get_type() == "org.kubeflow.serving.inference.response")
    return request, response


def test_a_request_and_its_response_share_an_id_with_kserves_attributes(logged, sink):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 4, "temperature": 0}
    r = requests.post(logged.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Ce-Id": "req-1", "X-Tenant": "acme", "Authorization": "Bearer s3cr3t"})
    assert r.status_code == 200
    request, response = pair(sink, "req-1")
    assert request.get_data() == body  # the SDK decodes JSON data
    assert response.get_data() == r.json()
    for event in (request, response):
        assert event.get_extension("inferenceservicename") == "tiny"
        assert event.get_extension("namespace") == "team-a" and event.get_extension("component") == "predictor"
        assert event.get_extension("endpoint") == "default" and event.get_extension("recordedtime")
    assert json.loads(request.get_extension("metadata")) == {"X-Tenant": "acme"}  # named, and no credential
    everything = " ".join(json.dumps(dict(h)) + str(e.get_data()) + str(e.get_attributes()) for e, h in sink.received)
    assert "s3cr3t" not in everything


def test_a_stream_is_logged_once_whole(logged, sink):
    client = openai.OpenAI(base_url=logged.url + "/v1", api_key="none", max_retries=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_headers={"Ce-Id": "stream-1"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    _, response = pair(sink, "stream-1")
    whole = response.get_data()
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["content"] == text
    assert whole["usage"]["completion_tokens"] == 12 and whole["id"] == chunks[0].id


def test_embeddings_and_completions_are_logged_and_an_id_is_made_when_none_is_sent(logged, sink):
    before = len(sink.received)
    r = requests.post(logged.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                      timeout=60)
    assert r.status_code == 200
    poll(lambda: len(sink.received) >= before + 2, 30, 0.05, "two events")
    ids = {e.get_id() for e, _ in sink.received[before:]}
    assert len(ids) == 1 and ids != {""}


def test_a_body_past_the_limit_is_cut_and_says_its_size(logged, sink):
    prompt = "x" * 5000
    requests.post(logged.url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1},
                  headers={"Ce-Id": "big-1"}, timeout=60)
    request, _ = pair(sink, "big-1")
    size = len(json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 1}))
    assert request.get_extension("thawtruncated") == str(size)
    assert len(request.get_data()) == 2048 and request.get_datacontenttype().startswith("text/plain")


def test_a_sink_that_never_answers_costs_the_request_nothing_and_is_counted(tiny_model, tmp_path):
    """The sink accepts connections and never answers: each send waits out its 10 s timeout, three times. The
    request is answered while the logger still waits (nothing counted yet); then its event counts as failed."""
    import socket

    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(16)
    running = start_function(tiny_model, tmp_path, flags=["--log-url", f"http://127.0.0.1:{hang.getsockname()[1]}/"])

    def outcome(name: str) -> float:
        text = requests.get(running.url + "/metrics", timeout=10).text
        line = next((l for l in text.splitlines()
                     if l.startswith(f'thaw_payload_log_events_total{{outcome="{name}"}}')), None)
        return float(line.split()[1]) if line else 0.0

    try:
        r = requests.post(running.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                          timeout=60)
        assert r.status_code == 200
        assert outcome("failed") == 0  # answered while the logger still waits on its first send
        poll(lambda: outcome("failed") >= 1, 180, 0.5, "the request's event counted as failed")
        assert outcome("sent") == 0
    finally:
        running.server.stop()
        hang.close()


@pytest.mark.parametrize("chunks, expected", [
    ([b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
      b'"delta":{"role":"assistant","content":""}}]}\n\n',
      b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
      b'"delta":{"content":"Par"}}]}\n\ndata: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
      b'"choices":[{"index":0,"delta":{"content":"is"},"finish_reason":"stop"}]}\n\n',
      b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
      b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\ndata: [DONE]\n\n'],
     {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [
         {"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}],
      "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}),
    ([b'data: {"id":"t","object":"text_completion","created":1,"model":"m","choices":[{"index":1,"text":"b",'
      b'"finish_reason":"length"},{"index":0,"text":"a","finish_reason":"length"}]}\n\ndata: [DONE]\n\n'],
     {"id": "t", "object": "text_completion", "created": 1, "model": "m", "choices": [
         {"index": 0, "text": "a", "finish_reason": "length"}, {"index": 1, "text": "b", "finish_reason": "length"}],
      "usage": None}),
    ([b'data: {"error": {"message": "boom"}}\n\ndata: [DONE]\n\n'], {"error": {"message": "boom"}}),
    ([b"not sse"], None),
])
def test_a_stream_is_assembled_from_its_chunks(chunks, expected):
    assert assemble_stream(chunks) == expected
