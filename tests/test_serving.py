"""Engine output to response bytes (functions/serving.py, functions/protocol.py): pure, table-tested.

The chunks are built from strings; these tests hold them to the JSON the openai SDK's own types dump for
the same chunk, byte for byte, so a client sees exactly what it saw when each chunk was a model object.
"""

from __future__ import annotations

import json

import pytest
from openai.types import Completion, CompletionChoice, CompletionUsage
from openai.types.chat import ChatCompletionChunk
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice, ChoiceDelta

from thaw.functions import protocol as p
from thaw.functions.generations import Delta, EngineFailed, TokenLogprob
from thaw.functions.serving import ClientGone, merge, stream_bytes

TEXTS = ["", "Paris", 'quote " and \\ backslash', "line\nbreak\ttab", "control \x01\x1f", "é ü 中文 😀",
         "\u2028\u2029 separators", "\x7f del"]
COMMON = {"id": "chatcmpl-abc", "created": 1700000000, "model": "m/with \"odd\" name"}
LOGPROBS = (TokenLogprob("Par", -0.25, (("Par", -0.25), ("Lon", -1.5))), TokenLogprob("is", float("-inf"), ()))


def sdk_chunk(chat: bool, include_usage: bool, index: int, text, finish_reason, logprobs, role=None) -> bytes:
    common = {**COMMON, **({"usage": None} if include_usage else {})}
    if chat:
        delta = ChoiceDelta.model_construct(**({"role": role} if role else {}),
                                            **({"content": text} if text is not None else {}))
        chunk = ChatCompletionChunk.model_construct(object="chat.completion.chunk", **common, choices=[
            ChunkChoice.model_construct(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)])
    else:
        chunk = Completion.model_construct(object="text_completion", **common, choices=[
            CompletionChoice.model_construct(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)])
    return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n".encode()


def encoder(chat: bool, include_usage: bool) -> p.ChunkEncoder:
    return p.ChunkEncoder(chat, COMMON["id"], COMMON["created"], COMMON["model"], include_usage)


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("finish_reason", [None, "stop", "length"])
def test_delta_chunks_are_the_sdk_types_json(chat, include_usage, text, finish_reason):
    assert encoder(chat, include_usage).delta(3, text, finish_reason, None) == \
        sdk_chunk(chat, include_usage, 3, text, finish_reason, None)


@pytest.mark.parametrize("chat", [True, False])
def test_logprobs_chunks_are_the_sdk_types_json_with_minus_infinity_as_null(chat):
    lps = p.logprobs_json(chat, LOGPROBS)
    ours = encoder(chat, False).delta(0, "Paris", None, lps)
    assert ours == sdk_chunk(chat, False, 0, "Paris", None, lps)
    assert b"Infinity" not in ours and json.loads(ours[6:])  # valid JSON


def test_chat_role_chunk_and_bare_finish_are_the_sdk_types_json():
    assert encoder(True, True).role(1) == sdk_chunk(True, True, 1, "", None, None, role="assistant")
    assert encoder(True, False).delta(0, None, "stop", None) == sdk_chunk(True, False, 0, None, "stop", None)


@pytest.mark.parametrize("chat", [True, False])
def test_usage_chunk_is_the_sdk_types_json(chat):
    usage = CompletionUsage.model_construct(**p.usage(7, 5))
    kind = ChatCompletionChunk if chat else Completion
    sdk = kind.model_construct(object="chat.completion.chunk" if chat else "text_completion",
                               **{**COMMON, "usage": usage}, choices=[])
    assert encoder(chat, True).usage(7, 5) == f"data: {sdk.model_dump_json(exclude_unset=True)}\n\n".encode()


def d(index, text, tokens=1, finish=None, logprobs=None):
    return Delta(index, text, tokens, logprobs, finish)


@pytest.mark.parametrize("deltas, merged", [
    ([], []),
    ([d(0, "a")], [d(0, "a")]),
    ([d(0, "a"), d(0, "b"), d(0, "c", finish="stop")], [d(0, "abc", 3, "stop")]),
    ([d(1, "x"), d(0, "a"), d(1, "y"), d(0, "b")], [d(1, "xy", 2), d(0, "ab", 2)]),
    ([d(0, "a", logprobs=LOGPROBS[:1]), d(0, "b", logprobs=LOGPROBS[1:])], [d(0, "ab", 2, logprobs=LOGPROBS)]),
])
def test_merge_gives_one_delta_per_choice_in_first_seen_order(deltas, merged):
    assert merge(deltas) == merged


def events(pieces) -> list[str]:
    text = b"".join(pieces).decode()
    return [e[len("data: "):] for e in text.split("\n\n") if e]


def test_a_stream_is_one_piece_per_take_then_usage_and_done():
    takes = [[d(0, "Pa")], [d(0, "r"), d(0, "is"), d(0, ".", finish="stop")]]
    pieces = list(stream_bytes(encoder(True, True), 1, iter(takes), 4))
    assert len(pieces) == 3  # role + first delta; the merged rest; usage + [DONE]
    chunks = [json.loads(e) for e in events(pieces)[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:3]] == [{"content": "", "role": "assistant"},
                                                            {"content": "Pa"}, {"content": "ris."}]
    assert chunks[2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[3]["usage"] == {"completion_tokens": 4, "prompt_tokens": 4, "total_tokens": 8}
    assert events(pieces)[-1] == "[DONE]"


def test_an_engine_failure_mid_stream_is_an_error_chunk_then_done():
    def takes():
        yield [d(0, "a")]
        raise EngineFailed("the engine-core process died")

    out = events(stream_bytes(encoder(False, False), 1, takes(), 1))
    assert json.loads(out[0])["choices"][0]["text"] == "a"
    error = json.loads(out[1])["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_failed" and "died" in error["message"]
    assert out[2] == "[DONE]" and len(out) == 3


def test_a_client_gone_ends_the_stream_without_another_byte():
    def takes():
        yield [d(0, "a")]
        raise ClientGone()

    assert len(list(stream_bytes(encoder(True, False), 1, takes(), 1))) == 1


def test_deltas_the_engine_put_before_a_failure_reach_the_client_first():
    """One take can hold a step's deltas and then the failure that ended the generation (or the engine)."""
    from thaw.functions.generations import Generation
    from thaw.functions.metrics import FunctionMetrics
    from thaw.functions.service import FunctionService

    gen = Generation("cmpl-1", choices=1)
    gen.put([d(0, "Pa"), EngineFailed("the engine-core process died")])
    takes = FunctionService(None, None, FunctionMetrics()).takes(gen, {}, arrived=0.0)
    assert next(takes) == [d(0, "Pa")]
    with pytest.raises(EngineFailed):
        next(takes)
    assert gen.ended
