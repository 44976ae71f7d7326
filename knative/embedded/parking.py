"""Parked replicas: the decisions, as pure functions over plain numbers (I/O lives in plane.py).

A parked replica is a process whose vLLM engine sleeps (level 1): its weights in pinned host RAM, its KV
cache dropped, its GPU memory released but for the CUDA context. Waking it costs well under a second; a
start from zero costs tens of seconds on a GPU. Three decisions:

- park: where Knative's decision takes a revision to zero, its last replica is parked instead if the
  model allows it, the platform can, and the host-RAM budget for parked weights has room once the least
  recently used parked replicas are stopped;
- make room on the GPU: before a replica starts or wakes, idle awake replicas are parked (or stopped, if
  their model does not park), least recently used first, until the newcomer's share of the GPU is free;
- wake: a request at a revision with a parked replica wakes it rather than starting a new one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Parked:
    id: str
    host_bytes: int  # what it holds in host RAM (its weights, pinned)
    last_used: float  # when it last served a request


@dataclass(frozen=True)
class ParkDecision:
    park: bool
    evict: tuple[str, ...] = ()  # parked replicas to stop first, least recently used first
    reason: str = ""


def decide_park(allowed: str | None, weights_bytes: int, parked: list[Parked], budget: int) -> ParkDecision:
    """Park a replica that the autoscaler is taking away? `allowed` is None when the model and platform
    allow parking, else why not. The budget bounds the host RAM of all parked replicas together."""
    if allowed is not None:
        return ParkDecision(False, reason=allowed)
    if weights_bytes > budget:
        return ParkDecision(False, reason=f"its weights ({weights_bytes} bytes) exceed the parking budget ({budget})")
    used = sum(p.host_bytes for p in parked)
    evict = []
    for p in sorted(parked, key=lambda p: p.last_used):
        if used + weights_bytes <= budget:
            break
        evict.append(p.id)
        used -= p.host_bytes
    return ParkDecision(True, tuple(evict), "parked" if not evict else f"parked; {len(evict)} older parked stopped")


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
