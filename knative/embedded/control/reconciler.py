"""The reconcile loop: each revision's decision (revision.decide) and the replica moves that carry out its
plan (revision.plan); and the loops that feed it.

Every 100 ms each revision's concurrency (requests at its replicas plus requests its activator holds) is
sampled into per-second buckets; every tick (2 s by default) the KPA decides each revision's scale from
the stable and panic window averages; a request at a revision with nothing running pokes its decision at
once (activator.py), so 0 -> 1 never waits for a tick. The moves are the parts': placement.py (where a
replica runs, Pending), replica_moves.py (start, drain, stop), sleep_moves.py (park, hibernate, wake, GPU
room), probes.py (liveness and readiness, as Knative's kubelet probes would).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import Callable, Protocol

import aiohttp

from thaw.durations import parse_duration
from thaw.launch import ReplicaBoot
from thaw.spec import Spec
from thaw.vllm_platform import detect

from ..dataplane.breaker import Unservable
from ..dataplane.replica import Replica, State
from .autoscaler import AutoscalerConfig
from .engine_pool import EnginePool
from .placement import Placement
from .probes import Prober, engine_failure
from .replica_moves import ReplicaMoves
from .revision import Revision, ReplicaView, decide, plan
from .sleep_moves import SleepMoves
from .supervisor import Supervisor

log = logging.getLogger("thaw.reconciler")

SAMPLE_INTERVAL = 0.1


class Fleet(Protocol):
    """What the reconciler reads of the serving plane (plane.py), and the two things it asks of it."""

    spec: Spec

    @property
    def config(self) -> AutoscalerConfig: ...
    def revisions(self) -> list[Revision]: ...
    def emit_revision(self, kind: str, rev: Revision) -> None: ...
    def delete_removed_models(self) -> None: ...


class Reconciler:
    def __init__(self, plane: Fleet, supervisor: Supervisor, boot_of: Callable[[Revision], ReplicaBoot]):
        """`boot_of(rev)` gives how a new replica of `rev` gets its weights here."""
        self.plane = plane
        self.supervisor = supervisor
        self.session: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task] = set()
        self.stopping = False
        # On a GPU one start at a time: vLLM's engine sizes itself against the device's free memory.
        start_lock = asyncio.Lock() if detect().gpu else contextlib.nullcontext()
        spec = lambda: self.plane.spec  # noqa: E731 - the spec in force, which a reload replaces
        self.placement = Placement(spec, self, lambda: self.sleep.held_host_bytes())
        self.replicas = ReplicaMoves(supervisor, self.placement, boot_of, self, start_lock,
                                     lambda *a, **k: self.sleep.gpu_move(*a, **k), lambda rev, replica: self.sleep.ready(rev, replica),
                                     self._take_pooled)
        self.pool = EnginePool(lambda: self.plane.spec.platform.parking.enginePool, boot_of, self.replicas.launch_pooled,
                               self._stop_pooled, lambda: self.plane.spec.platform.parking.gpuContexts)
        self.sleep = SleepMoves(spec, plane.revisions, self.replicas, self,
                                lambda rev, replica: self.pool.give_back(rev, replica, functools.partial(self.replicas.release, rev)),
                                self.pool.held)
        self.probes = Prober(plane.revisions, self)

    # ---- decide and reconcile --------------------------------------------------------------------

    def decide(self, rev: Revision, now: float) -> None:
        spec, scaling, config = rev.autoscaler.spec, rev.model.scaling, self.plane.config
        ready = len(rev.ready)
        result = rev.autoscaler.scale(rev.window.average(now, spec.stable_window),
                                      rev.window.average(now, spec.panic_window), ready, now)
        rev.panicking = result.panicking
        rev.excess_burst_capacity = result.excess_burst_capacity
        decision = decide(result, rev.desired, keep_warm=rev.keep_warm, min_scale=scaling.min_scale,
                          max_scale=scaling.max_scale, initial_reached=rev.initial_reached, ready=ready,
                          current=ready + rev.count(State.STARTING) + rev.launching,
                          inactive_since=rev.inactive_since, now=now, grace=config.scale_to_zero_grace_period,
                          retention=parse_duration(scaling.scale_to_zero_pod_retention_period),
                          scale_to_zero=config.enable_scale_to_zero)
        rev.desired, rev.initial_reached, rev.inactive_since = (decision.desired, decision.initial_reached,
                                                                decision.inactive_since)

    def reconcile(self, rev: Revision) -> None:
        if self.stopping:
            return
        why = self.replicas.never_starts(rev)
        if why != rev.unservable:
            rev.unservable = rev.failure = why
            if why:
                log.error("no replica of %s can start: %s", rev.name, why)
                rev.throttler.breaker.fail_waiting(Unservable(why))  # held requests are told at once
        moves = plan([ReplicaView(r.id, r.state, r.in_flight) for r in rev.replicas], rev.launching,
                     0 if rev.unservable else rev.desired, rev.throttler.queued, rev.routable,
                     hold_releases=self.replicas.gpu_start_in_progress(), unplaced=rev.unplaced)
        by_id = {r.id: r for r in rev.replicas}
        for rid in moves.wake:
            self.wake_parked(rev, by_id[rid])
        for _ in range(moves.start if time.monotonic() >= rev.retry_at else 0):
            rev.launching += 1
            self.track(self.replicas.start(rev))
        for rid in moves.stop:
            self.track(self.replicas.stop(rev, by_id[rid]))
        for rid in moves.shrink:
            replica = by_id[rid]
            if rid == moves.may_park and self.sleep.sleeps(rev, replica):
                self.track(self.sleep.park(rev, replica))
            else:
                self.track(self.replicas.drain(rev, replica))
        self.report(rev)

    def poke(self, rev: Revision) -> None:
        """What Knative's activator does for a revision at zero: report load now, decide now."""
        now = time.time()
        rev.window.record(now, rev.sample(poke=True))
        self.decide(rev, now)
        self.reconcile(rev)

    def report(self, rev: Revision) -> None:
        """A revision update event when what its status shows changed."""
        state = (len(rev.ready), rev.desired, len(rev.parked), rev.pending, rev.failure)
        if state != rev.last_reported:
            rev.last_reported = state
            self.plane.emit_revision("dev.knative.apiserver.resource.update", rev)

    async def _take_pooled(self, rev: Revision) -> Replica | None:
        return await self.pool.take(rev)

    async def _stop_pooled(self, replica: Replica) -> None:
        async with self.replicas.releasing():
            await self.supervisor.stop(replica, 0)
        self.placement.release(replica.id)

    def grace(self) -> float:
        return self.plane.spec.platform.activator.terminationGracePeriodSeconds

    def track(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---- what the activator and the probes report ---------------------------------------------------

    def wake_parked(self, rev: Revision, replica: Replica) -> None:
        self.sleep.wake(rev, replica)

    def lost(self, rev: Revision, replica: Replica) -> None:
        """A ready replica refused a connection: out of rotation now (the liveness loop would notice a
        death only on its next pass), stopped, and replaced if the revision still wants it. A draining
        replica is already out of rotation; its drain stops it without cutting its other streams."""
        if replica.state != State.READY:
            return
        log.warning("replica %s refused a connection; replacing it", replica.id)
        self.replicas.forget(rev, replica, State.DEAD)
        self.track(self.supervisor.stop(replica, 0))
        self.reconcile(rev)

    def died(self, rev: Revision, replica: Replica, why: str) -> None:
        """A replica's process or its engine died (awake or asleep): out of rotation and the budgets at once,
        its cause logged, shown in its revision's status and a revision event, its process stopped; a
        revision that still wants it gets a new one."""
        if replica.state in (State.STOPPED, State.DEAD):
            return
        was = replica.state
        self.replicas.forget(rev, replica, State.DEAD)
        self.track(self._after_death(rev, replica, why, was))
        self.sleep.plan_host()
        self.reconcile(rev)

    async def _after_death(self, rev: Revision, replica: Replica, why: str, was: State) -> None:
        cause = None
        for _ in range(20):  # the engine's own watch needs a moment to say why (functions/engine_watch.py)
            if not replica.alive() or (cause := await engine_failure(self.session, replica)):
                break
            await asyncio.sleep(0.05)
        replica.error = f"{why}: {cause}" if cause else why
        rev.failure = f"replica {replica.id} died ({was}): {replica.error}"
        log.error("%s (see %s)", rev.failure, replica.log_path)
        self.report(rev)
        await self.supervisor.stop(replica, 0)

    def not_ready(self, rev: Revision, replica: Replica) -> None:
        """A ready replica's engine is loading again (its gunicorn worker was restarted): out of rotation
        until its readiness probe passes, as Knative takes a pod whose readiness fails out of its endpoints."""
        if replica.state == State.READY:
            log.warning("replica %s is not ready (its engine is loading again); holding its requests", replica.id)
            replica.move(State.UNREADY)
            rev.throttler.remove_replica(replica)
            self.report(rev)

    def ready_again(self, rev: Revision, replica: Replica) -> None:
        log.info("replica %s is ready again", replica.id)
        replica.move(State.READY)
        rev.throttler.add_replica(replica)
        self.report(rev)

    # ---- the loops -----------------------------------------------------------------------------------

    def start(self, session: aiohttp.ClientSession) -> list[asyncio.Task]:
        self.session = session
        return [asyncio.create_task(c) for c in (self._tick_loop(), self._sample_loop(), self.probes.liveness_loop(),
                                                 self.probes.readiness_loop())]

    async def stop(self) -> None:
        self.stopping = True
        for task in list(self.tasks):
            task.cancel()
        replicas = [r for rev in self.plane.revisions() for r in rev.replicas if r.state != State.STOPPED]
        replicas += self.pool.replicas()
        await asyncio.gather(*(self.supervisor.stop(r, self.grace()) for r in replicas), return_exceptions=True)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.plane.config.tick_interval)
            now = time.time()
            for rev in self.plane.revisions():
                self.decide(rev, now)
                self.reconcile(rev)
            self.sleep.plan_host()  # the node's free memory moves on its own: below the floor, copies go
            self.pool.fill(self.plane.revisions(), self.track)
            self.plane.delete_removed_models()

    async def _sample_loop(self) -> None:
        while True:
            now = time.time()
            for rev in self.plane.revisions():
                rev.window.record(now, rev.sample())
            await asyncio.sleep(SAMPLE_INTERVAL)
