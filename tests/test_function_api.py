"""The function's OpenAI routes, probes and metrics, on real vLLM (tiny model) under real gunicorn."""

from __future__ import annotations

import json
import socket
import threading
import time

import openai
import pytest
import requests


PROMPT = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def client(function):
    return openai.OpenAI(base_url=function.url + "/v1", api_key="unused", max_retries=0)


def test_probes_before_and_after_the_engine_is_up(function):
    assert function.startup["healthz"] == 200
    assert function.startup["readyz_status"] == 503
    assert function.startup["readyz_body"]["status"] == "loading"
    ready = requests.get(function.url + "/readyz", timeout=5)
    assert ready.status_code == 200
    phases = ready.json()["phases"]
    assert {"imports", "weights", "engine_init", "warmup"} <= set(phases)


def test_streamed_and_whole_answers_are_equal_at_temperature_zero(client, function):
    whole = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=24, temperature=0,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == streamed
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    assert abs(whole.created - time.time()) < 60
    assert whole.usage.completion_tokens == 24 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 24


def test_completions_equal_streamed_and_whole(client):
    whole = client.completions.create(model="tiny", prompt="Once upon", max_tokens=16, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon", max_tokens=16, temperature=0, stream=True))
    assert whole.choices[0].text == streamed
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 16


def test_two_choices(client):
    out = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=8, n=2, temperature=0.9, seed=1)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == sum(
        8 if c.finish_reason == "length" else 1 for c in out.choices) or out.usage.completion_tokens <= 16
    streamed = list(client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=8, n=2,
                                                   temperature=0.9, stream=True))
    finished = [c.choices[0].index for c in streamed if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_prompt_list_gives_choices_per_prompt(client):
    out = client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=4, n=2, temperature=1)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]


def test_include_usage_final_chunk(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert last.usage.total_tokens == last.usage.prompt_tokens + 10


def test_logprobs(client):
    out = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    # at temperature 0 the chosen token is the most likely one
    assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-4 for t in content)
    comp = client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0, logprobs=1)
    assert len(comp.choices[0].logprobs.token_logprobs) == 3


def test_stop_and_seed(client):
    a = client.completions.create(model="tiny", prompt="x", max_tokens=12, temperature=1, seed=7)
    b = client.completions.create(model="tiny", prompt="x", max_tokens=12, temperature=1, seed=7)
    assert a.choices[0].text == b.choices[0].text
    text = a.choices[0].text
    stop = next((ch for ch in text[2:] if ch.strip()), None)
    if stop is not None:
        c = client.completions.create(model="tiny", prompt="x", max_tokens=12, temperature=1, seed=7, stop=[stop])
        assert stop not in c.choices[0].text and c.choices[0].finish_reason == "stop"


def test_models_routes(function):
    models = requests.get(function.url + "/v1/models", timeout=5).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert requests.get(function.url + "/v1/models/tiny", timeout=5).json()["max_model_len"] == 512
    missing = requests.get(function.url + "/v1/models/nope", timeout=5)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


LONG_PROMPT = "word " * 700  # far over max_model_len 512 with the byte-level tokenizer
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]

