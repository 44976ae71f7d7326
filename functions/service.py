"""Requests to generations and generations to responses: validate an OpenAI request, tokenize it, put it in
the engine, and turn what the engine buffers into the response (functions/serving.py makes the bytes)."""

from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterator

from flask import Response, after_this_request
from openai.types import Completion, CompletionChoice, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice

from . import protocol as p
from .boot import FunctionConfig
from .engine import Engine
from .generations import Delta, Embed, Embedding, EngineFailed, Generation
from .metrics import FunctionMetrics
from .serving import ClientGone

POLL_SECONDS = 0.2  # how often a waiting request checks that its client is still there


def client_gone(environ: dict) -> bool:
    """True when the peer has closed the connection (a readable socket with nothing to read)."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


@dataclass(frozen=True, slots=True)
class Admitted:
    """A generation request taken in: what was asked, its buffer in the engine, and when it arrived."""

    req: Any  # a ChatCompletionRequest or a CompletionRequest
    gen: Generation
    prompt_tokens: int
    arrived: float  # time.perf_counter() at arrival: the start of its time to first token


class FunctionService:
    """Turns OpenAI requests into generations and generations into OpenAI responses."""

    def __init__(self, config: FunctionConfig, engine: Engine, metrics: FunctionMetrics):
        self.config = config
        self.engine = engine
        self.metrics = metrics
        self.created = p.now()

    # ---- requests to prompts ---------------------------------------------------------------------

    def _refuse_unfit(self, texts: list[str], param: str) -> None:
        """Refuse, before tokenizing, a prompt with more bytes than max_model_len tokens can hold: tokenizing
        megabytes takes seconds of CPU that every other request on the replica shares."""
        size = sum(len(t.encode()) for t in texts)
        if not self.engine.may_fit(size):
            raise p.APIError(
                400, f"This model's maximum context length is {self.engine.max_model_len} tokens. However, your "
                     f"prompt is {size} bytes, more than {self.engine.max_prompt_bytes} bytes, the most that fit in "
                     "it. Please reduce the length of the prompt.", param=param, code="context_length_exceeded")

    def _chat_prompt(self, req: p.ChatCompletionRequest) -> list[list[int]]:
        if not self.engine.has_chat_template:
            raise p.APIError(400, "This model has no chat template; use /v1/completions")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(),
                     **({"name": m.name} if m.name else {})} for m in req.messages]
        self._refuse_unfit([m["content"] for m in messages], "messages")
        return [self.engine.tokenize_chat(messages)]

    def _completion_prompts(self, req: p.CompletionRequest) -> list[list[int]]:
        vocab = self.engine.vocab_size
        prompts = []
        for i, prompt in enumerate(req.prompts()):
            if isinstance(prompt, str):
                self._refuse_unfit([prompt], "prompt")
                prompts.append(self.engine.tokenize(prompt))
            elif all(0 <= t < vocab for t in prompt):
                prompts.append(prompt)
            else:
                raise p.APIError(400, f"prompt[{i}] has token ids outside the vocabulary (0..{vocab - 1})",
                                 param="prompt")
        return prompts

    def _max_tokens(self, prompts: list[list[int]], requested: int | None) -> int:
        limit = self.engine.max_model_len
        for ids in prompts:
            if not ids:
                raise p.APIError(400, "The prompt is empty", param="prompt")
            if len(ids) >= limit:
                raise p.APIError(
                    400, f"This model's maximum context length is {limit} tokens. However, your prompt is "
                         f"{len(ids)} tokens. Please reduce the length of the prompt.",
                    param="messages" if requested is None else "prompt", code="context_length_exceeded")
            if requested is not None and len(ids) + requested > limit:
                raise p.APIError(
                    400, f"This model's maximum context length is {limit} tokens. However, you requested "
                         f"{len(ids) + requested} tokens ({len(ids)} in the prompt, {requested} for the "
                         "completion). Please reduce the prompt or max_tokens.",
                    param="max_tokens", code="context_length_exceeded")
        return requested if requested is not None else limit - max(len(ids) for ids in prompts)

    def start(self, kind: type, data: Any) -> Admitted:
        """Validate a request body and put its generation in the engine."""
        arrived = time.perf_counter()
        req = p.parse_request(kind, data)
        if req.model != self.config.served_name:
            raise p.model_not_found(req.model)
        self.engine.ensure_serving()
        if self.engine.pooling:
            raise p.APIError(400, f"The model '{req.model}' is an embedding model: it does not support the "
                                  f"{'Chat Completions' if kind is p.ChatCompletionRequest else 'Completions'} API; "
                                  "use /v1/embeddings", param="model", code="model_not_supported")
        chat = isinstance(req, p.ChatCompletionRequest)
        prompts = self._chat_prompt(req) if chat else self._completion_prompts(req)
        max_tokens = self._max_tokens(prompts, req.output_limit)
        sampling = [req.sampling(max_tokens, i) for i in range(req.n)]
        gen = self.engine.submit(p.new_id("chatcmpl" if chat else "cmpl"), prompts, sampling)
        self.metrics.in_flight.inc()

        @after_this_request
        def clean_up_on_close(response: Response) -> Response:
            # One clean-up for every way the response ends: answered, streamed to the end, failed, or
            # its client gone (then the engine stops generating for nobody).
            response.call_on_close(lambda: self.finish(gen))
            return response

        return Admitted(req, gen, sum(len(ids) for ids in prompts), arrived)

    def embed(self, data: Any) -> dict:
        """An embeddings request, answered whole: one vector per input, in its order."""
        req = p.parse_request(p.EmbeddingRequest, data)
        if req.model != self.config.served_name:
            raise p.model_not_found(req.model)
        self.engine.ensure_serving()
        if not self.engine.pooling:
            raise p.APIError(400, f"The model '{req.model}' generates text: it does not support the Embeddings API; "
                                  "use /v1/chat/completions or /v1/completions", param="model",
                             code="model_not_supported")
        if req.dimensions is not None and not self.engine.matryoshka:
            raise p.APIError(400, f"The model '{req.model}' does not support dimensions (it is not a Matryoshka "
                                  "model): leave dimensions out", param="dimensions")
        vocab, limit, prompts = self.engine.vocab_size, self.engine.max_model_len, []
        for i, item in enumerate(req.inputs()):
            if isinstance(item, str):
                self._refuse_unfit([item], "input")
                item = self.engine.tokenize(item)
            elif not all(0 <= t < vocab for t in item):
                raise p.APIError(400, f"input[{i}] has token ids outside the vocabulary (0..{vocab - 1})", param="input")
            if req.truncate_prompt_tokens is not None:
                keep = limit if req.truncate_prompt_tokens == -1 else min(req.truncate_prompt_tokens, limit)
                item = item[:keep] if req.truncation_side == "right" else item[len(item) - keep:]
            if len(item) > limit:
                raise p.APIError(400, f"This model's maximum context length is {limit} tokens. However, input[{i}] is "
                                      f"{len(item)} tokens. Please reduce the length of the input.", param="input",
                                 code="context_length_exceeded")
            prompts.append(item)
        gen = self.engine.submit(p.new_id("embd"), prompts, [Embed(req.dimensions)])
        self.metrics.in_flight.inc()
        try:
            vectors: dict[int, Embedding] = {}
            while len(vectors) < len(prompts):
                for item in gen.take(POLL_SECONDS):
                    if isinstance(item, p.APIError):
                        raise item
                    if isinstance(item, Exception):
                        raise p.APIError(500, f"The engine failed: {item}", code="engine_failed")
                    vectors[item.index] = item
            gen.ended = True
        finally:
            self.finish(gen)
        tokens = sum(e.prompt_tokens for e in vectors.values())
        return {"object": "list", "model": self.config.served_name,
                "data": [{"object": "embedding", "index": i,
                          "embedding": p.embedding_json(vectors[i].vector, req.encoding_format)}
                         for i in range(len(prompts))],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def finish(self, gen: Generation) -> None:
        self.metrics.in_flight.dec()
        if not gen.ended:
            self.metrics.cancelled.inc()
            self.engine.abort(gen)

    # ---- generations to responses ----------------------------------------------------------------

    def takes(self, gen: Generation, environ: dict, arrived: float) -> Iterator[list[Delta]]:
        """What the engine buffered for a generation, a take at a time, until all its choices finish; raises
        what ended it otherwise. Accounting is per take, not per token."""
        finished = 0
        first = True
        next_check = time.monotonic() + POLL_SECONDS
        while finished < gen.choices:
            items = gen.take(POLL_SECONDS)
            if time.monotonic() >= next_check:
                if client_gone(environ):
                    raise ClientGone()
                next_check = time.monotonic() + POLL_SECONDS
            # what the engine put before a failure that ended the generation still reaches the client
            cut = next((i for i, item in enumerate(items) if isinstance(item, Exception)), len(items))
            deltas = items[:cut]
            if deltas:
                if first:
                    self.metrics.ttft.observe(time.perf_counter() - arrived)
                    first = False
                self.metrics.generated_tokens.inc(sum(d.token_count for d in deltas))
                finished += sum(d.finish_reason is not None for d in deltas)
                gen.ended = finished == gen.choices
                yield deltas
            if cut < len(items):
                gen.ended = True
                raise items[cut]

    def complete(self, admitted: Admitted, environ: dict) -> dict:
        """The whole response of a non-streamed request."""
        req, gen = admitted.req, admitted.gen
        chat = isinstance(req, p.ChatCompletionRequest)
        texts: dict[int, list[str]] = {i: [] for i in range(gen.choices)}
        logprobs: dict[int, list] = {i: [] for i in range(gen.choices)}
        reasons: dict[int, str | None] = {}
        completion_tokens = 0
        try:
            for take in self.takes(gen, environ, admitted.arrived):
                for d in take:
                    texts[d.index].append(d.text)
                    logprobs[d.index].extend(d.logprobs or ())
                    completion_tokens += d.token_count
                    if d.finish_reason is not None:
                        reasons[d.index] = d.finish_reason
        except EngineFailed as exc:
            raise p.APIError(500, f"The engine failed: {exc}", code="engine_failed") from None
        common = {"id": gen.request_id, "created": p.now(), "model": self.config.served_name,
                  "usage": CompletionUsage.model_construct(**p.usage(admitted.prompt_tokens, completion_tokens))}
        lps = {i: p.logprobs_json(chat, logprobs[i]) if req.logprobs_count is not None else None for i in texts}
        # Built without validation, as the chunks are: a finish reason vLLM adds beyond OpenAI's list passes
        # through, as vLLM's own server passes it, rather than failing a finished answer.
        if chat:
            body = ChatCompletion.model_construct(object="chat.completion", **common, choices=[
                ChatChoice.model_construct(index=i, message=ChatCompletionMessage.model_construct(
                    role="assistant", content="".join(texts[i])), logprobs=lps[i], finish_reason=reasons.get(i))
                for i in texts])
        else:
            body = Completion.model_construct(object="text_completion", **common, choices=[
                CompletionChoice.model_construct(index=i, text="".join(texts[i]), logprobs=lps[i],
                                                 finish_reason=reasons.get(i)) for i in texts])
        return body.model_dump(mode="json", exclude_unset=True)

    def first_take(self, admitted: Admitted, environ: dict) -> Iterator[list[Delta]]:
        """Wait for the first output before a stream's headers go out, so early failures keep their status."""
        takes = self.takes(admitted.gen, environ, admitted.arrived)
        try:
            first = next(takes)
        except EngineFailed as exc:
            raise p.APIError(500, f"The engine failed: {exc}", code="engine_failed") from None

        def chained():
            yield first
            yield from takes

        return chained()
