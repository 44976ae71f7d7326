"""A pooled replica (`thaw function serve --pool`): an engine built ahead for a model's shape, adopted by another
model of that shape, then answering exactly as a replica started for that model would (functions/pool.py)."""

from __future__ import annotations

import openai
import pytest
import requests

from conftest import other_model, start_function

PROMPTS = ["The quick brown fox", "Once upon a time there was", "1 2 3 4 5"]


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("pool-models")
    return other_model(tiny_model, root / "a", 1), other_model(tiny_model, root / "b", 2)


@pytest.fixture(scope="module")
def replicas(models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    pooled = start_function(models[0], logs, served_name="pool-a", flags=["--pool"])
    try:
        fresh = start_function(models[1], logs, served_name="b")
    except BaseException:
        pooled.server.stop()
        raise
    yield pooled, fresh
    pooled.server.stop()
    fresh.server.stop()


def adopt_body(model_dir, served_name="b", **engine) -> dict:
    return {"boot": {"model_dir": str(model_dir)}, "served_name": served_name,
            "engine": {"max_model_len": 512, "dtype": "bfloat16", **engine}}


def test_a_pooled_replica_is_ready_to_adopt_and_refuses_a_malformed_or_mismatched_adoption(replicas, models):
    pooled, _ = replicas
    ready = requests.get(pooled.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "pooled"
    # no model's routes before the adoption: the plane never routes a request to it
    assert requests.post(pooled.url + "/v1/completions", json={"prompt": "x"}, timeout=10).status_code == 404
    bad = [(b"not json", 400, None), (b"[]", 400, None),
           ({"boot": {"model_dir": str(models[1])}}, 400, "served_name"),
           ({**adopt_body(models[1]), "boot": {"model_dir": str(models[1]), "nope": 1}}, 400, "boot"),
           ({**adopt_body(models[1]), "boot": {"model_dir": str(models[1] / "nowhere")}}, 400, "boot"),
           (adopt_body(models[1], max_model_len=256), 409, "engine")]
    for body, status, param in bad:
        kwargs = {"json": body} if isinstance(body, dict) else {"data": body, "headers": {"Content-Type": "application/json"}}
        r = requests.post(pooled.url + "/thaw/adopt", timeout=30, **kwargs)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == param
    assert requests.get(pooled.url + "/readyz", timeout=10).json()["status"] == "pooled"  # still waiting


def test_an_adopted_engine_answers_exactly_as_a_fresh_replica_of_its_model(replicas, models):
    pooled, fresh = replicas
    r = requests.post(pooled.url + "/thaw/adopt", json=adopt_body(models[1]), timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["seconds"] >= 0 and "adopt" in r.json()["phases"]
    assert requests.get(pooled.url + "/readyz", timeout=10).json()["status"] == "ready"

    def answers(replica):
        client = openai.OpenAI(base_url=replica.url + "/v1", api_key="unused", max_retries=0)
        texts = [client.completions.create(model="b", prompt=prompt, max_tokens=24, temperature=0, logprobs=2)
                 for prompt in PROMPTS]
        chat = client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=16,
                                              temperature=0)
        stream = "".join(chunk.choices[0].text for chunk in client.completions.create(
            model="b", prompt=PROMPTS[0], max_tokens=24, temperature=0, stream=True) if chunk.choices)
        return ([(c.model, c.choices[0].text, c.choices[0].logprobs.tokens) for c in texts],
                (chat.model, chat.choices[0].message.content), stream)

    adopted, expected = answers(pooled), answers(fresh)
    assert adopted == expected
    assert len({text for _, text, _ in expected[0]}) > 1  # the prompts' answers differ: the weights decide them
    # vLLM's metrics name the adopter
    metrics = requests.get(pooled.url + "/metrics", timeout=10).text
    assert 'model_name="b"' in metrics and 'model_name="pool-a"' not in metrics
    # adopted once: the adoption route is gone with the waiting app
    assert requests.post(pooled.url + "/thaw/adopt", json=adopt_body(models[1]), timeout=30).status_code == 404


def _prefix_hits(replica) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in requests.get(replica.url + "/metrics", timeout=10).text.splitlines()
               if line.startswith("vllm:prefix_cache_hits_total"))


def test_a_released_engine_is_adopted_by_another_model_that_never_sees_its_cached_prefixes(models, tmp_path,
                                                                                          replicas):
    _, fresh = replicas
    serving = start_function(models[0], tmp_path, served_name="a")
    try:
        client = openai.OpenAI(base_url=serving.url + "/v1", api_key="unused", max_retries=0)
        prompt = " ".join(["a long shared preamble"] * 20)  # blocks of 16 tokens the prefix cache keeps
        for _ in range(2):
            client.completions.create(model="a", prompt=prompt, max_tokens=4, temperature=0)
        assert _prefix_hits(serving) > 0  # its second time hit the first's blocks
        r = requests.post(serving.url + "/thaw/release", timeout=60)
        assert r.status_code == 200 and r.json()["status"] == "pooled", r.text
        assert requests.get(serving.url + "/readyz", timeout=10).json()["status"] == "pooled"
        assert requests.post(serving.url + "/v1/completions", json={"prompt": "x"}, timeout=10).status_code == 404
        r = requests.post(serving.url + "/thaw/adopt", json=adopt_body(models[1]), timeout=300)
        assert r.status_code == 200, r.text
        hits = _prefix_hits(serving)
        ours = openai.OpenAI(base_url=serving.url + "/v1", api_key="unused", max_retries=0).completions.create(
            model="b", prompt=prompt, max_tokens=16, temperature=0)
        assert _prefix_hits(serving) == hits  # none of a's blocks reached b
        theirs = openai.OpenAI(base_url=fresh.url + "/v1", api_key="unused", max_retries=0).completions.create(
            model="b", prompt=prompt, max_tokens=16, temperature=0)
        assert ours.choices[0].text == theirs.choices[0].text
        # released again, and a second release of a waiting engine is refused
        assert requests.post(serving.url + "/thaw/release", timeout=60).status_code == 200
        r = requests.post(serving.url + "/thaw/release", timeout=60)
        assert r.status_code == 409 and r.json()["error"]["code"] == "engine_not_releasable"
    finally:
        serving.server.stop()


# ---- the plane's pure decisions (knative/embedded/control/engine_pool.py) ------------------------------------

def test_one_pool_per_shape_launched_as_its_first_revision():
    from thaw.knative.embedded.control.engine_pool import Shape, shapes

    assert shapes([("b-1", "k1"), ("a-1", "k1"), ("c-1", "k2"), ("d-1", None)]) == [Shape("k1", "a-1"),
                                                                                 Shape("k2", "c-1")]
    assert shapes([("a-1", None)]) == []


@pytest.mark.parametrize("size, have, starting, retry_at, now, contexts_free, want", [
    (1, 0, False, 0, 10, 8, 1),
    (2, 0, False, 0, 10, 8, 1),  # one at a time
    (1, 1, False, 0, 10, 8, 0),
    (1, 0, True, 0, 10, 8, 0),  # one starting already
    (1, 0, False, 20, 10, 8, 0),  # a failed start backs off
    (0, 0, False, 0, 10, 8, 0),
    (2, 1, False, 0, 10, 1, 1),  # the last context gpuContexts leaves
    (2, 1, False, 0, 10, 0, 0),  # the pool's engines of every shape fill gpuContexts
])
def test_the_pool_starts_one_engine_at_a_time_up_to_its_size(size, have, starting, retry_at, now, contexts_free,
                                                             want):
    from thaw.knative.embedded.control.engine_pool import starts_wanted

    assert starts_wanted(size, have, starting, retry_at, now, contexts_free) == want


def test_a_shape_is_architecture_tokenizer_engine_and_resources(tiny_model, tmp_path):
    from thaw.knative.embedded.control.engine_pool import shape_of
    from thaw.launch import ReplicaBoot
    from thaw.spec import Model

    other = other_model(tiny_model, tmp_path / "other", 3)
    boot = lambda path: ReplicaBoot(model_dir=str(path))  # noqa: E731
    model = lambda **kw: Model.model_validate({"name": "m", "source": str(tiny_model), **kw})  # noqa: E731
    key = shape_of(model(), boot(tiny_model), sleep_mode=False)
    assert key is not None
    assert shape_of(model(), boot(other), sleep_mode=False) == key  # other weights, same shape
    assert shape_of(model(engine={"max_model_len": 256}), boot(tiny_model), sleep_mode=False) != key
    assert shape_of(model(resources={"cpu": "1"}), boot(tiny_model), sleep_mode=False) != key
    (other / "chat_template.jinja").write_text("{{ messages }}")
    assert shape_of(model(), boot(other), sleep_mode=False) != key  # another tokenizer
    assert shape_of(model(), boot(tiny_model), sleep_mode=True) is None  # a GPU's waiting engine must sleep
    assert shape_of(model(park=True), boot(tiny_model), sleep_mode=True) is not None
    assert shape_of(model(), ReplicaBoot(source="s3://bucket/m"), sleep_mode=False) is None


def test_an_evicted_sleeper_goes_back_to_the_pool_only_where_its_shape_lacks_an_engine(tiny_model):
    import asyncio
    from types import SimpleNamespace

    from thaw.knative.embedded.control.engine_pool import EnginePool
    from thaw.launch import ReplicaBoot
    from thaw.spec import Model

    rev = SimpleNamespace(name="m-00001", model=Model.model_validate({"name": "m", "source": str(tiny_model)}))
    released = []

    async def release(replica):
        released.append(replica)
        return replica != "refuses"

    def pool(size: int, waiting: int = 0) -> EnginePool:
        p = EnginePool(lambda: size, lambda rev: ReplicaBoot(model_dir=str(tiny_model)), None, None, lambda: 8)
        if waiting:
            p.waiting[p.key_of(rev)] = ["w"] * waiting
        return p

    run = asyncio.run
    assert run(pool(0).give_back(rev, "r", release)) is False and released == []  # the pool is off
    assert run(pool(1, waiting=1).give_back(rev, "r", release)) is False and released == []  # full
    full_after = pool(2, waiting=1)
    assert run(full_after.give_back(rev, "r", release)) is True and released == ["r"]
    assert full_after.waiting[full_after.key_of(rev)] == ["w", "r"]
    assert run(pool(1).give_back(rev, "refuses", release)) is False  # it could not: the caller stops it