BAD_INPUTS = [
    # (route, raw body or JSON, content type, status, param, code)
    (CHAT, b"{not json", "application/json", 400, None, "invalid_json"),
    (CHAT, {"model": "tiny", "messages": MSG}, "text/plain", 415, None, "unsupported_media_type"),
    (CHAT, [1, 2], "application/json", 400, None, None),
    (CHAT, {"model": "tiny"}, "application/json", 400, "messages", "missing_required_parameter"),
    (CHAT, {"messages": MSG}, "application/json", 400, "model", "missing_required_parameter"),
    (CHAT, {"model": "tiny", "messages": "hi"}, "application/json", 400, "messages", "invalid_value"),
    (CHAT, {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "application/json", 400,
     "messages[0].role", "invalid_value"),
    (CHAT, {"model": "tiny", "messages": MSG, "max_tokens": -1}, "application/json", 400, "max_tokens", "invalid_value"),
    (CHAT, {"model": "tiny", "messages": MSG, "max_tokens": "5"}, "application/json", 400, "max_tokens", "invalid_value"),
    (CHAT, {"model": "tiny", "messages": MSG, "n": 0}, "application/json", 400, "n", "invalid_value"),
    (CHAT, {"model": "tiny", "messages": MSG, "temperature": -0.5}, "application/json", 400, "temperature", "invalid_value"),
    (CHAT, {"model": "tiny", "messages": MSG, "top_p": 0}, "application/json", 400, "top_p", "invalid_value"),
    (CHAT, {"model": "tiny", "messages": MSG, "stream_options": {"include_usage": True}}, "application/json", 400,
     None, "invalid_value"),
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": LONG_PROMPT}]}, "application/json", 400,
     None, "context_length_exceeded"),
    (CHAT, {"model": "tiny", "messages": MSG, "max_tokens": 600}, "application/json", 400, "max_tokens",
     "context_length_exceeded"),
    (CHAT, {"model": "other", "messages": MSG}, "application/json", 404, "model", "model_not_found"),
    (COMP, {"model": "tiny"}, "application/json", 400, "prompt", "missing_required_parameter"),
    (COMP, {"model": "tiny", "prompt": []}, "application/json", 400, None, "invalid_value"),
    (COMP, {"model": "tiny", "prompt": [10**9]}, "application/json", 400, "prompt", None),
    (COMP, {"model": "tiny", "prompt": "x", "logprobs": 50}, "application/json", 400, "logprobs", "invalid_value"),
    (COMP, {"model": "tiny", "prompt": LONG_PROMPT}, "application/json", 400, None, "context_length_exceeded"),
    # bodies that break parsers: a nest deep enough to exhaust recursion, bytes that are not UTF-8, a lone
    # surrogate escape (valid JSON, not text)
    (CHAT, b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json", 400,
     None, "invalid_json"),
    (CHAT, b'{"model": "tiny\xff", "messages": []}', "application/json", 400, None, "invalid_json"),
    (CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udc80"}]}', "application/json", 400,
     "messages[0].content", "invalid_value"),
    (COMP, b'{"model": "tiny", "prompt": ["ok", "\\ud800"]}', "application/json", 400, "prompt[1]", "invalid_value"),
    # nothing is dropped unseen: unknown fields and fields this server does not implement are refused
    (CHAT, {"model": "tiny", "messages": MSG, "top_kk": 1}, "application/json", 400, "top_kk", "unknown_parameter"),
    (CHAT, {"model": "tiny", "messages": [{**MSG[0], "tool_calls": []}]}, "application/json", 400,
     "messages[0].tool_calls", "unknown_parameter"),
    (CHAT, {"model": "tiny", "messages": MSG, "tools": [{"type": "function"}]}, "application/json", 400, "tools",
     "unsupported_parameter"),
    (CHAT, {"model": "tiny", "messages": MSG, "top_k": -2}, "application/json", 400, "top_k", "invalid_value"),
    (COMP, {"model": "tiny", "prompt": "x", "min_p": 1.5}, "application/json", 400, "min_p", "invalid_value"),
    (COMP, {"model": "tiny", "prompt": "x", "repetition_penalty": 0}, "application/json", 400, "repetition_penalty",
     "invalid_value"),
    # values vLLM's engine would fail on mid-step (a seed past 64 bits took the whole engine down), or refuses
    (CHAT, {"model": "tiny", "messages": MSG, "seed": 2**64}, "application/json", 400, "seed", "invalid_value"),
    (COMP, {"model": "tiny", "prompt": "x", "seed": -2**63 - 1}, "application/json", 400, "seed", "invalid_value"),
    (CHAT, {"model": "tiny", "messages": MSG, "stop_token_ids": [10**9]}, "application/json", 400, "stop_token_ids",
     None),
    # a prompt far past max_model_len is refused by its size in bytes, without tokenizing 10 MB
    (COMP, {"model": "tiny", "prompt": "x" * 10_000_000}, "application/json", 400, "prompt", "context_length_exceeded"),
]


