"""Sleeping replicas: the decisions, as pure functions over plain numbers (the reconciler does the I/O).

A sleeping replica is a process whose vLLM engine sleeps, on one of two rungs:
- parked (sleep level 1): its weights in pinned host RAM, its KV cache dropped, its GPU memory released but
  for the CUDA context; a wake copies the weights back (well under a second for an 8B model);
- hibernated (sleep level 2): the weights dropped too; a wake streams them back from the page cache or
  the tier (functions/weights.py): about two seconds, for a process that holds little host RAM.
Both cost a CUDA context on the GPU and a process; a start from zero costs far more. The decisions:

- rungs: where Knative's decision takes a revision to zero, its last replica goes to sleep instead if the
  model allows it and the platform can. The most recently used sleepers are parked while the host-RAM
  budget holds their weights, the next ones hibernated while the budget of sleeping replicas (GPU
  contexts) allows, and the least recently used stopped;
- make room on the GPU: before a replica starts or wakes, idle awake replicas are put to sleep (or
  stopped, if their model does not sleep), least recently used first, until the newcomer's share is free;
- wake: a request at a revision with a sleeping replica wakes it rather than starting a new one.
"""

from __future__ import annotations

from dataclasses import dataclass

PARKED, HIBERNATED = 1, 2  # vLLM's sleep levels


@dataclass(frozen=True)
class Sleeper:
    id: str
    level: int  # PARKED or HIBERNATED
    host_bytes: int  # host RAM it holds asleep (parked: its weights, pinned)
    last_used: float  # when it last served a request


@dataclass(frozen=True)
class ParkDecision:
    level: int  # the newcomer's rung: PARKED, HIBERNATED, or 0 (stopped, as Knative would)
    hibernate: tuple[str, ...] = ()  # parked replicas that drop their host copy (least recently used)
    evict: tuple[str, ...] = ()  # sleeping replicas to stop
    reason: str = ""


def decide_park(allowed: str | None, weights_bytes: int, sleepers: list[Sleeper], host_budget: int,
                contexts: int) -> ParkDecision:
    """The rung of a replica the autoscaler is taking away, and what moves among the others for it.
    `allowed` is None when the model and platform allow sleep, else why not. `host_budget` bounds the host
    RAM of parked replicas together; `contexts` bounds how many replicas sleep at all. A hibernated
    replica is never promoted back to parked (that takes a wake); a parked one may be hibernated."""
    if allowed is not None:
        return ParkDecision(0, reason=allowed)
    if contexts < 1:
        return ParkDecision(0, reason="the budget of sleeping replicas (gpuContexts) is 0")
    level, host, count, hibernate, evict = 0, 0, 0, [], []
    newcomer = Sleeper("", PARKED, weights_bytes, float("inf"))
    for s in sorted([newcomer, *sleepers], key=lambda s: -s.last_used):
        if count >= contexts:
            evict.append(s.id)
            continue
        count += 1
        rung = PARKED if s.level == PARKED and host + s.host_bytes <= host_budget else HIBERNATED
        if rung == PARKED:
            host += s.host_bytes
        if s is newcomer:
            level = rung
        elif rung != s.level:
            hibernate.append(s.id)
    moves = [f"{len(hibernate)} older parked hibernated"] * bool(hibernate) + \
            [f"{len(evict)} older sleeping stopped"] * bool(evict)
    rung = "parked" if level == PARKED else "hibernated (its weights do not fit the parking budget)"
    return ParkDecision(level, tuple(hibernate), tuple(evict), "; ".join([rung, *moves]))


@dataclass(frozen=True)
class Awake:
    id: str
    gpu_bytes: int  # what it holds on the GPU now
    idle: bool  # nothing in flight and nothing waiting for it
    last_used: float
    parks: bool  # its model parks (else it is stopped to make room)


@dataclass(frozen=True)
class RoomPlan:
    park: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()


def plan_gpu_room(need_bytes: int, free_bytes: int, awake: list[Awake]) -> RoomPlan | None:
    """What to park or stop so that `need_bytes` of the GPU are free for a replica about to start or wake.
    Idle replicas go, least recently used first, only as many as needed. None: busy replicas hold too much
    for it to fit now (the caller waits, as a request waits for a pod that cannot be scheduled yet)."""
    if free_bytes >= need_bytes:
        return RoomPlan()
    park, stop = [], []
    for a in sorted((a for a in awake if a.idle), key=lambda a: a.last_used):
        (park if a.parks else stop).append(a.id)
        free_bytes += a.gpu_bytes
        if free_bytes >= need_bytes:
            return RoomPlan(tuple(park), tuple(stop))
    return None
