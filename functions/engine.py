"""The engine adapter: one vLLM engine, owned by one thread, shared by every request thread.

vLLM's `LLMEngine` is not thread-safe, so a single engine thread owns it: request threads post
commands (add, abort) to a queue, the engine thread hands them to the engine and hands each step's
token deltas to the requests' own queues. Every running request joins the next step, which is vLLM's
continuous batching; a request aborted by its client leaves the batch at the next step. With the engine
core in a process of its own, the thread waits for commands and for the core's outputs alike, so a request
reaches the core while it computes a step (`_notify_outputs`).

With `engine_core="inproc"` the engine core runs inside this process (no engine-core process to spawn,
no second import of torch and vLLM: the fast start); with `"mp"` vLLM runs it in a process of its own.

Where the platform has vLLM's sleep mode and the engine was started with it, the engine can sleep (its
weights and KV cache off the GPU): parked when it holds a host copy of its weights, hibernated otherwise
(functions/engine_sleep.py); a request that finds it asleep wakes it first, so a sleeping replica never
refuses work. On a GPU the engine starts as functions/engine_plan.py plans it (dummy weights streamed over by
the real ones, a KV cache sized for the replica's batch) with thaw's worker extension (functions/worker_ext.py).
An engine-core process that dies, awake or asleep, fails the engine at once with its cause
(functions/engine_watch.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from thaw.openai_wire import LOADING_HEADER
from thaw.spec import EngineArgs
from thaw.vllm_platform import detect, gpu_memory

from .engine_plan import WORKER_EXTENSION
from .engine_sleep import AWAKE, EngineSleep, load_weights
from .engine_watch import EngineCoreWatch
from .generations import Delta, Embed, Embedding, EngineFailed, Generation, TokenLogprob
from .protocol import APIError

OUTPUT = ("output",)  # on the command queue: the engine core's outputs of a step have arrived

log = logging.getLogger("thaw.function.engine")


def max_token_bytes(tokenizer) -> int:
    """The most bytes of UTF-8 text one token can stand for: every token's string (its byte-level or
    SentencePiece spelling) has one character per byte of text or more, and a character is at most 4
    bytes. So a text of B bytes is at least B / this many tokens: a bound that refuses a prompt too long
    for the context without tokenizing it, and never refuses one that fits."""
    return 4 * max(len(token) for token in tokenizer.get_vocab())


def _timed(fn, *args) -> float:
    """Seconds `fn(*args)` took."""
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


class Engine:
    """Loads vLLM in the background and serves generations once it is ready."""

    def __init__(self, args: EngineArgs, fetch_weights, load_context=contextlib.nullcontext,
                 phases: dict[str, float] | None = None, served_name: str | None = None,
                 view_root: Path | None = None, adoptable: bool = False):
        """`fetch_weights` returns (model dir, its phase timings): the weights ensured in the cache tier or
        read into the page cache where they are (functions/boot.py's weights_fetcher). `served_name` is the
        `model_name` label of vLLM's metrics. `view_root` (in the cache tier) holds the per-architecture
        model views a GPU engine starts from (functions/engine_plan.py). `adoptable`: the engine is built on
        dummy weights and waits, without weights (hibernated where the platform can sleep), for a model of its
        key to adopt it (`adopt`; functions/pool.py)."""
        self.model_dir: Path | None = None
        self.view_root = view_root
        self.stream_weights = False  # the weights go in through thaw's worker extension, not vLLM's loader
        self._sleep: EngineSleep | None = None  # where the engine can sleep: its sleep, wake and host copy
        self._watch: EngineCoreWatch | None = None
        self.served_name = served_name
        self.metrics_name = served_name  # what vLLM's stat logger was built with (an adopter serves another name)
        self.adoptable = adoptable
        self._fetch_weights = fetch_weights
        self.args = detect().resolve(args)
        self._load_context = load_context
        # loading -> ready | pooled | failed; pooled -> ready (adopted); ready <-> parked (asleep: see
        # sleep_level); -> failed | stopped
        self.state = "loading"
        self.error: str | None = None
        self.phases: dict[str, float] = dict(phases or {})  # start-up phase -> seconds, in order
        # start-up events -> wall-clock time: beside the launch and the plane's own marks, where the wall went
        # (the weights are read while vLLM imports, so the phases' seconds do not add up to it)
        self.marks: dict[str, float] = {"app": time.time()}
        self.max_model_len = args.max_model_len or 0
        self.tokenizer = None
        self._tokenizer_lock = threading.Lock()
        self._fail_lock = threading.Lock()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # engine request id -> (its generation, choice index, logprobs asked for)
        self._routes: dict[str, tuple[Generation, int, int | None]] = {}
        self._thread = threading.Thread(target=self._run, name="vllm-engine", daemon=True)
        self._engine = None

    def start(self) -> "Engine":
        self._thread.start()
        return self

    # ---- request threads -------------------------------------------------------------------------

    @property
    def pooling(self) -> bool:
        """Whether the model is served by vLLM's pooling runner (embeddings) rather than generating."""
        return self._engine is not None and self._engine.model_config.runner_type == "pooling"

    @property
    def matryoshka(self) -> bool:
        """Whether the embedding model can shorten its vectors (OpenAI's `dimensions`)."""
        return bool(getattr(self._engine.model_config, "is_matryoshka", False))

    def submit(self, request_id: str, prompts: list[list[int]], sampling: list[dict | Embed]) -> Generation:
        """Start one generation: each prompt with each choice's sampling (vLLM's SamplingParams by name, from the
        request: protocol.py; choice index = prompt * n + i); for an embedding model, each prompt with one Embed."""
        self.ensure_serving()
        gen = Generation(request_id, choices=len(prompts) * len(sampling))
        self._commands.put(("add", gen, prompts, sampling))
        return gen

    # Text is encoded by the Rust tokenizer under vLLM's (HF's) tokenizer: HF's own `encode` sets truncation
    # on it for every call, so concurrent calls collide, while the Rust `encode` may run in many threads at
    # once and lets go of the GIL. A long prompt (up to max_prompt_bytes) then holds up only its own request.
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return backend.encode(text, add_special_tokens=add_special_tokens).ids
        with self._tokenizer_lock:  # a slow (Python) tokenizer: one call at a time
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def tokenize_chat(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenize(text, add_special_tokens=False)

    @functools.cached_property
    def max_prompt_bytes(self) -> int:
        """The most bytes of text that can fit in max_model_len tokens. Reading the vocabulary takes tens of
        milliseconds, so it is read for the first prompt that might not fit, never at start-up."""
        return self.max_model_len * max_token_bytes(self.tokenizer)

    def may_fit(self, text_bytes: int) -> bool:
        """False for text too long for the context whatever it says: decided without tokenizing it. Every
        token's spelling has a character or more, so text under 4 bytes per position always may fit."""
        return text_bytes <= 4 * self.max_model_len or text_bytes <= self.max_prompt_bytes

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def active_requests(self) -> int:
        """Engine requests (one per choice) in the engine now."""
        return len(self._routes)

    @property
    def sleep_level(self) -> int:
        """0 awake, 1 parked (asleep with a host copy), 2 hibernated (asleep without one)."""
        return self._sleep.level if self._sleep else AWAKE

    @property
    def host_copy(self) -> dict:
        """The host copy of the weights: its bytes (0: none) and whether it is built."""
        return {"bytes": self._sleep.copy_bytes if self._sleep else 0,
                "ready": bool(self._sleep and self._sleep.copy_ready)}

    @property
    def engine_pid(self) -> int | None:
        """The engine-core process, where it has one of its own: its death ends the engine for good (a gunicorn
        worker that dies with an in-process engine is replaced by gunicorn, which loads the engine again)."""
        return self._watch.pid if self._watch else None

    def abort(self, gen: Generation) -> None:
        """Remove a generation from the engine (its client went away); a no-op once finished."""
        if self.state == "ready":
            self._commands.put(("abort", gen))

    def park(self, level: int = 1) -> float:
        """Put the engine to sleep; the seconds it took. Level 1 keeps its host copy (parked if the copy is
        complete, else hibernated), level 2 drops it (hibernated; on a sleeping engine: without a wake)."""
        self._check_sleeps()
        if level not in (1, 2):
            raise APIError(400, f"level must be 1 or 2, got {level}", param="level")
        return self._engine_call("sleep", level)

    def build_host_copy(self) -> int:
        """The host copy of the weights, built while the engine is idle, awake or asleep; its bytes, once built.
        Waits for it (a request's path never does: the plane asks in the background)."""
        self._check_sleeps()
        return self._engine_call("copy", timeout=None)

    def drop_host_copy(self) -> int:
        """Give the host copy back to the system (a parked engine becomes hibernated); the bytes released."""
        self._check_sleeps()
        return self._engine_call("drop")

    def wake(self) -> dict:
        """Wake a sleeping engine: the seconds it took and the rung it woke from (0: it was awake)."""
        return self._engine_call("wake")

    def adopt(self, model_dir: Path, served_name: str) -> dict:
        """A pooled engine becomes `served_name`'s, with the weights in `model_dir` (a model of its key:
        engine_plan.engine_key); the seconds it took."""
        if self.state != "pooled":
            raise APIError(409, f"This engine cannot be adopted: it is {self.state}", code="engine_not_pooled")
        done: Future = Future()
        self._commands.put(("adopt", done, Path(model_dir), served_name))
        return done.result(timeout=600)

    def release(self) -> None:
        """Back to the pool: an idle engine gives up its model (asleep, its host copy too) and waits to be adopted
        again; nothing of the model stays reachable (an adoption resets the prefix cache)."""
        if self.state not in ("ready", "parked"):
            raise APIError(409, f"This engine cannot be released: it is {self.state}", code="engine_not_releasable")
        if detect().gpu and not self.stream_weights:  # the CPU build reloads any checkpoint in place
            raise APIError(409, "This engine's weights load through vLLM's own loader: it cannot be adopted",
                           code="engine_not_releasable")
        done: Future = Future()
        self._commands.put(("release", done))
        done.result(timeout=600)

    def _check_sleeps(self) -> None:
        if not (self.args.enable_sleep_mode and detect().sleep_mode):
            raise APIError(400, "This engine runs without sleep mode: set `park: true` on the model, on a "
                                "platform whose vLLM has sleep mode (CUDA)", code="sleep_mode_off")

    def _engine_call(self, what: str, *args, timeout: float | None = 600):
        if self.state not in ("ready", "parked"):
            self.ensure_serving()
        done: Future = Future()
        self._commands.put((what, done, *args))
        return done.result(timeout=timeout)

    def stop(self, timeout: float = 30) -> None:
        """Abort everything, shut the engine (and an engine-core process) down, join the thread."""
        if self._thread.is_alive():
            self._commands.put(("stop",))
            self._thread.join(timeout)

    def ensure_serving(self) -> None:
        if self.state == "parked":
            self.wake()
            return
        if self.state in ("loading", "pooled"):
            raise APIError(503, "The model is still loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "1", LOADING_HEADER: "1"})
        if self.state != "ready":
            raise APIError(500, f"The engine is not available: {self.error or self.state}",
                           type="server_error", code="engine_failed")

    # ---- the engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        self.marks["engine_thread"] = time.time()
        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001 - any load failure ends serving; report it
            log.exception("engine failed to load")
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            return
        if self.args.engine_core == "mp":
            self._watch = EngineCoreWatch(self._engine, self._fail).start()
        self.marks["ready"] = time.time()
        self.state = "pooled" if self.adoptable else "ready"
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - a broken engine fails its requests, not the process
            log.exception("engine failed")
            self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            self._shutdown_engine()

    def _fail(self, error: str) -> None:
        with self._fail_lock:
            if self.state == "failed":
                return
            self.state, self.error = "failed", error
            self._fail_all(EngineFailed(error))

    def _load(self) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if self.args.engine_core == "mp" else "0"
        for key, value in detect().engine_env(self.args.kv_cache_gib, self.args.enable_sleep_mode).items():
            os.environ.setdefault(key, value)
        # Reading the weights into the page cache is I/O: it overlaps with the CPU-bound imports.
        t = time.perf_counter()
        weights = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights")
        read = weights.submit(_timed, self._weights)
        import vllm  # noqa: F401 - timed on its own: in a standby process this costs nothing
        from vllm.engine.llm_engine import LLMEngine
        from vllm.usage.usage_lib import UsageContext

        self.phases["imports"] = time.perf_counter() - t
        self.marks["imported"] = time.time()
        detect().prepare_engine_process()
        self.phases["weights"] = read.result()
        self.marks["weights_ready"] = time.time()
        weights.shutdown()
        t = time.perf_counter()
        # Stats on: vLLM's own Prometheus metrics (vllm:time_to_first_token_seconds, ...) are what existing
        # dashboards and autoscalers read; /metrics serves them beside thaw's.
        # thaw's worker extension on every build: on a GPU its steps of the ladder; on the CPU build, where
        # vLLM spawns its worker processes, importing it there asks for what vLLM's kernels need first.
        kwargs = {"model": str(self.model_dir), "worker_extension_cls": WORKER_EXTENSION, **self.args.vllm_kwargs()}
        if detect().gpu:
            kwargs.update(self._gpu_plan(kwargs))
        elif self.adoptable:  # the CPU build: dummy weights, overwritten at the adoption
            kwargs.update(load_format="dummy", tokenizer=str(self.model_dir), model=str(self._view()))
            self.stream_weights = True
        if self.adoptable and not self.stream_weights:
            raise RuntimeError("this model's engine cannot wait to be adopted: its weights load through vLLM's "
                               "own loader (a quantized or non-safetensors checkpoint)")
        engine_args = vllm.EngineArgs(served_model_name=self.served_name, disable_log_stats=False, **kwargs)
        with self._load_context():
            # As vLLM's OpenAI server: its defaults for a server (the prefill chunk per step, the batch), not
            # the offline ones, whose larger prefill chunks stall every stream's next token behind a prompt.
            self._engine = LLMEngine.from_engine_args(engine_args, usage_context=UsageContext.OPENAI_API_SERVER)
        self.tokenizer = self._engine.get_tokenizer()
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # tokenize() calls it directly: a padding or truncation stored in tokenizer.json
            backend.no_padding()  # (sentence-transformers' models have both) would change what a request says
            backend.no_truncation()
        self.max_model_len = self._engine.model_config.max_model_len
        self.phases["engine_init"] = time.perf_counter() - t
        self.marks["engine_built"] = time.time()
        if self.args.enable_sleep_mode and detect().sleep_mode:
            self._sleep = EngineSleep(self._engine, self.model_dir, self.stream_weights)
        if self.stream_weights and not self.adoptable:
            t = time.perf_counter()
            load_weights(self._engine, self.model_dir, stream_weights=True)
            self.phases["weights_to_gpu"] = time.perf_counter() - t
            self.marks["weights_in"] = time.time()
        t = time.perf_counter()
        self._warm_up()
        self.phases["warmup"] = time.perf_counter() - t
        if self.adoptable and self._sleep is not None:
            self._sleep.sleep(keep_copy=False)  # its dummy weights and KV cache off the GPU: a context waiting
        log.info("engine ready: %s", ", ".join(f"{k} {v:.2f}s" for k, v in self.phases.items()))

    def _view(self) -> Path:
        from .engine_plan import ensure_view

        return ensure_view(self.view_root, self.model_dir) if self.view_root else self.model_dir

    def _weights(self) -> None:
        self.model_dir, timings = self._fetch_weights()
        self.phases.update(timings)

    def _gpu_plan(self, kwargs: dict) -> dict:
        from .engine_plan import ensure_view, gpu_plan
        from .weights import fast_load_problem

        problem = fast_load_problem(self.model_dir)
        view = ensure_view(self.view_root, self.model_dir) if self.view_root and problem is None else None
        config_path = self.model_dir / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        weights = sum(p.stat().st_size for p in self.model_dir.glob("*.safetensors"))
        memory = gpu_memory()
        plan = gpu_plan(kwargs, self.model_dir, view, problem, config, weights, memory.total if memory else None)
        for note in plan.notes:
            log.info("%s", note)
        self.stream_weights = plan.stream_weights
        return plan.kwargs

    def _warm_up(self) -> None:
        """One short request (a generation, or an embedding): /readyz promises a replica that has answered one."""
        self._engine.add_request("warmup", {"prompt_token_ids": [0, 1, 2, 3]},
                                 self._params(Embed() if self.pooling else {"max_tokens": 2, "temperature": 0}))
        while self._engine.has_unfinished_requests():
            self._engine.step()

    def _notify_outputs(self) -> queue.Queue | None:
        """With the engine core in a process of its own, vLLM's sync client queues each step's outputs from a
        thread of its own; `step()` blocks on that queue. Each arrival now also wakes this thread (an OUTPUT on
        the command queue), so the thread waits on its commands alone and steps only for outputs that are there:
        a request that arrives while the core computes a step reaches the core at once and joins the next
        step, as with vLLM's own server, instead of waiting for that step's outputs and joining the step after.
        None where the client has no such queue (the engine core in-process: its step() runs the model)."""
        outputs = getattr(getattr(self._engine, "engine_core", None), "outputs_queue", None)
        if not isinstance(outputs, queue.Queue):
            return None
        put, commands = outputs.put_nowait, self._commands

        def put_and_wake(item) -> None:
            put(item)
            commands.put(OUTPUT)

        outputs.put_nowait = put_and_wake  # the client's output thread looks it up on the queue at each put
        return outputs

    def _serve(self) -> None:
        outputs = self._notify_outputs()
        while True:
            if outputs is not None:  # every output there (some may predate the wake-ups) before waiting again
                while outputs.qsize():
                    self._dispatch(self._engine.step())
            busy = self._engine.has_unfinished_requests()
            building = self._sleep is not None and self._sleep.building
            # A host copy is built only while the engine is idle. Busy, the step that follows blocks for its
            # outputs, unless their arrival wakes this thread.
            block = (busy and outputs is not None) or (not busy and not building)
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                command = None
                if not busy and building:
                    self._sleep.copy_step()
            while command is not None:
                if command is OUTPUT:
                    pass  # stepped for at the top of the loop
                elif command[0] == "stop":
                    self._fail_all(EngineFailed("the function is shutting down"))
                    self.state = "stopped"
                    return
                else:
                    self._apply(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if outputs is None and self._engine.has_unfinished_requests():
                self._dispatch(self._engine.step())

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, gen, prompts, sampling = command
            n = len(sampling)
            for p, prompt in enumerate(prompts):
                for i, s in enumerate(sampling):
                    engine_id = f"{gen.request_id}-{p * n + i}"
                    try:
                        self._engine.add_request(engine_id, {"prompt_token_ids": prompt}, self._params(s))
                    except Exception as exc:  # noqa: BLE001 - a request vLLM refuses fails alone
                        self._abort(gen)
                        gen.put([APIError(400, str(exc), param=getattr(exc, "parameter", None))])
                        return
                    self._routes[engine_id] = (gen, p * n + i, s.get("logprobs") if isinstance(s, dict) else None)
        elif command[0] == "abort":
            self._abort(command[1])
        elif command[0] == "copy":
            try:
                self._sleep.want_copy(command[1])
            except Exception as exc:  # noqa: BLE001 - the caller gets the failure
                command[1].set_exception(exc)
        elif command[0] in ("sleep", "wake", "drop", "adopt", "release"):
            done = command[1]
            calls = {"sleep": lambda: self._sleep_now(command[2]), "wake": self._wake_now,
                     "drop": lambda: self._sleep.drop_copy(), "adopt": lambda: self._adopt_now(*command[2:]),
                     "release": self._release_now}
            try:
                done.set_result(calls[command[0]]())
            except BaseException as exc:  # noqa: BLE001 - the caller gets the failure
                done.set_exception(exc)

    def _sleep_now(self, level: int) -> float:
        if self._routes:
            raise APIError(409, f"{len(self._routes)} requests are running; park an idle engine",
                           code="engine_busy")
        try:
            seconds = self._sleep.sleep(keep_copy=level == 1)
        except BaseException as exc:
            # Whatever the sleep left on the GPU is unknown: the engine serves no more (its stop ends its
            # engine-core process without vLLM's teardown, as every stop does).
            self._fail(f"{type(exc).__name__} while going to sleep: {exc}")
            raise
        self.state = "parked"
        return seconds

    def _wake_now(self) -> dict:
        if self.state != "parked":
            return {"seconds": 0.0, "level": AWAKE}
        seconds, level = self._sleep.wake()
        self.state = "ready"
        self.phases["wake"] = seconds
        return {"seconds": seconds, "level": level}

    def _adopt_now(self, model_dir: Path, served_name: str) -> dict:
        if self.state != "pooled":
            raise APIError(409, f"This engine cannot be adopted: it is {self.state}", code="engine_not_pooled")
        t = time.perf_counter()
        self.model_dir, self.served_name = model_dir, served_name
        if self._sleep is not None:  # hibernated: a wake, from this model's files
            self._sleep.model_dir = model_dir
            self._sleep.wake()
        else:
            load_weights(self._engine, model_dir, stream_weights=True)
        # Nothing computed before is reachable: no cached prefix of the warm-up or of an earlier model (vLLM
        # resets it at a sleep only from 0.32).
        if self._engine.reset_prefix_cache() is False:
            raise RuntimeError("vLLM refused to reset its prefix cache")
        self.state = "ready"
        self.phases["adopt"] = seconds = time.perf_counter() - t
        log.info("engine adopted by %s (weights from %s) in %.2fs", served_name, model_dir, seconds)
        return {"seconds": seconds}

    def _release_now(self) -> None:
        if self._routes:
            raise APIError(409, f"{len(self._routes)} requests are running; release an idle engine",
                           code="engine_busy")
        if self._sleep is not None:
            if self.state != "parked":
                raise APIError(409, "Only a sleeping engine goes back to the pool", code="engine_not_releasable")
            self._sleep.drop_copy()  # hibernated: no weights of the model anywhere
        self.state = "pooled"
        log.info("engine released by %s: waiting to be adopted", self.served_name)

    def _abort(self, gen: Generation) -> None:
        ids = [eid for eid, (g, _, _) in self._routes.items() if g is gen]
        for eid in ids:
            del self._routes[eid]
        if ids:
            self._engine.abort_request(ids)

    @staticmethod
    def _params(s: dict | Embed):
        """vLLM's parameters for one choice: its sampling as the request gave it, its outputs as deltas."""
        from vllm import PoolingParams, SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if isinstance(s, Embed):
            return PoolingParams(task="embed", dimensions=s.dimensions)
        return SamplingParams(**s, output_kind=RequestOutputKind.DELTA)

    def _dispatch(self, outputs) -> None:
        """One step's outputs to their generations: one put, so one wake-up, per generation per step."""
        steps: dict[Generation, list] = {}
        for output in outputs:
            route = self._routes.get(output.request_id)
            if route is None:
                continue
            gen, index, k = route
            items = steps.setdefault(gen, [])
            if hasattr(output.outputs, "data"):  # a pooling output: one embedding, whole
                del self._routes[output.request_id]
                items.append(Embedding(index, output.outputs.data.tolist(), len(output.prompt_token_ids)))
                continue
            ended = output.finished and next((c.finish_reason for c in output.outputs
                                              if c.finish_reason in ("abort", "error")), None)
            if ended:
                # vLLM ended a request its client still waits for (a client's own abort removes the route
                # first): a failure, which vLLM says must reach the client as one, not as a finish_reason.
                self._abort(gen)
                items.append(EngineFailed(f"the engine ended the request ({ended})"))
                continue
            for completion in output.outputs:
                items.append(Delta(index, completion.text, len(completion.token_ids),
                                   self._logprobs(completion, k) if k is not None else None,
                                   completion.finish_reason if output.finished else None))
            if output.finished:
                del self._routes[output.request_id]
        for gen, items in steps.items():
            gen.put(items)

    def _logprobs(self, completion, k: int) -> tuple[TokenLogprob, ...]:
        """OpenAI's shape: the chosen token and the k most likely (vLLM adds the chosen one if lower)."""
        out = []
        for token_id, position in zip(completion.token_ids, completion.logprobs):
            top = sorted(((lp.rank, self._token_text(tid, lp), lp.logprob) for tid, lp in position.items()
                          if lp.rank is not None and lp.rank <= k))
            chosen = position[token_id]
            out.append(TokenLogprob(self._token_text(token_id, chosen), chosen.logprob,
                                    tuple((text, logprob) for _, text, logprob in top)))
        return tuple(out)

    def _token_text(self, token_id: int, lp) -> str:
        if lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id])

    def _fail_all(self, error: Exception) -> None:
        for gen in dict.fromkeys(g for g, _, _ in self._routes.values()):
            gen.put([error])
        self._routes.clear()

    def _shutdown_engine(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        engine, self._engine = self._engine, None
        if engine is not None:
            if self.args.engine_core == "mp":
                # At its end the engine holds nothing worth keeping (the plane drained it, gunicorn waited for its
                # requests), so its process ends at once: its GPU memory is free for the next start then, not
                # after vLLM's teardown (seconds for a large model, each block freed in turn; and a sleeping
                # engine's memory is unmapped, which that teardown would free again, printing CUDA errors).
                # Marked dead first, so vLLM's monitor does not report the end as a crash.
                resources = getattr(engine.engine_core, "resources", None)
                if resources is not None:
                    resources.engine_dead = True
                for proc in getattr(getattr(resources, "engine_manager", None), "processes", []):
                    proc.kill()
                    proc.join(5)
            try:
                engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort at exit
                log.debug("engine shutdown raised", exc_info=True)

