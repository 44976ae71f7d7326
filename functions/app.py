"""The function's Flask app: OpenAI-compatible routes, probes, metrics and a CloudEvents route.

`create_app` returns at once; the engine loads on its own thread, so /healthz answers from the first
moment and /readyz turns 200 when the engine has loaded and served its warm-up generation.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from flask import Flask, Response, after_this_request, jsonify, request
from openai.types import Completion, CompletionChoice, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice, ChoiceDelta
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from werkzeug.exceptions import HTTPException

from thaw.cache_warmer.prewarm import read_into_page_cache
from thaw.eventing import events
from thaw.json_body import InvalidJSON, decode
from thaw.spec import EngineArgs, S3Origin
from thaw.vllm_platform import detect, gpu_memory

from . import protocol as p
from .engine_plan import arch_id
from .engine import Delta, Engine, EngineFailed, Generation, Sampling
from .metrics import FunctionMetrics

log = logging.getLogger("thaw.function")

POLL_SECONDS = 0.2  # how often a waiting request checks that its client is still there


@dataclass(frozen=True)
class CacheSettings:
    """Where a replica finds its weights when it boots from a source rather than a folder."""

    root: Path
    capacity: int
    s3: S3Origin = S3Origin()
    prewarm: bool = True
    dram_root: Path | None = None


@dataclass(frozen=True)
class FunctionConfig:
    model_dir: Path | None
    served_name: str
    engine: EngineArgs = EngineArgs()
    source: str | None = None  # s3://... or a folder, staged through the cache tier at boot
    cache: CacheSettings | None = None
    max_body_bytes: int = 32 << 20  # a larger request body is a 413


def weights_fetcher(config: FunctionConfig):
    """The boot step of a replica: its weights (ensured in the cache tier when it has a source: instant when
    pre-staged, leased for this process's life; otherwise read into the page cache where they are) and,
    with a cache tier, vLLM's compile cache in the tier, per architecture and engine configuration: compiled
    artifacts depend on those, not on weight values, so a new weights version finds them (on a GPU the
    engine starts from the architecture's view, functions/engine_plan.py, so vLLM's own key agrees)."""

    def fetch() -> tuple[Path, dict[str, float]]:
        from thaw.cache_warmer.tier import CacheTier

        timings: dict[str, float] = {}
        if config.source:
            from thaw.cache_warmer.ensure import ensure
            from thaw.cache_warmer.origins import origin_for
            from thaw.cache_warmer.stager import StageSettings, link_rate

            tier = CacheTier(config.cache.root, config.cache.capacity)
            result = ensure(tier, origin_for(config.source, config.cache.s3), lease_pid=os.getpid(),
                            prewarm=config.cache.prewarm, dram_root=config.cache.dram_root,
                            settings=StageSettings(bandwidth=link_rate(config.cache.s3.bandwidthMbps)))
            log.info("weights of %s at %s (%s)", config.source, result.path,
                     "staged now" if result.staged else "already staged")
            path, timings = result.path, result.timings
        else:
            path = config.model_dir
            if detect().gpu:  # read on in the background: the engine initialises meanwhile, without weights
                threading.Thread(target=read_into_page_cache, args=(path,), daemon=True).start()
            else:
                read_into_page_cache(path)
            if config.cache is None:
                return path, timings
            tier = CacheTier(config.cache.root, config.cache.capacity)
        platform = detect()
        compile_dir = tier.compile_dir(arch_id(path), platform.resolve(config.engine).config_id(platform.vllm))
        # vLLM points Inductor and Triton at its cache only on the paths where it compiles; kernels JIT-compiled
        # elsewhere (the sampler's, attention's) would land in the home folder and be lost with the node.
        os.environ.update({"VLLM_CACHE_ROOT": str(compile_dir), "TRITON_CACHE_DIR": str(compile_dir / "triton"),
                           "TORCHINDUCTOR_CACHE_DIR": str(compile_dir / "inductor")})
        log.info("vLLM's compile cache at %s", compile_dir)
        return path, timings

    return fetch


class ClientGone(Exception):
    """The client closed its connection; its generation is aborted."""


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


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _sse_chunk(chunk: ChatCompletionChunk | Completion) -> str:
    # Chunks are built without validation, as the openai SDK reads them: a completion chunk's
    # finish_reason is null until its last chunk, which the type (shared with whole responses) does not allow.
    return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"


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

    def start(self, kind: type, data: Any) -> tuple[Any, Generation, int, float]:
        """Validate a request body and put its generation in the engine."""
        arrived = time.perf_counter()
        req = p.parse_request(kind, data)
        if req.model != self.config.served_name:
            raise p.model_not_found(req.model)
        self.engine._check_serving()
        chat = isinstance(req, p.ChatCompletionRequest)
        prompts = self._chat_prompt(req) if chat else self._completion_prompts(req)
        max_tokens = self._max_tokens(prompts, req.output_limit)
        sampling = [
            Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                     stop=tuple(req.stop_list()), seed=None if req.seed is None else req.seed + i,
                     presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                     logprobs=req.logprobs_count, ignore_eos=req.ignore_eos, top_k=req.top_k, min_p=req.min_p,
                     repetition_penalty=req.repetition_penalty, min_tokens=req.min_tokens,
                     stop_token_ids=tuple(req.stop_token_ids or ()),
                     include_stop_str_in_output=req.include_stop_str_in_output,
                     skip_special_tokens=req.skip_special_tokens,
                     spaces_between_special_tokens=req.spaces_between_special_tokens)
            for i in range(req.n)
        ]
        gen = self.engine.submit(p.new_id("chatcmpl" if chat else "cmpl"), prompts, sampling)
        self.metrics.in_flight.inc()

        @after_this_request
        def clean_up_on_close(response: Response) -> Response:
            # One clean-up for every way the response ends: answered, streamed to the end, failed, or
            # its client gone (then the engine stops generating for nobody).
            response.call_on_close(lambda: self.finish(gen))
            return response

        return req, gen, sum(len(ids) for ids in prompts), arrived

    def finish(self, gen: Generation) -> None:
        self.metrics.in_flight.dec()
        if not gen.ended:
            self.engine.abort(gen)

    # ---- generations to responses ----------------------------------------------------------------

    def deltas(self, gen: Generation, environ: dict, arrived: float) -> Iterator[Delta]:
        """Every delta of a generation until all its choices finish; raises what ended it otherwise."""
        finished = 0
        first = True
        next_check = time.monotonic() + POLL_SECONDS
        while finished < gen.choices:
            item = gen.next(POLL_SECONDS)
            if time.monotonic() >= next_check:
                if client_gone(environ):
                    raise ClientGone()
                next_check = time.monotonic() + POLL_SECONDS
            if item is None:
                continue
            if isinstance(item, Exception):
                gen.ended = True
                raise item
            if first:
                self.metrics.ttft.observe(time.perf_counter() - arrived)
                first = False
            self.metrics.generated_tokens.inc(item.token_count)
            if item.finish_reason is not None:
                finished += 1
                gen.ended = finished == gen.choices
            yield item

    def complete(self, req, gen: Generation, prompt_tokens: int, arrived: float, environ: dict) -> dict:
        """The whole response of a non-streamed request."""
        chat = isinstance(req, p.ChatCompletionRequest)
        texts: dict[int, list[str]] = {i: [] for i in range(gen.choices)}
        logprobs: dict[int, list] = {i: [] for i in range(gen.choices)}
        reasons: dict[int, str | None] = {}
        completion_tokens = 0
        try:
            for d in self.deltas(gen, environ, arrived):
                texts[d.index].append(d.text)
                logprobs[d.index].extend(d.logprobs or ())
                completion_tokens += d.token_count
                if d.finish_reason is not None:
                    reasons[d.index] = d.finish_reason
        except EngineFailed as exc:
            raise p.APIError(500, f"The engine failed: {exc}", code="engine_failed") from None
        common = {"id": gen.request_id, "created": p.now(), "model": self.config.served_name,
                  "usage": CompletionUsage.model_construct(**p.usage(prompt_tokens, completion_tokens))}
        lps = {i: _logprobs(chat, logprobs[i]) if req.logprobs_count is not None else None for i in texts}
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

    def first_delta(self, gen: Generation, environ: dict, arrived: float) -> Iterator[Delta]:
        """Wait for the first delta before a stream's headers go out, so early failures keep their status."""
        stream = self.deltas(gen, environ, arrived)
        try:
            first = next(stream)
        except EngineFailed as exc:
            raise p.APIError(500, f"The engine failed: {exc}", code="engine_failed") from None

        def chained():
            yield first
            yield from stream

        return chained()

    def stream(self, req, gen: Generation, prompt_tokens: int, deltas: Iterator[Delta]) -> Iterator[str]:
        """Server-sent events: one chunk per delta, usage if asked, an error chunk if the engine fails."""
        chat = isinstance(req, p.ChatCompletionRequest)
        common = {"id": gen.request_id, "created": p.now(), "model": self.config.served_name}
        if req.include_usage:
            common["usage"] = None  # on every chunk, as OpenAI sends it; the last chunk carries the counts

        def chunk(index: int, text: str | None, finish_reason: str | None, logprobs, role: str | None = None) -> str:
            if chat:
                delta = ChoiceDelta.model_construct(**({"role": role} if role else {}),
                                                    **({"content": text} if text is not None else {}))
                return _sse_chunk(ChatCompletionChunk.model_construct(object="chat.completion.chunk", **common, choices=[
                    ChunkChoice.model_construct(index=index, delta=delta, logprobs=logprobs,
                                                finish_reason=finish_reason)]))
            return _sse_chunk(Completion.model_construct(object="text_completion", **common, choices=[
                CompletionChoice.model_construct(index=index, text=text, logprobs=logprobs,
                                                 finish_reason=finish_reason)]))

        completion_tokens = 0
        try:
            if chat:
                for i in range(gen.choices):
                    yield chunk(i, "", None, None, role="assistant")
            for d in deltas:
                completion_tokens += d.token_count
                lp = _logprobs(chat, list(d.logprobs)) if d.logprobs is not None else None
                text = d.text if d.text or d.finish_reason is None or not chat else None
                yield chunk(d.index, text, d.finish_reason, lp)
            if req.include_usage:
                usage = CompletionUsage.model_construct(**p.usage(prompt_tokens, completion_tokens))
                last = ChatCompletionChunk if chat else Completion
                yield _sse_chunk(last.model_construct(object="chat.completion.chunk" if chat else "text_completion",
                                                      **{**common, "usage": usage}, choices=[]))
        except ClientGone:
            return
        except (EngineFailed, p.APIError) as exc:
            message = f"The engine failed: {exc}" if isinstance(exc, EngineFailed) else exc.message
            yield _sse(p.error_body(message, "server_error", None, "engine_failed"))
        yield _sse("[DONE]")


def _logprobs(chat: bool, tokens: list) -> dict:
    if chat:
        return {"content": [
            {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()),
             "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())} for s, lp in t.top]}
            for t in tokens]}
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}


