"""The kubelet's probes of the replicas, as Knative's pods get them: liveness every 100 ms (the replica's process
and its engine's process are alive: an engine core that dies, awake or asleep, is noticed at once) and, once
ready, readiness (its /readyz, every second: out of rotation while its engine loads again); a sleeping
replica's /healthz is probed as often, so an engine that failed in its sleep is found before a request is."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Protocol

import aiohttp
import psutil

from ..dataplane.replica import Replica, State
from .revision import Revision

log = logging.getLogger("thaw.probes")

LIVENESS_PERIOD = 0.1
READINESS_PERIOD = 1.0  # how often ready replicas' /readyz is probed (a worker restarted inside one)
READINESS_TIMEOUT = 5.0  # a probe answered no faster than this fails (a busy replica answers in ms)


class Loop(Protocol):
    """What the probes tell the reconcile loop (reconciler.py)."""

    session: aiohttp.ClientSession | None

    def died(self, rev: Revision, replica: Replica, why: str) -> None: ...
    def not_ready(self, rev: Revision, replica: Replica) -> None: ...
    def ready_again(self, rev: Revision, replica: Replica) -> None: ...


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def engine_failure(session: aiohttp.ClientSession, replica: Replica) -> str | None:
    """Why the replica's engine failed, as its /healthz says (None: it says nothing, or nothing failed)."""
    try:
        async with session.get(replica.url + "/healthz", timeout=aiohttp.ClientTimeout(total=2)) as r:
            body = await r.json(content_type=None)
            if body.get("status") != "failed":
                return None
            return body.get("error") or "its engine failed"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
        return None


class Prober:
    def __init__(self, revisions: Callable[[], list[Revision]], loop: Loop):
        self.revisions = revisions
        self.loop = loop

    async def liveness_loop(self) -> None:
        while True:
            for rev in self.revisions():
                for replica in list(rev.replicas):
                    if replica.state in (State.STARTING, State.STOPPED, State.DEAD):
                        continue
                    if not replica.alive():
                        self.loop.died(rev, replica, "its process exited")
                    elif replica.engine_pid and not _alive(replica.engine_pid):
                        self.loop.died(rev, replica, "its engine-core process exited")
            await asyncio.sleep(LIVENESS_PERIOD)

    async def readiness_loop(self) -> None:
        """Probe the /readyz of replicas in (or taken out of) rotation: move them out and back in, or find
        their engine failed; and the /healthz of sleeping ones."""
        timeout = aiohttp.ClientTimeout(total=READINESS_TIMEOUT)

        async def probe(rev: Revision, replica: Replica) -> None:
            if replica.state == State.PARKED:
                failure = await engine_failure(self.loop.session, replica)
                if failure and replica.state == State.PARKED:
                    self.loop.died(rev, replica, failure)
                return
            try:
                async with self.loop.session.get(replica.url + "/readyz", timeout=timeout) as r:
                    ready = r.status == 200
                    failed = not ready and (await r.json(content_type=None)).get("status") == "failed"
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
                ready = failed = False  # a dead process is the liveness loop's to handle
            if failed:
                self.loop.died(rev, replica, await engine_failure(self.loop.session, replica) or "its engine failed")
            elif not ready:
                self.loop.not_ready(rev, replica)
            elif replica.state == State.UNREADY:
                self.loop.ready_again(rev, replica)

        while True:
            await asyncio.gather(*(probe(rev, replica) for rev in self.revisions() for replica in list(rev.replicas)
                                   if replica.state in (State.READY, State.UNREADY, State.PARKED) and replica.alive()))
            await asyncio.sleep(READINESS_PERIOD)
