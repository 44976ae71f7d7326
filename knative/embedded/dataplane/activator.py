"""One revision's activator: the request path between the gateway and a replica.

As Knative's activator does for a revision in its path: a request at a revision with nothing running
wakes it (a sleeping replica is woken, and the autoscaler is poked either way so 0 -> 1 never waits for a tick);
the throttler holds the request, bounded, until a replica has room; the request is proxied. A replica
whose connection fails before it answers, or that answers that its engine is loading again, is
reported to the reconciler and the request goes to another (or a replacement), up to ATTEMPTS tries.
Answers carry `X-Thaw-Revision`, `X-Thaw-Queue-Seconds` (how long the request was held) and, for a
request that found no replica of its revision ready, `X-Thaw-Cold-Start`: the rung it waited on: `parked`
or `hibernated` (a sleeping replica's wake: with or without a host copy of its weights) or `zero` (a start):
what load tests call a cold request.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import aiohttp
from aiohttp import web

from thaw.spec import Model

from .breaker import QueueFull, Unservable
from .openai_errors import error_response
from .proxy import LocalCall, NotAnswered, NotReady, proxy
from .replica import RUNNING, Replica, State
from .throttler import Throttler

ATTEMPTS = 3  # tries of a request whose replica's connection failed before it answered


class Revision(Protocol):
    """What the activator reads of the revision it fronts (revision.py's Revision)."""

    name: str
    model: Model
    launching: int
    pending: str | None
    failure: str | None
    unservable: str | None
    arrivals: int  # counted here: the rps metric's requests

    replicas: list[Replica]

    @property
    def ready(self) -> list[Replica]: ...
    @property
    def parked(self) -> list[Replica]: ...
    def count(self, *states: State) -> int: ...


class ReplicaMoves(Protocol):
    """What the activator asks of the reconciler (reconciler.py)."""

    def poke(self, rev: "Revision") -> None: ...
    def wake_parked(self, rev: "Revision", replica: Replica) -> None: ...
    def lost(self, rev: "Revision", replica: Replica) -> None: ...
    def not_ready(self, rev: "Revision", replica: Replica) -> None: ...


def cold_rung(replicas: list[Replica]) -> str:
    """The rung a request waits on when no replica is ready: a waking or sleeping replica's, else zero."""
    sleeper = next((r for r in replicas if r.state == State.WAKING), None) or next(
        (r for r in replicas if r.state == State.PARKED), None)
    if sleeper is None:
        return "zero"
    return "parked" if sleeper.sleep_level == 1 else "hibernated"


class Activator:
    def __init__(self, revision: "Revision", throttler: Throttler, moves: ReplicaMoves):
        self.revision = revision
        self.throttler = throttler
        self.moves = moves

    def wake(self) -> bool:
        """Wake a revision that has nothing running, starting or waking; whether it did."""
        rev = self.revision
        if rev.launching or rev.count(*RUNNING):
            return False
        if rev.parked:
            self.moves.wake_parked(rev, rev.parked[0])
        self.moves.poke(rev)
        return True

    async def forward(self, session: aiohttp.ClientSession, request: web.Request | LocalCall, label: str, path: str,
                      body: bytes) -> web.StreamResponse:
        rev = self.revision
        timeout_seconds = rev.model.timeoutSeconds
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        deadline = arrived + timeout_seconds
        headers = {"X-Thaw-Revision": rev.name}
        rev.arrivals += 1
        if not rev.ready:
            headers["X-Thaw-Cold-Start"] = cold_rung(rev.replicas)
        for _ in range(ATTEMPTS):
            self.wake()
            try:
                if rev.unservable:
                    raise Unservable(rev.unservable)
                replica = await self.throttler.acquire(deadline - loop.time())
            except Unservable as exc:
                return error_response(503, f"No replica of '{label}' can start: {exc}", "server_error",
                                      code="model_unavailable")
            except QueueFull:
                return error_response(503, f"Too many requests are waiting for '{label}'; retry shortly",
                                      "server_error", code="queue_full", headers={"Retry-After": "1"})
            except asyncio.TimeoutError:
                why = (f": its replica is Pending: {rev.pending}" if rev.pending
                       else f": {rev.failure}" if rev.failure and not rev.ready else "")
                return error_response(504, f"No replica of '{label}' could take the request within "
                                           f"{timeout_seconds}s{why}", "server_error", code="timeout")
            replica.last_used = time.time()
            queued = loop.time() - arrived  # held here: a cold start, or no replica with room
            try:
                return await proxy(session, request, replica.url, path, body, deadline - loop.time(),
                                   {**headers, "X-Thaw-Queue-Seconds": f"{queued:.4f}"}, rev.model.name,
                                   timeout_seconds)
            except NotAnswered as exc:
                # Nothing came back, so nothing reached the client: another replica (or a replacement of
                # a dead one) gets the request. Inference has no side effects to repeat; CloudEvents are
                # at least once anyway. Bounded, so a request that crashes replicas cannot crash them all.
                if exc.refused or not replica.alive():
                    self.moves.lost(rev, replica)
            except NotReady:
                self.moves.not_ready(rev, replica)  # held here again until a replica is ready
            finally:
                self.throttler.release(replica)
        return error_response(502, f"The replicas serving '{rev.model.name}' failed {ATTEMPTS} times before "
                                   "answering", "server_error", code="replica_failed")