def _gpu_held() -> dict | None:
    """This replica's GPU memory (its own processes') and the card's, in bytes; None without a GPU."""
    memory = gpu_memory()
    if memory is None:
        return None
    return {"held": memory.held_by(os.getpid()), "free": memory.free, "total": memory.total}


def _json_body() -> Any:
    if request.mimetype != "application/json":
        raise p.APIError(415, f"Content-Type must be application/json, got '{request.mimetype or 'none'}'",
                         code="unsupported_media_type")
    try:
        return decode(request.get_data())
    except InvalidJSON as exc:
        raise p.APIError(400, f"The request body is {exc.message}", param=exc.param,
                         code="invalid_json" if exc.param is None else "invalid_value") from None


def create_app(config: FunctionConfig, engine: Engine | None = None) -> Flask:
    """The function's WSGI app. Starts loading the engine unless one is given."""
    app = Flask("thaw.function")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    metrics = FunctionMetrics()
    # The launcher stamps the wall-clock time before exec; the gap to here is process start.
    launched = os.environ.get("THAW_LAUNCH_TIME")
    phases = {"process_start": max(0.0, time.time() - float(launched))} if launched else {}
    # vLLM's kernel registration calls hasattr() on every module global; on werkzeug's context-local
    # proxies (flask.request, ...) that raises outside a request, so the engine loads inside one.
    engine = engine or Engine(config.engine, weights_fetcher(config), load_context=app.test_request_context,
                              phases=phases, served_name=config.served_name,
                              view_root=config.cache.root / "views" if config.cache else None).start()
    service = FunctionService(config, engine, metrics)
    app.extensions["thaw"] = service

    def openai(kind: type):
        req, gen, prompt_tokens, arrived = service.start(kind, _json_body())
        environ = request.environ
        if not req.stream:
            return jsonify(service.complete(req, gen, prompt_tokens, arrived, environ))
        deltas = service.first_delta(gen, environ, arrived)
        return Response(service.stream(req, gen, prompt_tokens, deltas), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.add_url_rule("/v1/chat/completions", "chat", lambda: openai(p.ChatCompletionRequest), methods=["POST"])
    app.add_url_rule("/v1/completions", "completions", lambda: openai(p.CompletionRequest), methods=["POST"])

    def model_card() -> dict:
        return {"id": config.served_name, "object": "model", "created": service.created, "owned_by": "thaw",
                "root": config.source or str(config.model_dir), "max_model_len": engine.max_model_len or None}

    @app.get("/v1/models")
    def list_models():
        return jsonify({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/<path:model_id>")
    def get_model(model_id: str):
        if model_id != config.served_name:
            raise p.model_not_found(model_id)
        return jsonify(model_card())

    @app.get("/healthz")
    def healthz():
        if engine.state == "failed":
            return jsonify({"status": "failed", "error": engine.error}), 500
        return jsonify({"status": "alive"})

    @app.get("/readyz")
    def readyz():
        status = 200 if engine.state == "ready" else 503
        body = {"status": engine.state, "error": engine.error, "phases": engine.phases}
        return Response(json.dumps(body), status, mimetype="application/json")  # keeps the phases in order

    # vLLM's own routes for its sleep mode (its server has them in dev mode), used by the serving plane to
    # park (level 1) or hibernate (level 2; on a parked engine: drop its host copy) an idle replica and wake
    # it for the next request.
    @app.post("/sleep")
    def sleep():
        level = request.args.get("level", "1")
        if not level.isdigit():
            raise p.APIError(400, f"level must be 1 or 2, got {level!r}", param="level")
        seconds = engine.park(int(level))
        return jsonify({"is_sleeping": True, "level": engine.sleep_level, "seconds": seconds, "gpu": _gpu_held()})

    @app.post("/wake_up")
    def wake_up():
        seconds = engine.wake()
        return jsonify({"is_sleeping": False, "seconds": seconds, "gpu": _gpu_held()})

    @app.post("/reserve_host")
    def reserve_host():
        return jsonify({"bytes": engine.reserve_host()})

    @app.get("/is_sleeping")
    def is_sleeping():
        return jsonify({"is_sleeping": engine.state == "parked", "level": engine.sleep_level})

    @app.get("/metrics")
    def metrics_route():
        for phase, seconds in engine.phases.items():
            metrics.start_phase.labels(phase).set(seconds)
        metrics.engine_requests.set(engine.active_requests())
        metrics.parked.set(engine.state == "parked")
        # vLLM's own metrics (its stat logger registers them in prometheus_client's global registry) after thaw's
        return Response(generate_latest(metrics.registry) + generate_latest(REGISTRY), mimetype=CONTENT_TYPE_LATEST)

    @app.post("/")
    def cloudevent():
        try:
            event = events.parse_http_event(request.headers, request.get_data())
        except events.InvalidEvent as exc:
            raise p.APIError(400, str(exc), code="invalid_cloudevent") from None
        if event.get_type() != events.INFERENCE_REQUEST:
            raise p.APIError(400, f"unsupported event type '{event.get_type()}': this function accepts "
                                  f"{events.INFERENCE_REQUEST}", code="unsupported_event_type")
        data = event.get_data()
        if not isinstance(data, dict):
            raise p.APIError(400, "the event's data must be an OpenAI request body (a JSON object)",
                             code="invalid_cloudevent")
        data = {"model": config.served_name, **data}
        if data.get("stream"):
            raise p.APIError(400, "streaming is not available through events", param="stream")
        kind = p.ChatCompletionRequest if "messages" in data else p.CompletionRequest
        req, gen, prompt_tokens, arrived = service.start(kind, data)
        body = service.complete(req, gen, prompt_tokens, arrived, request.environ)
        reply = events.make_event(events.INFERENCE_RESPONSE, f"/thaw/models/{config.served_name}", body,
                                  **{events.EXT_REQUEST_ID: events.request_id(event), events.EXT_MODEL: config.served_name})
        headers, payload = events.to_http(reply)
        return Response(payload, 200, headers)

    @app.errorhandler(p.APIError)
    def api_error(exc: p.APIError):
        return jsonify(exc.body()), exc.status, exc.headers

    @app.errorhandler(ClientGone)
    def client_left(exc: ClientGone):
        # Nobody reads this answer; 499 is what nginx (and Knative's queue-proxy logs) call it.
        return Response(status=499)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        kind = "not_found_error" if exc.code == 404 else "invalid_request_error"
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}  # 405's Allow
        return jsonify(p.error_body(exc.description or exc.name, kind, None, None)), exc.code, headers

    @app.errorhandler(Exception)
    def internal_error(exc: Exception):
        log.exception("unhandled error")
        return jsonify(p.error_body("The server had an error processing your request", "server_error")), 500

    @app.after_request
    def count(response: Response):
        rule = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(rule, str(response.status_code)).inc()
        return response

    return app
