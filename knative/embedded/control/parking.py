"""Sleeping replicas and the node's memory: the decisions, as pure functions over plain numbers (sleep_moves.py
does the I/O; tests/test_parking.py checks each rule as a table).

A sleeping replica is a process whose vLLM engine sleeps (its weights and KV cache off the GPU, its CUDA
context and compiled code kept). Its rung depends on one thing: whether it holds a **host copy** of its
weights, the checkpoint's bytes in pinned host RAM:
- parked: asleep with a complete host copy; a wake streams the weights from pinned RAM into HBM
  (functions/weights.py), under half a second for an 8B model;
- hibernated: asleep without one; a wake streams them from the page cache or the tier, about 1.3 s.
Going to sleep never copies anything (it drops the GPU's weights: 0.1 s), and a host copy is built off every
request's path, piece by piece while its engine is idle: by an awake replica ahead of its next sleep, or by a
hibernated one, which is then parked (promoted) without the GPU. So no request ever waits for memory to be
pinned, and one budget decides who holds a copy:

- plan_host: every replica that could hold a copy, most recently used first, holds one while the parking
  budget (platform.parking.hostMemory) holds them all, and while the node keeps its floor of free RAM
  (platform.node.systemReserved): a new copy is granted only from what the kernel can still hand out above
  the floor, less what earlier grants have yet to pin (counted from the grant, not from its end, as
  Kubernetes' scheduler counts a pod it assumed onto a node before it binds). Sleeping replicas past the
  budget of sleeping replicas (gpuContexts, less the engine pool's engines) stop, least recently used first.
  Below the floor, copies are dropped, least recently used first, until the floor holds again;
- plan_gpu_room: before a replica starts or wakes, idle awake replicas go to sleep (or stop, if their model
  does not sleep), least recently used first, until the newcomer's share of the GPU is free; a replica that
  asks for whole GPUs (nvidia.com/gpu) has its device to itself while awake, so every other awake replica
  there goes to sleep first, and it goes to sleep first for any other newcomer.
"""

from __future__ import annotations

from dataclasses import dataclass

PARKED, HIBERNATED = 1, 2  # the rungs a sleeping replica reports (thaw's sleep levels)


@dataclass(frozen=True)
class HostUser:
    """A replica as the host plan sees it."""

    id: str
    copy_bytes: int  # the host copy of its weights (0: it cannot have one: a quantized checkpoint, say)
    has_copy: bool  # holds one, or was granted one that is being built
    last_used: float
    asleep: bool = False  # sleeping, or going to sleep: it counts against gpuContexts


@dataclass(frozen=True)
class HostPlan:
    grant: tuple[str, ...] = ()  # build a host copy
    drop: tuple[str, ...] = ()  # let go of its host copy (a parked replica becomes hibernated)
    evict: tuple[str, ...] = ()  # sleeping replicas to stop (past gpuContexts)

    @property
    def moves(self) -> bool:
        return bool(self.grant or self.drop or self.evict)


def plan_host(users: list[HostUser], budget: int, grantable: int, contexts: int) -> HostPlan:
    """Who holds a host copy and which sleepers stop. `budget` bounds all host copies together; `grantable`
    is what new copies may take now (free RAM above the node's floor, less grants not yet pinned; negative
    when the node is below its floor: copies are then dropped until that much is freed). Replicas stopped
    here hold nothing."""
    grant, drop, evict = [], [], []
    held = new = sleeping = 0
    kept: list[HostUser] = []
    for user in sorted(users, key=lambda u: -u.last_used):
        if user.asleep:
            sleeping += 1
            if sleeping > contexts:
                evict.append(user.id)
                continue
        fits = user.copy_bytes and held + user.copy_bytes <= budget
        if fits and (user.has_copy or new + user.copy_bytes <= grantable):
            held += user.copy_bytes
            if user.has_copy:
                kept.append(user)
            else:
                new += user.copy_bytes
                grant.append(user.id)
        elif user.has_copy:
            drop.append(user.id)
    deficit = -grantable
    for user in reversed(kept):  # below the floor: the least recently used copies go first
        if deficit <= 0:
            break
        drop.append(user.id)
        deficit -= user.copy_bytes
    return HostPlan(tuple(grant), tuple(drop), tuple(evict))


def sleeper_contexts(gpu_contexts: int, pooled: int) -> int:
    """What gpuContexts leaves to sleeping replicas: the engine pool's engines (each a process and a CUDA context,
    as a sleeper is) count first, since the spec sized the pool; sleepers past the rest go back to the pool or
    stop, least recently used first (plan_host)."""
    return max(0, gpu_contexts - pooled)


@dataclass(frozen=True)
class Awake:
    id: str
    gpu_bytes: int  # what it holds on the GPU now
    idle: bool  # nothing in flight and nothing waiting for it
    last_used: float
    sleeps: bool  # its model sleeps (else it is stopped to make room)
    exclusive: bool = False  # it asked for whole GPUs: while awake, nothing else is awake on them


@dataclass(frozen=True)
class RoomPlan:
    sleep: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()


def plan_gpu_room(need_bytes: int, free_bytes: int, awake: list[Awake], exclusive: bool = False) -> RoomPlan | None:
    """What to put to sleep or stop so that `need_bytes` of the GPU are free for a replica about to start or
    wake (`exclusive`: one that asked for the whole device). `awake` are the awake replicas on its device.
    Idle replicas go, least recently used first, only as many as needed, but every exclusive one goes, and
    every one goes for an exclusive newcomer. None: busy replicas stand in the way, so it cannot fit now
    (the caller waits, as a request waits for a pod that cannot be scheduled yet)."""
    must = [a for a in awake if exclusive or a.exclusive]
    if any(not a.idle for a in must):
        return None
    free_bytes += sum(a.gpu_bytes for a in must)
    going = list(must)
    for a in sorted((a for a in awake if a.idle and a not in must), key=lambda a: a.last_used):
        if free_bytes >= need_bytes:
            break
        going.append(a)
        free_bytes += a.gpu_bytes
    if free_bytes < need_bytes:
        return None
    return RoomPlan(tuple(a.id for a in going if a.sleeps), tuple(a.id for a in going if not a.sleeps))
