"""Knative's breaker (`pkg/queue/breaker.go`): at most `capacity` requests at once, at most `queue_depth`
more waiting for a slot, first come first served; beyond that a request is refused at once."""

from __future__ import annotations

import asyncio
from collections import deque


class QueueFull(Exception):
    """The queue is at its depth; the caller answers 503."""


class Unservable(Exception):
    """No replica of the revision can ever start as configured; the caller answers 503 with why."""


class Breaker:
    def __init__(self, queue_depth: int, capacity: int | None = 0):
        """`capacity` None: no bound on requests at once."""
        self.queue_depth = queue_depth
        self.capacity = capacity
        self.in_flight = 0
        self.queue: deque[asyncio.Future] = deque()  # requests waiting for a slot, oldest first

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def _has_room(self) -> bool:
        return self.capacity is None or self.in_flight < self.capacity

    async def acquire(self, timeout: float) -> None:
        """A slot within `timeout` seconds; raises QueueFull or asyncio.TimeoutError."""
        if not self.queue and self._has_room():
            self.in_flight += 1
            return
        if len(self.queue) >= self.queue_depth:
            raise QueueFull()
        future = asyncio.get_running_loop().create_future()
        self.queue.append(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except BaseException:
            if future.done() and not future.cancelled():
                self.release()  # a slot was handed over just as we gave up
            else:
                future.cancel()
            raise
        finally:
            if future in self.queue:
                self.queue.remove(future)

    def release(self) -> None:
        self.in_flight -= 1
        self._dispatch()

    def set_capacity(self, capacity: int | None) -> None:
        self.capacity = capacity
        self._dispatch()

    def fail_waiting(self, exc: Exception) -> None:
        """Every request waiting for a slot gets `exc` now."""
        while self.queue:
            future = self.queue.popleft()
            if not future.done():
                future.set_exception(exc)

    def _dispatch(self) -> None:
        """Hand free slots to waiting requests, oldest first."""
        while self.queue and self._has_room():
            future = self.queue.popleft()
            if not future.done():
                self.in_flight += 1
                future.set_result(None)
