"""The OpenAI protocol as the function speaks it: request models, the error object, response shapes.

Requests are validated strictly (a string is not a number) and every failure becomes the OpenAI error
object `{"error": {"message", "type", "param", "code"}}` with a 4xx status; nothing here knows vLLM.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from thaw.openai_wire import error_body  # noqa: F401 (the replica's routes build their errors through protocol)


class APIError(Exception):
    """An error with its HTTP status and OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")


INT64_MIN, INT64_MAX = -2**63, 2**63 - 1

# Fields OpenAI defines that change what is generated and that this server does not implement: refusing
# them is better than answering something other than what was asked.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias",
               "suffix", "echo", "best_of", "prediction", "audio", "modalities", "reasoning_effort",
               "web_search_options")


class FieldRefused(ValueError):
    """A field the request may not carry; parse_request names it as the error's param."""

    def __init__(self, field: str, code: str):
        super().__init__(code)
        self.field = field
        self.code = code


def _refuse_unknown(data: Any, known: set[str]) -> Any:
    """Nothing a client sends is dropped unseen: a field this server does not know, or knows and does not
    implement, is a 400 naming it. A JSON null is "not asked for" (some clients send every field), so a
    null field is dropped instead."""
    if not isinstance(data, dict):
        return data
    out = {}
    for key, value in data.items():
        if key in known:
            out[key] = value
        elif value is not None:
            raise FieldRefused(key, "unsupported_parameter" if key in UNSUPPORTED else "unknown_parameter")
    return out


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    # Fields are OpenAI's and the sampling extras vLLM's server takes (vLLM's names, passed to its
    # SamplingParams); anything else is refused (_refuse_unknown).
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    # vLLM's server's bounds: a seed past 64 bits fails the engine's step, not just the request
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's fields about the caller, never about what is generated: accepted, unused
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # vLLM's sampling extras, as its OpenAI server takes them
    ignore_eos: bool = False  # generate max_tokens even past end-of-sequence
    top_k: int = Field(0, ge=-1)  # 0 or -1: every token
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        return _refuse_unknown(data, set(cls.model_fields))

    @model_validator(mode="after")
    def _checks(self):
        if self.min_tokens and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if isinstance(self.stop, list) and not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop must be a string or a list of non-empty strings")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_tokens: int, choice: int = 0) -> dict[str, Any]:
        """vLLM's SamplingParams for one choice, by its own names: the one place the request's sampling settings
        are read (the engine adds only how outputs come back). Choice i of a seeded request takes seed + i."""
        return {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "stop": self.stop_list() or None, "seed": None if self.seed is None else self.seed + choice,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "logprobs": self.logprobs_count, "ignore_eos": self.ignore_eos, "top_k": self.top_k,
                "min_p": self.min_p, "repetition_penalty": self.repetition_penalty, "min_tokens": self.min_tokens,
                "stop_token_ids": self.stop_token_ids or None,
                "include_stop_str_in_output": self.include_stop_str_in_output,
                "skip_special_tokens": self.skip_special_tokens,
                "spaces_between_special_tokens": self.spaces_between_special_tokens}

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # given to the chat template, which may use it

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        return _refuse_unknown(data, set(cls.model_fields))

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)

    @model_validator(mode="after")
    def _prompt(self):
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request (vLLM's server takes the same). `dimensions` is honoured where the model
    supports it (matryoshka models); vLLM refuses it otherwise, naming it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    # vLLM's pooling extras (its own benchmark client sends them): cut each input to this many tokens (-1: the
    # model's context), keeping its start ("right": cut the end) or its end ("left")
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    truncation_side: Literal["left", "right"] = "right"

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        return _refuse_unknown(data, set(cls.model_fields))

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value):
        if not value or (isinstance(value, list) and any(isinstance(x, (str, list)) and not x for x in value)):
            raise ValueError("input must not be empty, nor hold an empty string or list of token ids")
        return value

    def inputs(self) -> list[str | list[int]]:
        """The inputs as a list: texts, or token ids."""
        x = self.input
        if isinstance(x, str):
            return [x]
        if x and all(isinstance(t, int) for t in x):
            return [list(x)]
        return list(x)


