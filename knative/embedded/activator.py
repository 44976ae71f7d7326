"""The activator of one revision: a bounded queue in front of its replicas' concurrency slots.

Like Knative's activator throttler, a request takes a slot on a ready replica with room (no more than
containerConcurrency per replica; 0 means unlimited) or waits, first come first served, in a queue of
bounded depth; slots freed or replicas becoming ready hand the head of the queue a replica.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol


class Slot(Protocol):
    in_flight: int


class QueueFull(Exception):
    """The revision's queue is at its depth; the caller answers 503."""


class Activator:
    def __init__(self, queue_depth: int, container_concurrency: int):
        self.queue_depth = queue_depth
        self.container_concurrency = container_concurrency
        self.replicas: list = []  # ready, not draining
        self.waiting: deque[asyncio.Future] = deque()

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    def _has_room(self, replica: Slot) -> bool:
        return self.container_concurrency == 0 or replica.in_flight < self.container_concurrency

    def _take(self):
        candidates = [r for r in self.replicas if self._has_room(r)]
        if not candidates:
            return None
        replica = min(candidates, key=lambda r: r.in_flight)
        replica.in_flight += 1
        return replica

    async def acquire(self, timeout: float):
        """A replica slot within `timeout` seconds; raises QueueFull or asyncio.TimeoutError."""
        if not self.waiting:
            replica = self._take()
            if replica is not None:
                return replica
        if len(self.waiting) >= self.queue_depth:
            raise QueueFull()
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())  # a slot was handed over just as we gave up
            else:
                future.cancel()
            raise
        finally:
            if future in self.waiting:
                self.waiting.remove(future)

    def release(self, replica) -> None:
        replica.in_flight -= 1
        self.dispatch()

    def dispatch(self) -> None:
        """Hand free slots to waiting requests, oldest first."""
        while self.waiting:
            if self.waiting[0].done():
                self.waiting.popleft()
                continue
            replica = self._take()
            if replica is None:
                return
            self.waiting.popleft().set_result(replica)

    def add_replica(self, replica) -> None:
        if replica not in self.replicas:
            self.replicas.append(replica)
        self.dispatch()

    def remove_replica(self, replica) -> None:
        if replica in self.replicas:
            self.replicas.remove(replica)
