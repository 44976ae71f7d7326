"""The reconcile loop: each revision's decision (revision.decide) and the replica moves that carry out its
plan (revision.plan): start, drain, park, wake, stop; and the loops that feed it.

Every 100 ms each revision's concurrency (requests at its replicas plus requests its activator holds) is
sampled into per-second buckets; every tick (2 s by default) the KPA decides each revision's scale from
the stable and panic window averages; a request at a revision with nothing running pokes its decision at
once (activator.py), so 0 -> 1 never waits for a tick. Replicas are probed for liveness (100 ms) and,
once ready, for readiness (1 s) as Knative's kubelet probes would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Callable, Protocol

import aiohttp

from thaw.durations import parse_duration
from thaw.launch import ReplicaBoot
from thaw.spec import Spec
from thaw.vllm_platform import detect, gpu_count, gpu_memory

from ..dataplane.replica import RUNNING, Replica, State, can_move
from .autoscaler import AutoscalerConfig
from .node import Claim, Node, node_of, place, request_of, shared_cores
from .parking import PARKED, Awake, Sleeper, decide_park, plan_gpu_room
from .revision import Revision, ReplicaView, decide, plan
from .supervisor import Supervisor

log = logging.getLogger("thaw.reconciler")

SAMPLE_INTERVAL = 0.1
PROGRESS_DEADLINE = 600  # seconds a replica may take to become ready (Knative's progress-deadline)
GPU_ROOM_POLL = 0.25  # how often a start or wake waiting for GPU memory looks again
PLACEMENT_POLL = 0.25  # how often a Pending replica looks for room on the node again
BACKOFF_FIRST, BACKOFF_MAX = 10.0, 300.0  # Kubernetes' CrashLoopBackOff: 10 s, doubling, at most 5 minutes
READINESS_PERIOD = 1.0  # how often ready replicas' /readyz is probed (a worker restarted inside one)
READINESS_TIMEOUT = 5.0  # a probe answered no faster than this fails (a busy replica answers in ms)


class Fleet(Protocol):
    """What the reconciler reads of the serving plane (plane.py), and the two things it asks of it."""

    spec: Spec

    @property
    def config(self) -> AutoscalerConfig: ...
    def revisions(self) -> list[Revision]: ...
    def emit_revision(self, kind: str, rev: Revision) -> None: ...
    def delete_removed_models(self) -> None: ...


def weight_bytes(source: str) -> int:
    """The bytes of a model's weights here; 0 for an s3 model not staged yet (it costs budgets nothing)."""
    if source.startswith("s3://"):
        return 0
    folder = Path(source)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0


def _process_tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0