def embedding_json(vector: list[float], encoding_format: str) -> list[float] | str:
    """One embedding as OpenAI sends it: floats, or base64 of little-endian float32s (what the openai SDK
    decodes with numpy.frombuffer(..., dtype="float32"))."""
    if encoding_format == "float":
        return vector
    import base64
    import struct

    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _param(loc: tuple) -> str | None:
    parts = [str(x) for x in loc if not (isinstance(x, str) and x in {"str", "list[int]", "list[str]",
                                                                         "list[list[int]]", "list[TextPart]"})]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or None


def parse_request(kind: type[BaseModel], data: Any) -> Any:
    """Validate a decoded JSON body; raise APIError(400) naming the first offending parameter."""
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param(tuple(first["loc"]))
        message = first["msg"].removeprefix("Value error, ")
        refused = (first.get("ctx") or {}).get("error")
        if isinstance(refused, FieldRefused):
            param = _param(tuple(first["loc"]) + (refused.field,))
            message = (f"Unsupported parameter: '{param}' is not supported by this server"
                       if refused.code == "unsupported_parameter" else f"Unknown parameter: '{param}'.")
            raise APIError(400, message, param=param, code=refused.code) from None
        if first["type"] == "missing":
            message = f"Missing required parameter: '{param}'"
        elif param:
            message = f"Invalid value for '{param}': {message}"
        return_code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
        raise APIError(400, message, param=param, code=return_code) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- streamed chunks, as bytes ------------------------------------------------------------------------
# A stream's chunks are built from strings, not per-token model objects: the same JSON, key for key and in
# the same order, that the openai SDK's types dump (tests/test_serving.py holds them to it), at a fraction
# of the cost. Floats that JSON cannot hold (a logprob of -inf) are null, as those types write them.

DONE = b"data: [DONE]\n\n"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def sse(payload: dict) -> bytes:
    return b"data: " + _json(payload).encode() + b"\n\n"


def logprobs_json(chat: bool, tokens: Iterable) -> dict:
    """OpenAI's logprobs object of a choice from (token, logprob, top: ((token, logprob), ...)) items."""
    tokens = list(tokens)
    if chat:
        return {"content": [
            {"token": t.token, "bytes": list(t.token.encode()), "logprob": _finite(t.logprob),
             "top_logprobs": [{"token": s, "bytes": list(s.encode()), "logprob": _finite(lp)} for s, lp in t.top]}
            for t in tokens]}
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t.token)
    return {"text_offset": offsets, "token_logprobs": [_finite(t.logprob) for t in tokens],
            "tokens": [t.token for t in tokens],
            "top_logprobs": [{s: _finite(lp) for s, lp in t.top} for t in tokens]}


class ChunkEncoder:
    """The server-sent events of one streamed chat or text completion."""

    def __init__(self, chat: bool, request_id: str, created: int, model: str, include_usage: bool):
        self.chat = chat
        self.include_usage = include_usage
        self._head = f'data: {{"id":{_json(request_id)},"choices":['.encode()
        self._tail = (f'],"created":{created},"model":{_json(model)},"object":'
                      f'"{"chat.completion.chunk" if chat else "text_completion"}"').encode()
        self._usage_null = b',"usage":null' if include_usage else b""

    def role(self, index: int) -> bytes:
        """A chat stream's first chunk of a choice: the assistant's role, no content yet."""
        return self._chunk(f'{{"delta":{{"content":"","role":"assistant"}},"index":{index},'
                           f'"finish_reason":null,"logprobs":null}}')

    def delta(self, index: int, text: str | None, finish_reason: str | None, logprobs: dict | None) -> bytes:
        """New text of one choice (None: a chat chunk with an empty delta, as a bare finish has)."""
        reason, lps = _json(finish_reason), _json(logprobs)
        if self.chat:
            delta = "{}" if text is None else f'{{"content":{_json(text)}}}'
            return self._chunk(f'{{"delta":{delta},"index":{index},"finish_reason":{reason},"logprobs":{lps}}}')
        return self._chunk(f'{{"finish_reason":{reason},"index":{index},"logprobs":{lps},"text":{_json(text)}}}')

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The last chunk when the client asked for usage: no choices, the counts."""
        counts = (f'{{"completion_tokens":{completion_tokens},"prompt_tokens":{prompt_tokens},'
                  f'"total_tokens":{prompt_tokens + completion_tokens}}}')
        return self._head + self._tail + b',"usage":' + counts.encode() + b"}\n\n"

    def _chunk(self, choice: str) -> bytes:
        return self._head + choice.encode() + self._tail + self._usage_null + b"}\n\n"
