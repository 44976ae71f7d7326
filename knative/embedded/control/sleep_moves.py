"""The moves of sleeping replicas (vLLM's sleep mode, on CUDA) and of the node's memory: put a replica the
revision gives up to sleep, wake one for a request, make room on the GPU for a start or a wake, and build or
drop host copies of weights as parking.py's plan says; every grant in the ledger (ledger.py) from the moment
it is decided.

Going to sleep copies nothing (0.1 s), so a neighbour put to sleep for a request's GPU room never keeps it
waiting; host copies are built in the background by the replicas the plan picks, awake or asleep. Wakes run
in parallel where they do not share a link: wakes from host copies take the host -> device link one at a
time, in the order they came (a second would only halve the first one's bandwidth); wakes from files (the
page cache or the tier) run beside them. A start still runs alone among starts: vLLM's engine sizes itself
against the device's free memory while it initialises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Awaitable, Callable, Protocol

import aiohttp
import psutil

from thaw.spec import Spec
from thaw.vllm_platform import detect, gpu_memory

from ..dataplane.replica import Replica, State
from .ledger import NodeLedger
from .node import system_floor
from .parking import HIBERNATED, PARKED, Awake, HostUser, plan_gpu_room, plan_host, sleeper_contexts
from .replica_moves import PROGRESS_DEADLINE, NoRoom, ReplicaMoves
from .revision import Revision, weight_bytes

log = logging.getLogger("thaw.reconciler")

GPU_ROOM_POLL = 0.25  # how often a start or wake waiting for GPU memory looks again
AWAKE_STATES = (State.READY, State.UNREADY)  # processes holding their share of the GPU
ASLEEP_STATES = (State.PARKING, State.PARKED)


class Loop(Protocol):
    """What the sleep moves read of the reconcile loop (reconciler.py)."""

    session: aiohttp.ClientSession | None
    stopping: bool

    def report(self, rev: Revision) -> None: ...
    def reconcile(self, rev: Revision) -> None: ...
    def track(self, coro) -> None: ...


class SleepMoves:
    def __init__(self, spec: Callable[[], Spec], revisions: Callable[[], list[Revision]], replicas: ReplicaMoves,
                 loop: Loop, give_back: Callable[[Revision, Replica], Awaitable[bool]] | None = None,
                 pooled: Callable[[], int] = lambda: 0):
        """`give_back(rev, replica)`: a sleeper the budget evicts goes back to the engine pool, if its shape lacks
        an engine there (engine_pool.py); False: it stops. `pooled()`: the engines the pool holds, which count
        against gpuContexts before the sleepers do."""
        self.spec = spec
        self.give_back = give_back
        self.pooled = pooled
        self.revisions = revisions
        self.replicas = replicas
        self.loop = loop
        self.ledger = NodeLedger()
        self._dropping: set[str] = set()  # replicas giving their host copy back now
        self.copy_lane = asyncio.Lock()  # wakes from host copies, one at a time on the host -> device link
        self._gpu_pids: dict[str, Callable[[], int | None]] = {}  # GPU move id -> the pid holding its memory
        self.process_bytes = 0  # the most host RAM a ready replica's processes took (host copy aside)

    # ---- who sleeps -------------------------------------------------------------------------------------

    def sleeps(self, rev: Revision, replica: Replica) -> bool:
        """Whether a replica the revision gives up goes to sleep (else it stops, as Knative would)."""
        why_not = ("the model does not park" if not rev.model.park
                   else "the revision has no traffic" if not rev.routable
                   else "the budget of sleeping replicas (gpuContexts) is 0"
                   if self.spec().platform.parking.gpuContexts < 1 else detect().park_problem())
        if why_not and rev.model.park:
            log.info("replica %s stops instead of sleeping: %s", replica.id, why_not)
        return why_not is None

    # ---- host copies: who holds one ----------------------------------------------------------------------

    def _replicas(self, *states: State) -> list[tuple[Revision, Replica]]:
        return [(rev, r) for rev in self.revisions() for r in rev.replicas if r.state in states]

    def held_host_bytes(self) -> int:
        """Host RAM pinned outside any request: host copies granted, built or being built."""
        return sum(r.copy_bytes for _, r in self._replicas(*State))

    def ready(self, rev: Revision, replica: Replica) -> None:
        """A replica became ready: what its processes take is what the next start will take (counted against
        the node's floor while one starts), then the host plan."""
        try:
            root = psutil.Process(replica.pid)
            rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            rss = 0
        self.process_bytes = max(self.process_bytes, rss - replica.copy_bytes)
        self.plan_host()

    async def evict(self, rev: Revision, replica: Replica) -> None:
        """A sleeper past the budget of sleeping replicas (gpuContexts): its engine back to the pool where its shape
        lacks one there, else stopped."""
        if self.give_back is not None and await self.give_back(rev, replica):
            log.info("sleeping replica %s went back to the engine pool: past the budget of sleeping replicas "
                     "(gpuContexts)", replica.id)
            self.plan_host()
            return
        log.info("stopping sleeping replica %s: past the budget of sleeping replicas (gpuContexts)", replica.id)
        await self.replicas.stop(rev, replica)

    def plan_host(self) -> None:
        """Carry out parking.plan_host over every replica that sleeps: copies granted (most recent first),
        dropped (past the budget, or below the node's floor), sleepers past gpuContexts stopped."""
        if not detect().sleep_mode:
            return
        parking, node = self.spec().platform.parking, self.spec().platform.node
        users, by_id = [], {}
        for rev, r in self._replicas(*AWAKE_STATES, State.WAKING, *ASLEEP_STATES):
            if not rev.model.park:
                continue
            size = 0 if r.no_copy else (r.copy_bytes or weight_bytes(rev.model.source))
            users.append(HostUser(r.id, size, r.copy_bytes > 0, r.last_used, r.state in ASLEEP_STATES))
            by_id[r.id] = (rev, r)
        memory = psutil.virtual_memory()
        floor = system_floor(memory.total, node.systemReserved)
        starting = len(self._replicas(State.STARTING)) * self.process_bytes  # not yet in what the kernel reports
        plan = plan_host(users, parking.host_memory_bytes,
                         self.ledger.host_grantable(memory.available, floor) - starting,
                         sleeper_contexts(parking.gpuContexts, self.pooled()))
        for rid in () if self.replicas.gpu_start_in_progress() else plan.evict:  # after the start (revision.plan)
            rev, r = by_id[rid]
            self.loop.track(self.evict(rev, r))
        for rid in plan.drop:
            if rid not in self._dropping:  # the plan runs after every move: one drop per copy
                self._dropping.add(rid)
                self.loop.track(self.drop_copy(*by_id[rid]))
        for rid in plan.grant:
            rev, r = by_id[rid]
            r.copy_bytes = next(u.copy_bytes for u in users if u.id == rid)
            self.ledger.grant_copy(rid, r.copy_bytes)
            self.loop.track(self.build_copy(rev, r))

    async def build_copy(self, rev: Revision, replica: Replica) -> None:
        """The replica builds its host copy while idle (minutes if it keeps serving); parked once built if it
        sleeps meanwhile."""
        try:
            body = await self.engine_call(replica, "POST", "/host_copy", timeout=None)
        except Exception as exc:  # noqa: BLE001 - without a copy it hibernates: slower, not wrong
            replica.copy_bytes, replica.copy_ready = 0, False
            replica.no_copy = "own loader" in str(exc)
            log.info("replica %s holds no host copy: %s", replica.id, exc)
        else:
            replica.copy_bytes, replica.copy_ready = body["bytes"], True
            if replica.state == State.PARKED:
                replica.sleep_level = body.get("level", PARKED)
                self.loop.report(rev)
            log.info("replica %s built its host copy (%.1f GiB)", replica.id, replica.copy_bytes / 2**30)
        finally:
            self.ledger.copy_settled(replica.id)

    async def drop_copy(self, rev: Revision, replica: Replica) -> None:
        """The replica gives its host copy back (a parked one is hibernated, without waking)."""
        try:
            body = await self.engine_call(replica, "DELETE", "/host_copy")
        except Exception as exc:  # noqa: BLE001 - one that cannot give its memory back is stopped
            log.warning("replica %s could not drop its host copy (%s); stopping it", replica.id, exc)
            await self.replicas.stop(rev, replica)
            return
        finally:
            self._dropping.discard(replica.id)
        replica.copy_bytes, replica.copy_ready = 0, False
        self.ledger.copy_settled(replica.id)
        if replica.state == State.PARKED:
            replica.sleep_level = body.get("level", HIBERNATED)
            log.info("replica %s hibernated: its host copy went back to the system", replica.id)
            self.loop.report(rev)

    # ---- sleep and wake ---------------------------------------------------------------------------------------

    async def park(self, rev: Revision, replica: Replica, for_start: bool = False) -> None:
        """Out of rotation, in-flight requests finish, then the engine sleeps: parked if its host copy is
        built, hibernated otherwise. A sleep that fails leaves an engine that serves no more: stopped."""
        if not await self.replicas.leave_rotation(rev, replica, State.PARKING):
            return
        memory = await asyncio.to_thread(gpu_memory, replica.gpus[0] if replica.gpus else 0)
        if memory is not None:
            replica.gpu_bytes = memory.held_by(replica.pid)  # what its wake will need again
        try:
            async with self.replicas.releasing(for_start):
                body = await self.engine_call(replica, "POST", "/sleep?level=1")
        except Exception as exc:  # noqa: BLE001 - its memory goes back with its process
            log.warning("replica %s could not go to sleep (%s); stopping it", replica.id, exc)
            await self.replicas.stop(rev, replica, for_start)
            self.plan_host()
            self.loop.reconcile(rev)  # a request that came meanwhile gets a new replica
            return
        if replica.state != State.PARKING:  # stopped meanwhile (spec change, plane stopping)
            return
        replica.move(State.PARKED)
        replica.sleep_level = body.get("level", HIBERNATED)
        replica.park_seconds = body.get("seconds", 0.0)
        log.info("replica %s %s in %.2fs", replica.id, "parked" if replica.sleep_level == PARKED else "hibernated",
                 replica.park_seconds)
        self.plan_host()
        self.loop.reconcile(rev)  # reports the sleeping replica; wakes it if a request came while it slept

    def wake(self, rev: Revision, replica: Replica) -> None:
        replica.move(State.WAKING)
        self.loop.track(self.wake_up(rev, replica))

    async def wake_up(self, rev: Revision, replica: Replica) -> None:
        """Wake a sleeping replica for a request the activator holds; a wake is a cold start of its own kind."""
        t = time.time()
        level = replica.sleep_level
        # The lane is this task's first await: tasks take their first step in the order they were created and
        # the lock serves waiters in the order they came, so wakes from host copies go in the order asked for
        # (a graph's look-ahead asks for its first step's model first).
        lane = self.copy_lane if level == PARKED else contextlib.nullcontext()
        marks = {"asked": t}
        try:
            async with lane, self.gpu_move(rev, f"wake-{replica.id}", lambda: replica.pid, replica.gpus,
                                           need=replica.gpu_bytes or None, exclude=replica):
                marks["room"] = time.time()
                body = await self.engine_call(replica, "POST", "/wake_up")
                marks["woken"] = time.time()
        except Exception as exc:  # noqa: BLE001 - a replica that cannot wake is replaced by a fresh one
            log.warning("replica %s could not wake (%s); replacing it", replica.id, exc)
            await self.replicas.stop(rev, replica)
            self.loop.reconcile(rev)
            return
        if replica.state != State.WAKING:
            return
        replica.move(State.READY)
        replica.sleep_level = 0
        replica.gpu_bytes = (body.get("gpu") or {}).get("held", 0)
        replica.phases = {"wake": body.get("seconds", 0.0), "wake_total": time.time() - t,
                          "wake_level": body.get("level", level)}
        replica.ready_at = time.time()
        rev.throttler.add_replica(replica)
        rev.last_marks = {**marks, "serving": time.time()}
        log.info("replica %s woken from %s in %.2fs", replica.id,
                 "its host copy" if level == PARKED else "the files", time.time() - t)
        self.loop.report(rev)  # an update event whose status carries the wake phase
        self.plan_host()

    async def engine_call(self, replica: Replica, method: str, path: str, timeout: float | None = 120) -> dict:
        """One of the replica's sleep routes; its JSON answer, or why it failed."""
        async with self.loop.session.request(method, replica.url + path,
                                             timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            body = await r.json()
            if r.status != 200:
                raise RuntimeError(body.get("error", {}).get("message", r.status))
            return body

    # ---- GPU room -------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def gpu_move(self, rev: Revision, move_id: str, pid: Callable[[], int | None], gpus: tuple[int, ...] = (),
                       need: int | None = None, exclude: Replica | None = None,
                       for_start: bool = False, displace: bool = True) -> AsyncIterator[None]:
        """A start or a wake of a replica of `rev` on `gpus` (() the first device, shared): room made first
        (idle replicas there put to sleep, least recently used first: parking.plan_gpu_room), then its need
        counted in the ledger until the move ends (`pid()`: the process that takes the memory). Not
        `displace`: NoRoom unless the room is free now (the engine pool's starts move nobody)."""
        device = gpus[0] if gpus else 0
        memory = await asyncio.to_thread(gpu_memory, device)
        if memory is None:
            yield
            return
        need = need or int(rev.model.engine.gpu_memory_utilization * memory.total)
        await self._make_room(rev, move_id, need, gpus, exclude, for_start, displace)
        self._gpu_pids[move_id] = pid
        self.ledger.begin_gpu(move_id, need)  # decided: no await between the room found and this
        try:
            yield
        finally:
            self.ledger.end_gpu(move_id)
            self._gpu_pids.pop(move_id, None)

    async def _make_room(self, rev: Revision, move_id: str, need: int, gpus: tuple[int, ...],
                         exclude: Replica | None, for_start: bool = False, displace: bool = True) -> None:
        device = gpus[0] if gpus else 0
        end = time.monotonic() + PROGRESS_DEADLINE
        while time.monotonic() < end and not self.loop.stopping:
            memory = await asyncio.to_thread(gpu_memory, device)
            if memory is None:
                return
            pids = {mid: get() for mid, get in self._gpu_pids.items()}
            free = self.ledger.gpu_free(memory.free, lambda mid: memory.held_by(pids[mid]) if pids.get(mid) else 0)
            holders = [(Awake(r.id, memory.held_by(r.pid), r.in_flight == 0 and other.throttler.queued == 0,
                              r.last_used, other.model.park and detect().sleep_mode, bool(r.gpus)), other, r)
                       for other, r in self._replicas(*AWAKE_STATES)
                       if r is not exclude and (r.gpus[0] if r.gpus else 0) == device]
            room = plan_gpu_room(need, free, [a for a, _, _ in holders], exclusive=bool(gpus))
            if room is not None and not room.sleep and not room.stop:
                return
            if not displace:
                raise NoRoom(f"{need} bytes of GPU memory are not free without moving a replica")
            if room is None:
                await asyncio.sleep(GPU_ROOM_POLL)
                continue
            moves = []
            for awake, other, r in holders:
                if awake.id in room.sleep and self.sleeps(other, r):
                    log.info("putting %s to sleep to make GPU room for %s", r.id, rev.name)
                    moves.append(self.park(other, r, for_start))
                elif awake.id in room.sleep + room.stop:
                    log.info("stopping %s to make GPU room for %s", r.id, rev.name)
                    moves.append(self.replicas.drain(other, r, for_start))
            await asyncio.gather(*moves)
        log.warning("no GPU room for %s within %ss; going on anyway", rev.name, PROGRESS_DEADLINE)