@pytest.mark.parametrize("route,body,content_type,status,param,code", BAD_INPUTS)
def test_bad_input_gets_openai_error(function, route, body, content_type, status, param, code):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = requests.post(function.url + route, data=data, headers={"Content-Type": content_type}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == ("invalid_request_error")
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    # a bad request fails alone: the engine still serves
    assert requests.get(function.url + "/readyz", timeout=10).status_code == 200


def test_context_length_message_names_both_lengths(function):
    r = requests.post(function.url + COMP, json={"model": "tiny", "prompt": LONG_PROMPT}, timeout=30)
    message = r.json()["error"]["message"]
    assert "512" in message and str(len(LONG_PROMPT.encode()) + 0) in message


def test_unknown_route_method_and_size(function):
    r = requests.get(function.url + "/v2/nothing", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = requests.get(function.url + CHAT, timeout=5)
    assert r.status_code == 405 and set(r.headers["Allow"].split(", ")) == {"OPTIONS", "POST"} and "error" in r.json()
    r = requests.post(function.url + CHAT, data=b"x" * (33 << 20), headers={"Content-Type": "application/json"},
                      timeout=60)  # the default --max-body-size is 32Mi
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("request_bytes,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n", 400),
    (b"GET /v1/models?q=" + b"x" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),  # gunicorn's line limit
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(120)) + b"\r\n", 431),
])
def test_what_gunicorn_refuses_gets_openai_errors(function, request_bytes, status):
    """gunicorn's parser answers these itself; on a cluster Knative's queue-proxy passes a long URL or many
    headers on to it. The answer is OpenAI's error object, not gunicorn's HTML page."""
    with socket.create_connection(("127.0.0.1", function.port), timeout=10) as sock:
        sock.sendall(request_bytes)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split()[1] == str(status).encode() and b"application/json" in head, head
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


def test_null_fields_are_not_asked_for(function):
    r = requests.post(function.url + CHAT, timeout=60, json={"model": "tiny", "messages": [{**MSG[0], "refusal": None}],
                                                             "tools": None, "max_tokens": 2, "user": "u-1"})
    assert r.status_code == 200, r.text


def test_vllm_sampling_extras_reach_the_engine(client):
    def text(temperature: float = 0, seed: int | None = None, stop: list[str] | None = None, **extra) -> str:
        return client.completions.create(model="tiny", prompt="The", max_tokens=24, temperature=temperature,
                                         seed=seed, stop=stop, extra_body={"ignore_eos": True, **extra}).choices[0].text

    greedy = text()
    # top_k 1 and min_p 1 leave only the most likely token: sampling at temperature 1 is then greedy
    assert {text(temperature=1.0, top_k=1, seed=s) for s in range(3)} == {greedy}
    assert {text(temperature=1.0, min_p=1.0, seed=s) for s in range(3)} == {greedy}
    assert text(repetition_penalty=2.0) != greedy
    stop = greedy[5:8]
    assert text(stop=[stop]) == greedy[:greedy.index(stop)]
    assert text(stop=[stop], include_stop_str_in_output=True) == greedy[:greedy.index(stop) + len(stop)]


def test_a_huge_prompt_does_not_hold_up_other_requests(function):
    refused = {}

    def huge():
        started = time.monotonic()
        r = requests.post(function.url + COMP, json={"model": "tiny", "prompt": "y" * 20_000_000}, timeout=60)
        refused.update(status=r.status_code, seconds=time.monotonic() - started)

    thread = threading.Thread(target=huge)
    thread.start()
    r = requests.post(function.url + COMP, json={"model": "tiny", "prompt": "hello", "max_tokens": 2}, timeout=30)
    thread.join(60)
    assert r.status_code == 200 and refused["status"] == 400
    assert refused["seconds"] < 10  # tokenizing 20 MB would take tens of seconds here


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=-3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=PROMPT)


def test_concurrent_requests_batch_and_all_succeed(client):
    results = []

    def ask(i):
        out = client.completions.create(model="tiny", prompt=f"p{i}", max_tokens=32, temperature=0)
        results.append(out.usage.completion_tokens)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 12 and all(n >= 1 for n in results)


def test_metrics(function):
    text = requests.get(function.url + "/metrics", timeout=5).text
    assert 'thaw_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'thaw_requests_total{route="/v1/chat/completions",status="400"}' in text
    assert "thaw_time_to_first_token_seconds_count" in text
    assert function.metric("thaw_generated_tokens_total") > 0
    for phase in ("process_start", "imports", "weights", "engine_init", "warmup"):
        assert f'thaw_start_phase_seconds{{phase="{phase}"}}' in text
    # vLLM's own metrics, by vLLM's names and labels, for the dashboards and autoscalers that read them
    assert function.metric('vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny"}') > 0
    assert function.metric('vllm:generation_tokens_total{engine="0",model_name="tiny"}') > 0
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:e2e_request_latency_seconds_count"):
        assert f'{name}{{engine="0",model_name="tiny"}}' in text
