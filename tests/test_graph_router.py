"""The inference-graph router over real HTTP: KServe's router scenarios (cmd/router/main_test.go) ported,
plus validation, streaming through, CloudEvents in and out, and the standalone `thaw router`."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
import textwrap

import aiohttp
import pytest
import requests
from aiohttp import web

from thaw.eventing import events
from thaw.graph_spec import GraphInvalid, parse_graph
from thaw.eventing.router import GraphRouter, header_patterns, router_app
from conftest import thaw_cli
from thaw.launch import ServerProcess, free_port


NO_MATCH_BODY = {"error": "Failed to process request",
                 "cause": "None of the routes matched with the switch condition"}


@pytest.fixture
def graph_url(loop):
    """Serve a graph spec with a real GraphRouter; returns its URL."""
    begun, sessions = [], []

    def serve(spec: dict, patterns: str = "", name: str = "g", models_url: str | None = None) -> str:
        async def build():
            session = aiohttp.ClientSession()
            sessions.append(session)
            return GraphRouter(name, parse_graph(name, spec), session, patterns=header_patterns(patterns),
                               models_url=models_url, on_begin=begun.append)

        router = loop.run(build())
        return loop.serve(router_app(router))

    serve.begun = begun
    yield serve

    async def close():
        for session in sessions:
            await session.close()

    loop.run(close())


def post(url: str, body, headers: dict | None = None) -> requests.Response:
    return requests.post(url, json=body, headers=headers or {}, timeout=30)


def test_chained_models_with_map_predictions_to_instances(upstreams, graph_url):  # TestSimpleModelChainer
    # the flag maps the predictions of what comes before the step (here the graph's input) to its instances
    spec = {"nodes": {"root": {"routerType": "Sequence", "steps": [
        {"name": "model1", "serviceUrl": upstreams.reply("m1", {"predictions": "1"}), "mapPredictionsToInstances": True},
        {"name": "model2", "serviceUrl": upstreams.reply("m2", {"predictions": "2"}), "data": "$response"},
    ]}}}
    r = post(graph_url(spec), {"predictions": ["test", "test2"]})
    assert r.status_code == 200 and r.json() == {"predictions": "2"}
    assert upstreams.seen["m1"][0].body == {"instances": ["test", "test2"]}
    assert upstreams.seen["m2"][0].body == {"predictions": "1"}  # model2 does not set the flag


def test_map_predictions_to_instances_on_a_response_step(upstreams, graph_url):
    spec = {"nodes": {"root": {"routerType": "Sequence", "steps": [
        {"serviceUrl": upstreams.reply("m1", {"predictions": ["a", "b"], "model_name": "m1"})},
        {"serviceUrl": upstreams.reply("m2", {"predictions": "2"}), "data": "$response",
         "mapPredictionsToInstances": True},
    ]}}}
    assert post(graph_url(spec), {"instances": [1]}).status_code == 200
    assert upstreams.seen["m2"][0].body == {"instances": ["a", "b"], "model_name": "m1"}


def test_sequence_without_response_data_sends_the_request_to_every_step(upstreams, graph_url):
    spec = {"nodes": {"root": {"routerType": "Sequence", "steps": [
        {"serviceUrl": upstreams.reply("m1", {"predictions": 1})},
        {"serviceUrl": upstreams.reply("m2", {"predictions": 2})},
    ]}}}
    assert post(graph_url(spec), {"instances": [1]}).json() == {"predictions": 2}
    assert upstreams.seen["m2"][0].body == {"instances": [1]}


def test_ensemble_merges_by_step_name_or_index(upstreams, graph_url):
    spec = {"nodes": {"root": {"routerType": "Ensemble", "steps": [
        {"name": "model1", "serviceUrl": upstreams.reply("m1", {"predictions": "1"})},
        {"serviceUrl": upstreams.reply("m2", {"predictions": "2"})},
    ]}}}
    r = post(graph_url(spec), {"instances": ["x"]})
    assert r.status_code == 200
    assert r.json() == {"model1": {"predictions": "1"}, "1": {"predictions": "2"}}


def _animal_graph(upstreams) -> dict:
    return {"nodes": {
        "root": {"routerType": "Sequence", "steps": [
            {"name": "step1", "nodeName": "animal-categorize"},
            {"name": "step2", "nodeName": "breed-categorize", "condition": 'predictions.#(label=="dog")'},
        ]},
        "animal-categorize": {"routerType": "Switch", "steps": [
            {"name": "model1", "serviceUrl": upstreams.reply("m1", {"predictions": [{"label": "cat", "score": [0.1, 0.9]}]}),
             "condition": 'instances.#(modelId=="1")'},
            {"name": "model2", "serviceUrl": upstreams.reply("m2", {"predictions": [{"label": "dog", "score": [0.8, 0.2]}]}),
             "condition": 'instances.#(modelId=="2")'},
        ]},
        "breed-categorize": {"routerType": "Ensemble", "steps": [
            {"name": "model3", "serviceUrl": upstreams.reply("m3", {"predictions": [{"label": "beagle"}]})},
            {"name": "model4", "serviceUrl": upstreams.reply("m4", {"predictions": [{"label": "poodle"}]})},
        ]},
    }}


def test_switch_condition_and_nested_nodes(upstreams, graph_url):
    r = post(graph_url(_animal_graph(upstreams)), {"instances": [{"modelId": "2"}]})
    assert r.status_code == 200
    assert r.json() == {"model3": {"predictions": [{"label": "beagle"}]},
                        "model4": {"predictions": [{"label": "poodle"}]}}
    assert "m1" not in upstreams.seen


def test_unmet_sequence_condition_ends_with_previous_response_and_200(upstreams, graph_url):
    r = post(graph_url(_animal_graph(upstreams)), {"instances": [{"modelId": "1"}]})
    assert r.status_code == 200
    assert r.json() == {"predictions": [{"label": "cat", "score": [0.1, 0.9]}]}
    assert "m3" not in upstreams.seen and "m4" not in upstreams.seen


def test_switch_without_a_match_is_404_with_kserves_body(upstreams, graph_url):
    r = post(graph_url(_animal_graph(upstreams)), {"instances": [{"modelId": "7"}]})
    assert r.status_code == 404 and r.json() == NO_MATCH_BODY


def test_switch_on_a_body_that_is_not_json_matches_nothing(upstreams, graph_url):
    url = graph_url(_animal_graph(upstreams))
    r = requests.post(url, data=b"not json", timeout=10)
    assert r.status_code == 404 and r.json() == NO_MATCH_BODY


@pytest.mark.parametrize("dependency, status, expected_status, reaches_second", [
    ("Hard", 500, 500, False),
    ("Soft", 500, 200, True),
    ("Hard", 200, 200, True),
])
def test_sequence_dependencies(upstreams, graph_url, dependency, status, expected_status, reaches_second):
    spec = {"nodes": {"root": {"routerType": "Sequence", "steps": [
        {"name": "a", "serviceUrl": upstreams.reply("a", {"error": "boom"} if status >= 400 else {"ok": 1}, status),
         "dependency": dependency},
        {"name": "b", "serviceUrl": upstreams.reply("b", {"predictions": "b"}), "data": "$response"},
    ]}}}
    r = post(graph_url(spec), {"instances": [1]})
    assert r.status_code == expected_status
    assert ("b" in upstreams.seen) is reaches_second
    if not reaches_second:
        assert r.json() == {"error": "boom"}


@pytest.mark.parametrize("dependency, expected_status", [("Hard", 503), ("Soft", 200)])
def test_ensemble_dependencies(upstreams, graph_url, dependency, expected_status):
    spec = {"nodes": {"root": {"routerType": "Ensemble", "steps": [
        {"name": "good", "serviceUrl": upstreams.reply("good", {"predictions": "ok"})},
        {"name": "bad", "serviceUrl": upstreams.reply("bad", {"error": "down"}, 503), "dependency": dependency},
    ]}}}
    r = post(graph_url(spec), {"instances": [1]})
    assert r.status_code == expected_status
    if dependency == "Hard":
        assert r.json() == {"error": "down"}
    else:
        assert r.json() == {"good": {"predictions": "ok"}, "bad": {"error": "down"}}


@pytest.mark.parametrize("router_type", ["Switch", "Splitter"])
@pytest.mark.parametrize("dependency", ["Hard", "Soft"])
def test_switch_and_splitter_answer_with_the_chosen_steps_status(upstreams, graph_url, router_type, dependency):
    step = {"serviceUrl": upstreams.reply("s", {"error": "busy"}, 429), "dependency": dependency}
    step.update({"condition": "instances"} if router_type == "Switch" else {"weight": 100})
    r = post(graph_url({"nodes": {"root": {"routerType": router_type, "steps": [step]}}}), {"instances": [1]})
    assert r.status_code == 429 and r.json() == {"error": "busy"}


def test_splitter_follows_weights(upstreams, graph_url):
    spec = {"nodes": {"root": {"routerType": "Splitter", "steps": [
        {"serviceUrl": upstreams.reply("never", {"n": 0}), "weight": 0},
        {"serviceUrl": upstreams.reply("x", {"n": 1}), "weight": 50},
        {"serviceUrl": upstreams.reply("y", {"n": 2}), "weight": 50},
    ]}}}
    url = graph_url(spec)
    answers = {post(url, {}).json()["n"] for _ in range(40)}
    assert answers == {1, 2}  # both halves hit (chance of a miss: 2 * 0.5**40); weight 0 never


@pytest.mark.parametrize("patterns, expected, absent", [
    ("", set(), {"Test-Header-Key", "Authorization"}),
    ("Test-Header-Key", {"Test-Header-Key"}, {"Authorization", "Other-Test"}),
    ("Test-Header-.*,Author.*", {"Test-Header-Key", "Test-Header-Other", "Authorization"}, {"Other-Test"}),
])
def test_header_propagation_by_pattern(upstreams, graph_url, patterns, expected, absent):
    spec = {"nodes": {"root": {"routerType": "Sequence", "steps": [{"serviceUrl": upstreams.reply("h", {"ok": True})}]}}}
    headers = {"Authorization": "Bearer Token", "Test-Header-Key": "v1", "Test-Header-Other": "v2",
               "Other-Test": "v3"}
    assert post(graph_url(spec, patterns=patterns), {}, headers).status_code == 200
    sent = upstreams.seen["h"][0].headers
    assert all(sent.get(h) == headers[h] for h in expected)
    assert not any(h in sent for h in absent)
    assert sent["Content-Type"] == "application/json"


def test_unreachable_step_is_500_with_kserves_error_shape(graph_url):
    spec = {"nodes": {"root": {"routerType": "Sequence",
                               "steps": [{"serviceUrl": f"http://127.0.0.1:{free_port()}/gone"}]}}}
    r = post(graph_url(spec), {})
    assert r.status_code == 500
    assert r.json()["error"] == "Failed to process request" and "gone" in r.json()["cause"]


def test_malformed_step_url_is_500(graph_url):  # TestMalformedURL
    spec = {"nodes": {"root": {"routerType": "Sequence",
                               "steps": [{"serviceUrl": "http://single-1.default.{$your-domain}/switch"}]}}}
    r = post(graph_url(spec), {})
    assert r.status_code == 500 and r.json()["error"] == "Failed to process request"


def test_router_timeouts_service_client_bounds_each_step(upstreams, graph_url):
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.json_response({"predictions": "late"})

    upstreams.handlers["slow"] = slow
    spec = {"routerTimeouts": {"serviceClient": 1},
            "nodes": {"root": {"routerType": "Sequence", "steps": [{"serviceUrl": upstreams.url("slow")}]}}}
    r = post(graph_url(spec), {})
    assert r.status_code == 500 and "Timeout" in r.json()["cause"]
    spec = {"nodes": {"root": {"routerType": "Sequence", "steps": [{"serviceUrl": upstreams.url("slow")}]}}}
    assert post(graph_url(spec), {}).json() == {"predictions": "late"}  # no serviceClient: no step limit


def test_last_streaming_step_is_streamed_through(loop, upstreams, graph_url):
    release = asyncio.Event()

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"n": 1}\n\n')
        await asyncio.wait_for(release.wait(), 20)  # the rest only once the client has the first chunk
        await response.write(b'data: {"n": 2}\n\ndata: [DONE]\n\n')
        await response.write_eof()
        return response

    upstreams.handlers["llm"] = sse
    spec = {"nodes": {"root": {"routerType": "Sequence", "steps": [
        {"name": "classify", "serviceUrl": upstreams.reply("classify", {"predictions": ["ok"]})},
        {"name": "llm", "serviceUrl": upstreams.url("llm"), "data": "$request"},
    ]}}}
    with requests.post(graph_url(spec), json={"messages": [], "stream": True}, stream=True, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines) == b'data: {"n": 1}'
        loop.loop.call_soon_threadsafe(release.set)
        rest = [line for line in lines if line]
    assert rest == [b'data: {"n": 2}', b"data: [DONE]"]


def test_cloudevent_in_reply_event_out(upstreams, graph_url):
    spec = {"nodes": {"root": {"routerType": "Sequence", "steps": [
        {"serviceUrl": upstreams.reply("m", {"predictions": [1]})}]}}}
    event = events.make_event("com.example.ask", "/tests", {"instances": [1]}, thawrequestid="req-7")
    headers, body = events.to_http(event)
    r = requests.post(graph_url(spec), data=body, headers=headers, timeout=10)
    assert r.status_code == 200
    reply = events.parse_http_event(r.headers, r.content)
    assert reply.get_type() == events.INFERENCE_RESPONSE
    assert reply.get_extension(events.EXT_REQUEST_ID) == "req-7"
    assert reply.get_data() == {"predictions": [1]}
    assert upstreams.seen["m"][0].body == {"instances": [1]}


def test_graph_begin_is_reported_for_look_ahead(upstreams, graph_url):
    spec = {"nodes": {"root": {"routerType": "Sequence", "steps": [{"serviceUrl": upstreams.reply("m", {})}]}}}
    post(graph_url(spec, name="lookahead"), {})
    assert graph_url.begun == ["lookahead"]


@pytest.mark.parametrize("name, spec, message", [
    ("g", {"nodes": {"start": {"routerType": "Sequence", "steps": [{"serviceUrl": "http://x"}]}}},
     "root node not found"),
    ("g", {"nodes": {"root": {"routerType": "Sequence", "steps": [
        {"name": "a", "serviceUrl": "http://x"}, {"name": "a", "serviceUrl": "http://y"}]}}},
     'contains more than one step with name "a"'),
    ("g", {"nodes": {"root": {"routerType": "Sequence", "steps": [{"name": "a"}]}}},
     "does not specify an inference target"),
    ("g", {"nodes": {"root": {"routerType": "Sequence", "steps": [
        {"name": "a", "serviceUrl": "http://x", "serviceName": "m"}]}}},
     "specifies more than one of nodeName, serviceName, serviceUrl"),
    ("g", {"nodes": {"root": {"routerType": "Splitter", "steps": [
        {"serviceName": "a", "weight": 60}, {"serviceName": "b", "weight": 30}]}}},
     "the sum of traffic weights for all routing targets should be 100"),
    ("g", {"nodes": {"root": {"routerType": "Splitter", "steps": [{"serviceName": "a"}]}}},
     "Route[a] missing the 'Weight'"),
    ("g", {"nodes": {"root": {"routerType": "Sequence", "steps": [{"nodeName": "nowhere"}]}}},
     'names node "nowhere", which the graph does not have'),
    ("g", {"nodes": {"root": {"routerType": "Sequence", "steps": [{"nodeName": "b"}]},
                     "b": {"routerType": "Sequence", "steps": [{"nodeName": "root"}]}}},
     "loop: root -> b -> root"),
    ("Bad_Name", {"nodes": {"root": {"routerType": "Sequence", "steps": [{"serviceUrl": "http://x"}]}}},
     'The InferenceGraph "Bad_Name" is invalid'),
    ("g", {"nodes": {"root": {"routerType": "Parallel", "steps": []}}}, "routerType"),
])
def test_validation_like_kserves_webhook(name, spec, message):
    with pytest.raises(GraphInvalid) as err:
        parse_graph(name, spec)
    assert message in str(err.value)


def test_bad_propagate_headers_pattern_is_a_clear_error():
    with pytest.raises(ValueError, match="does not compile"):
        header_patterns("ok,(unclosed")


def test_standalone_thaw_router_serves_a_kserve_inferencegraph_file(tmp_path, upstreams):
    url = upstreams.reply("m", {"predictions": ["standalone"]})
    graph = tmp_path / "graph.yaml"
    graph.write_text(textwrap.dedent(f"""\
        apiVersion: serving.kserve.io/v1alpha1
        kind: InferenceGraph
        metadata: {{name: demo-graph}}
        spec:
          nodes:
            root:
              routerType: Sequence
              steps:
                - {{name: only, serviceUrl: "{url}"}}
          routerTimeouts: {{serverIdle: 1}}
        """))
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "thaw.cli", "router", "--graph", str(graph), "--port", str(port)],
                           tmp_path / "router.log")
    try:
        server.wait_http(f"http://127.0.0.1:{port}/readyz", 30)
        r = post(f"http://127.0.0.1:{port}/", {"instances": [1]})
        assert r.status_code == 200 and r.json() == {"predictions": ["standalone"]}
        # routerTimeouts.serverIdle (1s here): a connection that sends no whole request is closed
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            assert sock.recv(1024) == b"" and time.monotonic() - started < 10
    finally:
        server.stop()


def test_standalone_router_refuses_an_invalid_graph_file(tmp_path):
    graph = tmp_path / "graph.yaml"
    graph.write_text("apiVersion: serving.kserve.io/v1alpha1\nkind: InferenceGraph\nmetadata: {name: g}\n"
                     "spec: {nodes: {first: {routerType: Sequence, steps: []}}}\n")
    out = thaw_cli("router", "--graph", str(graph), "--port", "1", timeout=180)  # exits at once; a deadline for a loaded machine
    assert out.returncode != 0 and "root node not found" in out.stderr + out.stdout


CHAT_ANSWER = {"object": "chat.completion", "model": "a",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}]}
TEXT_ANSWER = {"object": "text_completion", "model": "a", "choices": [{"index": 0, "text": " Paris", "finish_reason": "stop"}]}


@pytest.mark.parametrize("request_, previous, expected", [
    # a chat request and a chat answer: the answer's text is the next step's one user message; the rest stays
    ({"model": "g", "messages": [{"role": "user", "content": "Q"}], "max_tokens": 8}, CHAT_ANSWER,
     {"model": "g", "messages": [{"role": "user", "content": "Paris"}], "max_tokens": 8}),
    ({"model": "g", "prompt": "Q", "temperature": 0}, TEXT_ANSWER, {"model": "g", "prompt": " Paris", "temperature": 0}),
    # across the two shapes: the graph's request decides the next step's shape
    ({"model": "g", "prompt": "Q"}, CHAT_ANSWER, {"model": "g", "prompt": "Paris"}),
    ({"model": "g", "messages": []}, TEXT_ANSWER, {"model": "g", "messages": [{"role": "user", "content": " Paris"}]}),
    # not OpenAI on either side: KServe's $response (the previous body as it is)
    ({"instances": [1]}, CHAT_ANSWER, None),
    ({"model": "g", "messages": []}, {"predictions": [1]}, None),
    ({"model": "g", "messages": []}, {"object": "chat.completion", "choices": []}, None),
    ({"model": "g", "messages": []}, {"object": "chat.completion", "choices": [{"message": {"content": None}}]}, None),
])
def test_an_openai_answer_becomes_the_next_steps_request(request_, previous, expected):
    import json

    from thaw.eventing.graph import openai_step_input

    got = openai_step_input(json.dumps(request_).encode(), json.dumps(previous).encode())
    assert (json.loads(got) if got is not None else None) == expected


@pytest.mark.parametrize("body, last, expected", [
    ({"model": "chain", "messages": [], "stream": True, "stream_options": {"include_usage": True}}, False,
     {"model": "m", "messages": []}),
    ({"model": "chain", "messages": [], "stream": True}, True, {"model": "m", "messages": [], "stream": True}),
    ({"instances": [1]}, False, {"instances": [1], "model": "m"}),
])
def test_a_model_step_gets_its_own_name_and_streams_only_last(body, last, expected):
    import json

    from thaw.eventing.graph import model_step_body

    assert json.loads(model_step_body(json.dumps(body).encode(), "m", last)) == expected
    assert model_step_body(b"not json", "m", last) == b"not json"


def test_a_sequence_of_models_called_in_openais_shape_passes_each_answer_on(upstreams, graph_url):
    """A Sequence over two models called with an OpenAI chat body whose model is the graph's name: each model
    gets its own name, the first is not asked to stream, the second gets the first's answer as its question.
    The models are stand-ins that check the name they are called by, as thaw's functions do."""
    def model(name: str):
        async def answer(request: web.Request) -> web.Response:
            body = await request.json()
            if body.get("model") != name:
                return web.json_response({"error": {"message": f"The model '{body.get('model')}' does not exist",
                                                    "code": "model_not_found"}}, status=404)
            return web.json_response({"object": "chat.completion", "model": name, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": f"{name} read {body['messages'][-1]['content']}"},
                 "finish_reason": "stop"}]})
        return answer

    for name in ("first", "second"):
        upstreams.handlers[f"models/{name}/v1/chat/completions"] = model(name)
    spec = {"nodes": {"root": {"routerType": "Sequence", "steps": [
        {"serviceName": "first"}, {"serviceName": "second", "data": "$response"}]}}}
    url = graph_url(spec, name="chain", models_url=upstreams.base)
    r = post(url, {"model": "chain", "messages": [{"role": "user", "content": "Q"}], "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "second read first read Q"
    first, second = (upstreams.seen[f"models/{n}/v1/chat/completions"][0].body for n in ("first", "second"))
    assert first == {"model": "first", "messages": [{"role": "user", "content": "Q"}], "max_tokens": 8}
    assert second == {"model": "second", "messages": [{"role": "user", "content": "first read Q"}], "max_tokens": 8}
