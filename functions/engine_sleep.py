"""An engine's sleep, wake and host copy (vLLM's sleep mode, CUDA only), on the engine's own thread.

Asleep, an engine holds its CUDA context and compiled code but neither weights nor KV cache on the GPU. It is
parked when it holds a complete host copy of its weights (the checkpoint in pinned host RAM, built ahead:
a wake is a host -> device copy), hibernated otherwise (a wake reads the files: page cache or tier). Going
to sleep copies nothing, so it takes a tenth of a second whatever the rung (functions/worker_ext.py).

The host copy is built a piece at a time between the engine's steps, only while no request is in the engine:
a request that arrives waits for one piece at most. The serving plane decides who holds one
(knative/embedded/control/parking.py): `want_copy` asks for it (awake or asleep: a hibernated engine that
builds one is parked), `drop_copy` gives it back (a parked engine is then hibernated).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from pathlib import Path

log = logging.getLogger("thaw.function.engine")

AWAKE, PARKED, HIBERNATED = 0, 1, 2


class CopyDropped(Exception):
    """The host copy being built was given back before it was complete."""


def load_weights(engine, model_dir: Path, stream_weights: bool) -> None:
    """The real weights into the engine's parameters (after a dummy start, or at a wake)."""
    if stream_weights:
        engine.collective_rpc("thaw_load_weights", args=(str(model_dir),))
    else:
        engine.collective_rpc("reload_weights")  # vLLM's own loader, from the model's files


class EngineSleep:
    def __init__(self, engine, model_dir: Path, stream_weights: bool):
        """`engine`: vLLM's LLMEngine, built with sleep mode and thaw's worker extension; `stream_weights`:
        the weights go in through the extension (else vLLM's own loader reloads them at a wake, from the files,
        and there is no host copy)."""
        self.engine = engine
        self.model_dir = model_dir
        self.stream_weights = stream_weights
        self.level = AWAKE
        self.copy_bytes = 0  # of the host copy being built or built
        self.copy_ready = False
        self._copy_waiters: list[Future] = []
        engine.collective_rpc("thaw_install")

    @property
    def building(self) -> bool:
        return self.copy_bytes > 0 and not self.copy_ready

    def sleep(self, keep_copy: bool) -> float:
        """Sleep (or, asleep already, drop the host copy when not `keep_copy`); the seconds it took."""
        t = time.perf_counter()
        if not keep_copy:
            self.drop_copy()
        if self.level == AWAKE:
            self.engine.sleep(2)  # weights and KV cache off the GPU; nothing copied out
        self.level = PARKED if self.copy_ready else HIBERNATED
        seconds = time.perf_counter() - t
        log.info("engine %s in %.2fs", "parked" if self.level == PARKED else "hibernated", seconds)
        return seconds

    def wake(self) -> tuple[float, int]:
        """Weights first, into the parameters CUDA graphs point at; the KV cache once they are in. The seconds
        it took and the rung it woke from."""
        t = time.perf_counter()
        level = self.level
        self.engine.wake_up(tags=["weights"])
        mapped = time.perf_counter()
        load_weights(self.engine, self.model_dir, self.stream_weights)
        loaded = time.perf_counter()
        self.engine.wake_up(tags=["kv_cache"])
        self.level = AWAKE
        seconds = time.perf_counter() - t
        # each step's share, for where a wake spends its time beyond the copy itself
        log.info("engine woken from %s in %.3fs (weights' memory mapped %.3f, weights in %.3f, KV cache mapped "
                 "%.3f)", "its host copy" if level == PARKED else "the files", seconds, mapped - t, loaded - mapped,
                 t + seconds - loaded)
        return seconds, level

    def want_copy(self, done: Future) -> None:
        """Build the host copy (if not built or being built); `done` gets its bytes once complete."""
        if not self.stream_weights:
            done.set_exception(RuntimeError("this checkpoint loads through vLLM's own loader: no host copy"))
            return
        if self.copy_bytes == 0:
            self.copy_bytes = self.engine.collective_rpc("thaw_copy_plan", args=(str(self.model_dir),))[0]
        if self.copy_ready:
            done.set_result(self.copy_bytes)
        else:
            self._copy_waiters.append(done)

    def copy_step(self) -> None:
        """Pin and read one piece of the host copy (the engine is idle). A piece that cannot be pinned or read
        gives the copy up: the engine serves on, and sleeps hibernated."""
        try:
            left = self.engine.collective_rpc("thaw_copy_piece")[0]
        except Exception as exc:  # noqa: BLE001 - the waiters get the failure
            log.warning("host copy given up: %s", exc)
            waiters, self._copy_waiters = self._copy_waiters, []
            self.drop_copy()
            for done in waiters:
                done.set_exception(exc)
            return
        if left == 0:
            self.copy_ready = True
            if self.level == HIBERNATED:
                self.level = PARKED
            log.info("host copy of the weights built: %.1f GiB pinned", self.copy_bytes / 2**30)
            waiters, self._copy_waiters = self._copy_waiters, []
            for done in waiters:
                done.set_result(self.copy_bytes)

    def drop_copy(self) -> int:
        """Give the host copy (built or being built) back to the system; the bytes released."""
        if self.copy_bytes == 0:
            return 0
        released = self.engine.collective_rpc("thaw_copy_drop")[0]
        self.copy_bytes, self.copy_ready = 0, False
        if self.level == PARKED:
            self.level = HIBERNATED
        waiters, self._copy_waiters = self._copy_waiters, []
        for done in waiters:
            done.set_exception(CopyDropped("the host copy was dropped before it was complete"))
        return released
