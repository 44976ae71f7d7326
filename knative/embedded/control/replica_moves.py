"""The moves of a replica's life outside sleep: start one (placed on the node, GPU room made, probed until
ready; a failed start backs off as Kubernetes' CrashLoopBackOff), drain one, stop one."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from pathlib import Path
from typing import AsyncContextManager, AsyncIterator, Awaitable, Callable, Protocol

import aiohttp

from thaw.launch import ReplicaBoot
from thaw.spec import pvc_parts, quantity_bytes

from ..dataplane.breaker import Unservable
from ..dataplane.replica import Replica, State, can_move
from .node import never_fits, request_of
from .placement import Placement
from .revision import Revision
from .standby import ReplicaLaunch
from .supervisor import Supervisor

log = logging.getLogger("thaw.reconciler")

PROGRESS_DEADLINE = 600  # seconds a replica may take to become ready (Knative's progress-deadline)
# vLLM's start asserts that the device's free memory did not grow while it measured it: a process outside thaw's
# ordering (another tenant, a crash) giving memory back fails a start that nothing is wrong with.
MEMORY_MOVED = b"Error in memory profiling"
UPSETS_IN_A_ROW = 3  # such failures started again at once; beyond, a failure like any other
BACKOFF_FIRST, BACKOFF_MAX = 10.0, 300.0  # Kubernetes' CrashLoopBackOff: 10 s, doubling, at most 5 minutes


class NoRoom(RuntimeError):
    """A move that may not displace anyone (an engine pool's start) found no free room on the node or the GPU."""


def folder_bytes(folder: str) -> int:
    """What staging a model folder copies: every file in it."""
    path = Path(folder)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


class Loop(Protocol):
    """What the replica moves read of the reconcile loop (reconciler.py)."""

    session: aiohttp.ClientSession | None
    stopping: bool

    def report(self, rev: Revision) -> None: ...
    def grace(self) -> float: ...


def memory_moved_under(log_path: Path | None) -> bool:
    """Whether a failed start's log ends with vLLM's assertion that GPU memory was freed while it measured."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - (64 << 10)))
            return MEMORY_MOVED in f.read()
    except (OSError, TypeError):
        return False


class ReplicaMoves:
    def __init__(self, supervisor: Supervisor, placement: Placement, boot_of: Callable[[Revision], ReplicaBoot],
                 loop: Loop, start_lock, gpu_move: Callable[..., AsyncContextManager],
                 after_ready: Callable[[Revision, Replica], None],
                 take_pooled: Callable[[Revision], Awaitable[Replica | None]] | None = None):
        """`gpu_move(rev, id, pid, gpus)` makes room on the GPU for a start and counts its memory until it ends
        (sleep_moves.py); `start_lock` lets one start at a time size itself against the GPU's free memory;
        `after_ready(rev, replica)` follows a ready one; `await take_pooled(rev)` is a built engine of `rev`'s
        shape waiting to be adopted, if any (engine_pool.py)."""
        self.supervisor = supervisor
        self.placement = placement
        self.boot_of = boot_of
        self.loop = loop
        self.start_lock = start_lock
        self.gpu_move = gpu_move
        self.after_ready = after_ready
        self.take_pooled = take_pooled
        self._launches = itertools.count(1)

    def gpu_start_in_progress(self) -> bool:
        """An engine is starting on the GPU (the start lock exists only where there is one)."""
        return isinstance(self.start_lock, asyncio.Lock) and self.start_lock.locked()

    def never_starts(self, rev: Revision) -> str | None:
        """Why no replica of `rev` can start as configured (None: one can): requests larger than the whole
        node, or weights larger than the whole cache tier they must be staged into. Said before any process
        starts: a process would only fail (its imports alone take 20-30 s on a small machine)."""
        why = never_fits(request_of(rev.model.resources, rev.model.engine.tensor_parallel_size), self.placement.node)
        source, claims = rev.model.source, self.placement.spec().platform.persistentVolumeClaims
        if not why and source.startswith("pvc://") and pvc_parts(source)[0] not in claims:
            why = (f"{source}: no folder holds the claim {pvc_parts(source)[0]!r} here: set "
                   f"platform.persistentVolumeClaims.{pvc_parts(source)[0]} (on a cluster the claim is mounted)")
        if why or not rev.model.stages_through_tier or source.startswith(("s3://", "hf://", "pvc://")):
            return why
        capacity = quantity_bytes(self.placement.spec().platform.cache.capacity)
        size = folder_bytes(rev.model.source)
        if size > capacity:
            return (f"its weights ({size} bytes in {rev.model.source}) cannot fit the cache tier (capacity "
                    f"{capacity} bytes): raise platform.cache.capacity, or serve the folder in place "
                    "(cache.stage: false)")
        return None

    async def start(self, rev: Revision) -> None:
        """One new replica of `rev`: a waiting engine of its shape adopted, or one placed (Pending meanwhile),
        started, probed until ready or failed."""
        pooled = await self.take_pooled(rev) if self.take_pooled else None
        if pooled is not None and await self.adopt(rev, pooled):
            return
        key = f"launch-{next(self._launches)}"
        marks = {"asked": time.time()}
        claim = await self.placement.place(rev, key)
        marks["placed"] = time.time()
        if claim is None:
            rev.launching -= 1
            self.loop.report(rev)
            return
        started: list[Replica] = []
        # held until ready: the memory a start takes is known only then
        async with self.start_lock, self.gpu_move(rev, key, lambda: started[0].pid if started else None, claim.gpus,
                                                  for_start=True):
            marks["room"] = time.time()
            try:
                replica = await self.supervisor.start(rev.name, rev.model, self.boot_of(rev), self.placement.env(claim))
            except Exception:  # noqa: BLE001 - a failed launch is retried by the next reconcile
                log.exception("could not start a replica of %s", rev.name)
                self.placement.release(key)
                return
            finally:
                rev.launching -= 1
            replica.gpus = claim.gpus
            replica.marks.update(marks)
            started.append(replica)
            self.placement.bind(key, replica.id)
            rev.replicas.append(replica)
            ok = await self.supervisor.wait_ready(replica, self.loop.session, PROGRESS_DEADLINE)
        if ok and replica.state == State.STARTING:
            replica.move(State.READY)
            rev.failure, rev.failures, rev.upsets = None, 0, 0
            rev.throttler.add_replica(replica)
            replica.marks["serving"] = time.time()
            rev.last_marks = dict(replica.marks)
            log.info("replica %s ready after %.2fs", replica.id, replica.ready_at - replica.started_at)
            self.loop.report(rev)
            self.after_ready(rev, replica)
        elif replica.state == State.STARTING:
            upset = rev.upsets < UPSETS_IN_A_ROW and memory_moved_under(replica.log_path)
            if upset:  # not the model's failure: no back-off, held requests wait for the next start
                rev.upsets += 1
                log.warning("replica %s failed to start: GPU memory moved while vLLM measured it (another process "
                            "on the device); starting again", replica.id)
            else:
                rev.failures += 1
                wait = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (rev.failures - 1))
                rev.failure = f"replica {replica.id} failed to start: {replica.error}"
                rev.retry_at = time.monotonic() + wait
                log.error("%s; the next start in %.0fs (see %s)", rev.failure, wait, replica.log_path)
            self.forget(rev, replica, State.DEAD)
            if not upset and not rev.count(State.READY, State.STARTING, State.WAKING):
                # nothing else will take the requests held for it soon: they are told why now, not at their
                # timeout (the next start waits for its back-off)
                rev.throttler.breaker.fail_waiting(Unservable(rev.failure))
            async with self.releasing():
                await self.supervisor.stop(replica, 0)
            self.loop.report(rev)

    async def adopt(self, rev: Revision, replica: Replica) -> bool:
        """A pooled replica (functions/pool.py) becomes `rev`'s: its weights in, as a wake (GPU room made
        first), without a start. False (the replica stopped) if it could not adopt: the caller starts one."""
        marks = {"asked": time.time()}
        replica.revision = rev.name
        rev.replicas.append(replica)  # counted as starting from here
        rev.launching -= 1
        launch = ReplicaLaunch(self.boot_of(rev), rev.model.served_name, rev.model.replica_engine(), replica.port)
        try:
            async with self.gpu_move(rev, f"adopt-{replica.id}", lambda: replica.pid, replica.gpus):
                marks["room"] = time.time()
                async with self.loop.session.post(replica.url + "/thaw/adopt", json=launch.to_json(),
                                                  timeout=aiohttp.ClientTimeout(total=PROGRESS_DEADLINE)) as r:
                    body = await r.json(content_type=None)
                    if r.status != 200:
                        raise RuntimeError(f"{r.status}: {(body.get('error') or {}).get('message')}")
        except Exception as exc:  # noqa: BLE001 - the start goes on as a launch
            if replica.state == State.STOPPED:  # the revision no longer wanted it
                return True
            log.warning("pooled replica %s could not be adopted by %s (%s); starting one", replica.id, rev.name, exc)
            rev.launching += 1
            self.forget(rev, replica, State.DEAD)
            async with self.releasing():
                await self.supervisor.stop(replica, 0)
            return False
        if replica.state != State.STARTING:  # stopped meanwhile (the revision went away)
            return True
        replica.move(State.READY)
        replica.ready_at = now = time.time()
        replica.phases = body.get("phases", {})
        replica.engine_pid = body.get("engine_pid") or replica.engine_pid
        replica.marks = {**marks, "adopted": now, "serving": now}
        rev.failure, rev.failures, rev.upsets = None, 0, 0
        rev.throttler.add_replica(replica)
        rev.last_marks = dict(replica.marks)
        log.info("replica %s adopted by %s in %.2fs", replica.id, rev.name, now - marks["asked"])
        self.loop.report(rev)
        self.after_ready(rev, replica)
        return True

    async def release(self, rev: Revision, replica: Replica) -> bool:
        """A sleeping replica of `rev` leaves the revision, keeping its place on the node, and gives its model up
        (functions/pool.py) for the engine pool; False if it was not asleep, or refused (then the caller stops it:
        it is out of the revision already, so no wake can reach it meanwhile)."""
        if replica.state != State.PARKED or replica.in_flight:
            return False
        rev.throttler.remove_replica(replica)
        rev.replicas.remove(replica)
        replica.move(State.STARTING)  # waiting in the pool, to be adopted
        replica.copy_bytes, replica.copy_ready, replica.sleep_level = 0, False, 2
        self.loop.report(rev)
        try:
            async with self.loop.session.post(replica.url + "/thaw/release",
                                              timeout=aiohttp.ClientTimeout(total=120)) as r:
                if r.status == 200:
                    return True
                log.warning("replica %s did not go back to the pool: %s", replica.id, await r.text())
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("replica %s did not go back to the pool: %s", replica.id, exc)
        return False

    async def launch_pooled(self, rev: Revision, boot: ReplicaBoot, pool_id: str) -> Replica | None:
        """A replica for the engine pool, launched as `rev`'s model with `boot`, into room free now (nobody moved
        for it); ready (waiting to be adopted), or None if it failed. NoRoom: nothing failed, there is no room now."""
        key = f"launch-{next(self._launches)}"
        claim = self.placement.try_place(rev, key)
        if claim is None:
            raise NoRoom(f"the node has no room for a replica of {rev.name}")
        replica: Replica | None = None
        try:
            async with self.start_lock, self.gpu_move(rev, key, lambda: replica.pid if replica else None, claim.gpus,
                                                      for_start=True, displace=False):
                replica = await self.supervisor.start(pool_id, rev.model, boot, self.placement.env(claim))
                replica.gpus = claim.gpus
                self.placement.bind(key, replica.id)
                if await self.supervisor.wait_ready(replica, self.loop.session, PROGRESS_DEADLINE):
                    return replica
        except NoRoom:
            self.placement.release(key)
            raise
        except Exception as exc:  # noqa: BLE001 - the pool tries again after a back-off
            log.warning("no pooled replica of %s's shape: %s", rev.name, exc)
        self.placement.release(key)
        if replica is not None:
            log.error("pooled replica %s failed to start: %s", replica.id, replica.error)
            self.placement.release(replica.id)
            async with self.releasing():
                await self.supervisor.stop(replica, 0)
        return None

    @staticmethod
    async def leave_rotation(rev: Revision, replica: Replica, state: State) -> bool:
        """No new requests; those in flight (streams too) get up to timeoutSeconds to finish. False if the
        replica had already gone another way (died, stopped) since the move was planned."""
        if not can_move(replica.state, state):
            return False
        replica.move(state)
        rev.throttler.remove_replica(replica)
        end = time.monotonic() + rev.model.timeoutSeconds
        while replica.in_flight > 0 and time.monotonic() < end and replica.alive():
            await asyncio.sleep(0.05)
        return True

    async def drain(self, rev: Revision, replica: Replica, for_start: bool = False) -> None:
        """No new requests; in-flight ones (streams too) get up to timeoutSeconds; then stop it."""
        if await self.leave_rotation(rev, replica, State.DRAINING):
            await self.stop(rev, replica, for_start)

    async def stop(self, rev: Revision, replica: Replica, for_start: bool = False) -> None:
        if replica.state == State.STOPPED:
            return
        rev.throttler.remove_replica(replica)
        async with self.releasing(for_start):
            await self.supervisor.stop(replica, self.loop.grace())
        self.forget(rev, replica, State.STOPPED)
        self.loop.report(rev)

    @contextlib.asynccontextmanager
    async def releasing(self, for_start: bool = False) -> AsyncIterator[None]:
        """Around giving GPU memory back (a sleep, a process's exit): never while an engine starts on the GPU,
        since vLLM's start fails when the device's free memory grows while it measures it ("Error in memory
        profiling"). `for_start`: made for the start holding the lock, before its engine exists."""
        if for_start or self.loop.stopping or not isinstance(self.start_lock, asyncio.Lock):
            yield
            return
        async with self.start_lock:
            yield

    def forget(self, rev: Revision, replica: Replica, state: State) -> None:
        self.placement.release(replica.id)
        replica.move(state)
        rev.throttler.remove_replica(replica)
        if replica in rev.replicas:
            rev.replicas.remove(replica)