class Reconciler:
    def __init__(self, plane: Fleet, supervisor: Supervisor, boot_of: Callable[[Revision], ReplicaBoot]):
        """`boot_of(rev)` gives how a new replica of `rev` gets its weights here."""
        self.plane = plane
        self.supervisor = supervisor
        self.boot_of = boot_of
        self.session: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task] = set()
        # On a GPU, one start or wake at a time claims memory (vLLM sizes its KV cache from what is free).
        self.gpu_lock = asyncio.Lock() if detect().gpu else contextlib.nullcontext()
        self.stopping = False
        self.claims: dict[str, Claim] = {}  # replica id (or a launch's placeholder) -> what it holds of the node
        self._launches = itertools.count(1)

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
        moves = plan([ReplicaView(r.id, r.state, r.in_flight) for r in rev.replicas], rev.launching, rev.desired,
                     rev.throttler.queued, rev.routable)
        by_id = {r.id: r for r in rev.replicas}
        for rid in moves.wake:
            self.wake_parked(rev, by_id[rid])
        for _ in range(moves.start if time.monotonic() >= rev.retry_at else 0):
            rev.launching += 1
            self._track(self._run_replica(rev))
        for rid in moves.stop:
            self._track(self._stop(rev, by_id[rid]))
        for rid in moves.shrink:
            replica = by_id[rid]
            level = self._park_decision(rev, replica) if rid == moves.may_park else 0
            if level:
                self._track(self._park(rev, replica, level))
            else:
                self._track(self._drain(rev, replica))
        self.report(rev)

    def poke(self, rev: Revision) -> None:
        """What Knative's activator does for a revision at zero: report load now, decide now."""
        now = time.time()
        rev.window.record(now, rev.concurrency + 1)
        self.decide(rev, now)
        self.reconcile(rev)

    def report(self, rev: Revision) -> None:
        """A revision update event when what its status shows changed."""
        state = (len(rev.ready), rev.desired, len(rev.parked), rev.pending, rev.failure)
        if state != rev.last_reported:
            rev.last_reported = state
            self.plane.emit_revision("dev.knative.apiserver.resource.update", rev)

    # ---- what the activator reports ----------------------------------------------------------------

    def lost(self, rev: Revision, replica: Replica) -> None:
        """A ready replica refused a connection: out of rotation now (the liveness loop would notice a
        death only on its next pass), stopped, and replaced if the revision still wants it. A draining
        replica is already out of rotation; its drain stops it without cutting its other streams."""
        if replica.state != State.READY:
            return
        log.warning("replica %s refused a connection; replacing it", replica.id)
        self._forget(rev, replica, State.DEAD)
        self._track(self.supervisor.stop(replica, 0))
        self.reconcile(rev)

    def not_ready(self, rev: Revision, replica: Replica) -> None:
        """A ready replica's engine is loading again (its gunicorn worker was restarted): out of rotation
        until its readiness probe passes, as Knative takes a pod whose readiness fails out of its endpoints."""
        if replica.state == State.READY:
            log.warning("replica %s is not ready (its engine is loading again); holding its requests", replica.id)
            replica.move(State.UNREADY)
            rev.throttler.remove_replica(replica)
            self.report(rev)

    # ---- the loops -----------------------------------------------------------------------------------

    def start(self, session: aiohttp.ClientSession) -> list[asyncio.Task]:
        self.session = session
        return [asyncio.create_task(c) for c in (self._tick_loop(), self._sample_loop(), self._liveness_loop(),
                                                 self._readiness_loop())]

    async def stop(self) -> None:
        self.stopping = True
        for task in list(self.tasks):
            task.cancel()
        replicas = [r for rev in self.plane.revisions() for r in rev.replicas if r.state != State.STOPPED]
        grace = self.plane.spec.platform.activator.terminationGracePeriodSeconds
        await asyncio.gather(*(self.supervisor.stop(r, grace) for r in replicas), return_exceptions=True)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.plane.config.tick_interval)
            now = time.time()
            for rev in self.plane.revisions():
                self.decide(rev, now)
                self.reconcile(rev)
            self.plane.delete_removed_models()

    async def _sample_loop(self) -> None:
        while True:
            now = time.time()
            for rev in self.plane.revisions():
                rev.window.record(now, rev.concurrency)
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def _liveness_loop(self) -> None:
        while True:
            for rev in self.plane.revisions():
                for replica in list(rev.replicas):
                    if replica.state not in (State.STARTING, State.STOPPED) and not replica.alive():
                        log.warning("replica %s died", replica.id)
                        self._forget(rev, replica, State.DEAD)
                        self.reconcile(rev)
            await asyncio.sleep(0.1)

    async def _readiness_loop(self) -> None:
        """Probe the /readyz of replicas in (or taken out of) rotation; move them out and back in."""
        timeout = aiohttp.ClientTimeout(total=READINESS_TIMEOUT)

        async def probe(rev: Revision, replica: Replica) -> None:
            try:
                async with self.session.get(replica.url + "/readyz", timeout=timeout) as r:
                    ready = r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ready = False  # a dead process is the liveness loop's to handle
            if not ready:
                self.not_ready(rev, replica)
            elif replica.state == State.UNREADY:
                log.info("replica %s is ready again", replica.id)
                replica.move(State.READY)
                rev.throttler.add_replica(replica)
                self.report(rev)

        while True:
            await asyncio.gather(*(probe(rev, replica) for rev in self.plane.revisions()
                                   for replica in list(rev.replicas)
                                   if replica.state in (State.READY, State.UNREADY) and replica.alive()))
            await asyncio.sleep(READINESS_PERIOD)

    # ---- replica moves ---------------------------------------------------------------------------------

    def _track(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    @property
    def node(self) -> Node:
        """The node's allocatable: the machine's, or what the spec's platform.node says."""
        import psutil

        return node_of(self.plane.spec.platform.node, tuple(sorted(os.sched_getaffinity(0))),
                       psutil.virtual_memory().total, gpu_count())

    async def _place(self, rev: Revision, key: str) -> Claim | None:
        """Room on the node for one more replica of `rev`, held under `key`; while there is none the replica
        is Pending with the scheduler's reason. None: the revision no longer wants it."""
        request = request_of(rev.model.resources)
        while not self.stopping:
            claim = place(request, self.node, list(self.claims.values()), self._pinned_host_bytes())
            if isinstance(claim, Claim):
                self.claims[key] = claim
                if rev.pending:
                    rev.pending = None
                    self.report(rev)
                return claim
            if rev.desired < rev.count(*RUNNING) + rev.launching:
                break
            if rev.pending != claim:
                rev.pending = claim
                log.warning("a replica of %s is Pending: %s", rev.name, claim)
                self.report(rev)
            await asyncio.sleep(PLACEMENT_POLL)
        rev.pending = None
        return None

    def _placement_env(self, claim: Claim) -> dict[str, str]:
        """Where the replica runs: its cores (the function pins itself there, vLLM's CPU engine binds its
        threads there) and its GPUs."""
        cores = ",".join(map(str, claim.cores or shared_cores(self.node, list(self.claims.values()))))
        env = {"THAW_CPU_CORES": cores}
        if not detect().gpu:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cores
        if claim.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, claim.gpus))
        return env

    async def _run_replica(self, rev: Revision) -> None:
        key = f"launch-{next(self._launches)}"
        claim = await self._place(rev, key)
        if claim is None:
            rev.launching -= 1
            self.report(rev)
            return
        async with self.gpu_lock:  # held until ready: the memory a start claims is known only then
            await self._make_gpu_room(rev)
            try:
                replica = await self.supervisor.start(rev.name, rev.model, self.boot_of(rev),
                                                      self._placement_env(claim))
            except Exception:  # noqa: BLE001 - a failed launch is retried by the next reconcile
                log.exception("could not start a replica of %s", rev.name)
                self.claims.pop(key, None)
                return
            finally:
                rev.launching -= 1
            self.claims[replica.id] = self.claims.pop(key)
            rev.replicas.append(replica)
            ok = await self.supervisor.wait_ready(replica, self.session, PROGRESS_DEADLINE)
        if ok and replica.state == State.STARTING:
            replica.move(State.READY)
            rev.failure, rev.failures = None, 0
            rev.throttler.add_replica(replica)
            log.info("replica %s ready after %.2fs", replica.id, replica.ready_at - replica.started_at)
            self.report(rev)
            self._track(self._reserve_host(rev, replica))
        elif replica.state == State.STARTING:
            rev.failures += 1
            wait = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (rev.failures - 1))
            rev.failure = f"replica {replica.id} failed to start: {replica.error}"
            rev.retry_at = time.monotonic() + wait
            log.error("%s; the next start in %.0fs (see %s)", rev.failure, wait, replica.log_path)
            self._forget(rev, replica, State.DEAD)
            await self.supervisor.stop(replica, 0)
            self.report(rev)

    @staticmethod
    async def _leave_rotation(rev: Revision, replica: Replica, state: State) -> bool:
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

    async def _drain(self, rev: Revision, replica: Replica) -> None:
        """No new requests; in-flight ones (streams too) get up to timeoutSeconds; then stop it."""
        if await self._leave_rotation(rev, replica, State.DRAINING):
            await self._stop(rev, replica)

    async def _stop(self, rev: Revision, replica: Replica) -> None:
        if replica.state == State.STOPPED:
            return
        rev.throttler.remove_replica(replica)
        await self.supervisor.stop(replica, self.plane.spec.platform.activator.terminationGracePeriodSeconds)
        self._forget(rev, replica, State.STOPPED)
        self.report(rev)

    def _forget(self, rev: Revision, replica: Replica, state: State) -> None:
        self.claims.pop(replica.id, None)  # what it held of the node is free again
        replica.move(state)
        rev.throttler.remove_replica(replica)
        if replica in rev.replicas:
            rev.replicas.remove(replica)

    # ---- parking -----------------------------------------------------------------------------------------

    def _park_decision(self, rev: Revision, replica: Replica) -> int:
        """The sleep level of a replica the revision gives up (parking.decide_park: parked while the host-RAM
        budget holds it, hibernated while the budget of sleeping replicas allows), or 0: it stops. Older
        sleepers are hibernated or stopped to make room."""
        why_not = ("the model does not park" if not rev.model.park
                   else "the revision has no traffic" if not rev.routable else detect().park_problem())
        sleeping = [(r, other) for other in self.plane.revisions() for r in other.replicas
                    if r.state in (State.PARKED, State.PARKING)]
        budget = self.plane.spec.platform.parking
        decision = decide_park(why_not, weight_bytes(rev.model.source) or replica.gpu_bytes,
                               [Sleeper(r.id, r.sleep_level or PARKED, r.host_bytes, r.last_used)
                                for r, _ in sleeping], budget.host_memory_bytes, budget.gpuContexts)
        if rev.model.park:
            log.info("replica %s: %s", replica.id, decision.reason)
        for r, other in sleeping:
            if r.id in decision.evict:
                log.info("stopping sleeping replica %s: past the budget of sleeping replicas", r.id)
                self._track(self._stop(other, r))
            elif r.id in decision.hibernate:
                self._track(self._hibernate(other, r))
        return decision.level

    def _pinned_host_bytes(self) -> int:
        """Host RAM pinned outside any request: parked replicas' weights and the park buffers awake replicas
        reserved. The parking budget bounds it; the node's memory counts it."""
        return sum(r.host_bytes if r.state == State.PARKED and r.sleep_level == PARKED else r.reserved
                   for other in self.plane.revisions() for r in other.replicas)

    async def _reserve_host(self, rev: Revision, replica: Replica) -> None:
        """A ready replica that may park pins its park's host buffers now, in the background, while the
        parking budget has room for them beside what parked and reserving replicas hold: its first park then
        takes what later ones take, instead of pinning 15+ GiB of fresh memory while a request waits."""
        if not (rev.model.park and detect().sleep_mode):
            return
        budget = self.plane.spec.platform.parking.host_memory_bytes
        if self._pinned_host_bytes() + weight_bytes(rev.model.source) > budget:
            log.info("replica %s reserves no host buffers: the parking budget is held by others", replica.id)
            return
        try:
            body = await self._engine_call(replica, "/reserve_host")
        except Exception as exc:  # noqa: BLE001 - without a reservation its first park is only slower
            log.warning("replica %s could not reserve host buffers (%s)", replica.id, exc)
            return
        replica.reserved = body.get("bytes", 0)

    async def _hibernate(self, rev: Revision, replica: Replica) -> None:
        """A parked replica drops its host copy of the weights (sleep level 2) without waking."""
        if replica.state != State.PARKED or replica.sleep_level != PARKED:
            return
        try:
            body = await self._engine_call(replica, "/sleep?level=2")
        except Exception as exc:  # noqa: BLE001 - one that cannot hibernate frees its host RAM by stopping
            log.warning("replica %s could not hibernate (%s); stopping it", replica.id, exc)
            await self._stop(rev, replica)
            return
        if replica.state == State.PARKED:
            replica.sleep_level = body.get("level", 2)
            replica.host_bytes = _process_tree_rss(replica.pid)
            log.info("replica %s hibernated (host %.1f GiB)", replica.id, replica.host_bytes / 2**30)

    async def _park(self, rev: Revision, replica: Replica, level: int = PARKED) -> None:
        """Out of rotation, in-flight requests finish, then the engine sleeps: GPU memory released."""
        if not await self._leave_rotation(rev, replica, State.PARKING):
            return
        try:
            body = await self._engine_call(replica, f"/sleep?level={level}")
        except Exception as exc:  # noqa: BLE001 - a replica that cannot park is stopped as Knative would
            log.warning("replica %s could not park (%s); stopping it", replica.id, exc)
            await self._stop(rev, replica)
            self.reconcile(rev)  # a request that came meanwhile gets a new replica
            return
        if replica.state != State.PARKING:  # stopped meanwhile (spec change, plane stopping)
            return
        replica.move(State.PARKED)
        replica.sleep_level, replica.reserved = level, 0
        replica.park_seconds = body.get("seconds", 0.0)
        replica.host_bytes = _process_tree_rss(replica.pid)
        replica.gpu_bytes = (body.get("gpu") or {}).get("held", 0)
        log.info("replica %s %s in %.2fs (host %.1f GiB, GPU %.1f GiB)", replica.id,
                 "parked" if level == PARKED else "hibernated", body.get("seconds", 0),
                 replica.host_bytes / 2**30, replica.gpu_bytes / 2**30)
        self.reconcile(rev)  # reports the parked replica; wakes it if a request came while it was parking

    def wake_parked(self, rev: Revision, replica: Replica) -> None:
        replica.move(State.WAKING)
        self._track(self._unpark(rev, replica))

    async def _unpark(self, rev: Revision, replica: Replica) -> None:
        """Wake a parked replica for a request the activator holds; a wake is a cold start of its own kind."""
        t = time.time()
        try:
            async with self.gpu_lock:
                await self._make_gpu_room(rev, exclude=replica)
                body = await self._engine_call(replica, "/wake_up")
        except Exception as exc:  # noqa: BLE001 - a replica that cannot wake is replaced by a fresh one
            log.warning("replica %s could not wake (%s); replacing it", replica.id, exc)
            await self._stop(rev, replica)
            self.reconcile(rev)
            return
        if replica.state != State.WAKING:
            return
        replica.move(State.READY)
        level, replica.sleep_level, replica.host_bytes = replica.sleep_level, 0, 0
        replica.gpu_bytes = (body.get("gpu") or {}).get("held", 0)
        replica.phases = {"wake": body.get("seconds", 0.0), "wake_total": time.time() - t, "wake_level": level}
        replica.ready_at = time.time()
        rev.throttler.add_replica(replica)
        log.info("replica %s woken in %.2fs", replica.id, time.time() - t)
        self.report(rev)  # an update event whose status carries the wake phase
        if level != PARKED:  # hibernation gave its pinned buffers back
            self._track(self._reserve_host(rev, replica))

    async def _engine_call(self, replica: Replica, path: str) -> dict:
        """POST one of vLLM's sleep-mode routes on the replica; its JSON answer, or why it failed."""
        async with self.session.post(replica.url + path, timeout=aiohttp.ClientTimeout(total=120)) as r:
            body = await r.json()
            if r.status != 200:
                raise RuntimeError(body.get("error", {}).get("message", r.status))
            return body

    async def _make_gpu_room(self, rev: Revision, exclude: Replica | None = None) -> None:
        """Before a replica of `rev` starts or wakes: park or stop idle replicas (least recently used first)
        until its share of the GPU (gpu_memory_utilization) is free; wait while busy ones leave too little."""
        end = time.monotonic() + PROGRESS_DEADLINE
        while time.monotonic() < end and not self.stopping:
            memory = await asyncio.to_thread(gpu_memory)
            if memory is None:
                return
            need = int(rev.model.engine.gpu_memory_utilization * memory.total)
            holders = []
            for other in self.plane.revisions():
                for r in other.ready:
                    if r is exclude:
                        continue
                    holders.append((Awake(r.id, memory.held_by(r.pid), r.in_flight == 0 and other.throttler.queued == 0,
                                          r.last_used, other.model.park and detect().sleep_mode), other, r))
            room = plan_gpu_room(need, memory.free, [a for a, _, _ in holders])
            if room is None:
                await asyncio.sleep(GPU_ROOM_POLL)
                continue
            if not room.park and not room.stop:
                return
            moves = []
            for awake, other, r in holders:
                level = self._park_decision(other, r) if awake.id in room.park else 0  # within the budgets too
                if level:
                    log.info("putting %s to sleep (level %d) to make GPU room for %s", r.id, level, rev.name)
                    moves.append(self._park(other, r, level))
                elif awake.id in room.park + room.stop:
                    log.info("stopping %s to make GPU room for %s", r.id, rev.name)
                    moves.append(self._drain(other, r))
            await asyncio.gather(*moves)
        log.warning("no GPU room for %s within %ss; starting anyway", rev.name, PROGRESS_DEADLINE)

