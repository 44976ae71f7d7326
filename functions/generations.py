"""What the engine gives back, and where a request waits for it: one buffer per request (a Generation), filled
by the engine's thread a step at a time, taken by the request's thread (functions/service.py)."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Embed:
    """An embedding of one input (vLLM's pooling runner), in place of a Sampling."""

    dimensions: int | None = None


@dataclass(frozen=True, slots=True)
class Embedding:
    """What the engine gives back for one input of an embedding request."""

    index: int
    vector: list[float]
    prompt_tokens: int


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class Delta:
    """New output of one choice since its previous delta."""

    index: int
    text: str
    token_count: int
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: str | None


class EngineFailed(Exception):
    """The engine stopped working; every request in it ends with this."""


class Generation:
    """One API request in the engine: one engine request per choice, all feeding one buffer.

    The engine thread appends each step's deltas and wakes the request's thread once; that thread takes
    everything buffered since its last take. A thread that falls behind (the GIL, a slow client) then finds
    several steps' deltas and writes them at once, instead of waking once per token."""

    def __init__(self, request_id: str, choices: int):
        self.request_id = request_id
        self.choices = choices
        self.ended = False  # every choice finished, or the engine failed it: nothing left to abort
        self._lock = threading.Lock()
        self._pending: list = []
        self._woken = threading.Event()

    def put(self, items: list) -> None:
        """Deltas (or the exception that ends the generation) from the engine thread."""
        with self._lock:
            self._pending.extend(items)
        self._woken.set()

    def take(self, timeout: float) -> list:
        """Everything put since the last take, waiting up to `timeout` seconds for something; [] if none."""
        if not self._woken.wait(timeout):
            return []
        with self._lock:
            items, self._pending = self._pending, []
            self._woken.clear()
        return items
