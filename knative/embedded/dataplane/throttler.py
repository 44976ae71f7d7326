"""Knative's revision throttler (`pkg/activator/net/throttler.go`): a revision's ready replicas, each
taking at most containerConcurrency requests (0: any number), behind one breaker whose capacity follows
them. A request that passes the breaker takes the least loaded replica with room."""

from __future__ import annotations

import asyncio
from typing import Protocol

from .breaker import Breaker


class Slot(Protocol):
    in_flight: int


class Throttler:
    def __init__(self, queue_depth: int, container_concurrency: int):
        self.container_concurrency = container_concurrency
        self.replicas: list = []  # in rotation: ready, not draining, parked or unready
        self.breaker = Breaker(queue_depth, 0)

    @property
    def queued(self) -> int:
        return self.breaker.waiting

    @property
    def in_flight(self) -> int:
        return self.breaker.in_flight

    def _has_room(self, replica: Slot) -> bool:
        return self.container_concurrency == 0 or replica.in_flight < self.container_concurrency

    async def acquire(self, timeout: float):
        """A replica slot within `timeout` seconds; raises QueueFull or asyncio.TimeoutError."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            await self.breaker.acquire(end - loop.time())
            candidates = [r for r in self.replicas if self._has_room(r)]
            if candidates:
                replica = min(candidates, key=lambda r: r.in_flight)
                replica.in_flight += 1
                return replica
            # A replica left between the breaker's hand-over and now: queue again, as Knative re-enqueues.
            self.breaker.release()

    def release(self, replica: Slot) -> None:
        replica.in_flight -= 1
        self.breaker.release()

    def _capacity(self) -> int | None:
        if self.container_concurrency == 0:
            return None if self.replicas else 0
        return self.container_concurrency * len(self.replicas)

    def add_replica(self, replica) -> None:
        if replica not in self.replicas:
            self.replicas.append(replica)
        self.breaker.set_capacity(self._capacity())

    def remove_replica(self, replica) -> None:
        if replica in self.replicas:
            self.replicas.remove(replica)
            self.breaker.set_capacity(self._capacity())
