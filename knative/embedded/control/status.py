"""What `thaw status` and `GET /thaw/v1/status` show of the embedded plane: per model, its revisions with
traffic, desired scale, replicas by state, panic, queue, GPU memory and host copies; the platform, the GPU
and the node's host memory."""

from __future__ import annotations

from typing import Any

from thaw.vllm_platform import detect, gpu_memory

from ..dataplane.replica import State
from .revision import ModelRoutes

SHOWN = (State.STARTING, State.READY, State.UNREADY, State.DRAINING, State.PARKED)


def replica_counts(rev) -> dict[str, int]:
    """A revision's replicas by state; one being stopped is "terminating" (Kubernetes' word for its pod) until its
    processes are gone: the GPU memory it held is not free before, so a model is at zero only after."""
    return {**{str(s): rev.count(s) for s in SHOWN}, "terminating": rev.count(State.STOPPED)}


def model_states(models: dict[str, ModelRoutes]) -> list[dict[str, Any]]:
    """What /v1/models shows of each model, on every call: its names, whether traffic routes to it, its ready
    replicas, whether it can take a request now (a model at zero can: a request wakes it), its revisions'
    scale. Reads nothing but the plane's own state (plane_status also asks NVML for each process's GPU memory)."""
    out = []
    for name, entry in models.items():
        percents = {r.revision: (r.percent, r.tag) for r in entry.routes}
        revisions = [{"name": rev.name, "percent": percents.get(rev.name, (0, None))[0],
                      "tag": percents.get(rev.name, (0, None))[1], "desired": rev.desired,
                      "replicas": replica_counts(rev)} for rev in entry.revisions.values()]
        routed = [rev for rev in entry.revisions.values() if percents.get(rev.name, (0,))[0]]
        out.append({"name": name, "served_name": entry.model.served_name, "routed": bool(routed),
                    "ready_replicas": sum(len(rev.ready) for rev in routed),
                    "available": bool(routed) and not all(rev.unservable for rev in routed), "revisions": revisions})
    return out


def plane_status(models: dict[str, ModelRoutes], standby_ready: bool, spec_refused: list,
                 host_floor: int = 0, engine_pool: list | None = None) -> dict[str, Any]:
    """`engine_pool`: the engine pool's shapes (engine_pool.py's view)."""
    import psutil

    memory = gpu_memory()
    shown = []
    for name, entry in models.items():
        percents = {r.revision: (r.percent, r.tag) for r in entry.routes}
        revisions = []
        for rev in entry.revisions.values():
            percent, tag = percents.get(rev.name, (0, None))
            revisions.append({
                "name": rev.name, "percent": percent, "tag": tag, "desired": rev.desired,
                "replicas": {**replica_counts(rev), "starting": rev.count(State.STARTING) + rev.launching - rev.unplaced,
                             "pending": rev.unplaced},
                "pending": rev.pending, "failure": rev.failure, "panic": rev.panicking, "queue": rev.throttler.queued, "in_flight": rev.throttler.in_flight,
                "excess_burst_capacity": rev.excess_burst_capacity, "keep_warm": rev.keep_warm,
                "last_start_phases": rev.last_phases, "last_start_timeline": rev.last_timeline,
                "pods": [{"id": r.id, "pid": r.pid, "port": r.port, "state": str(r.state), "in_flight": r.in_flight,
                          "standby": r.via_standby, "gpu_bytes": memory.held_by(r.pid) if memory else None,
                          "host_copy_bytes": r.copy_bytes, "host_copy_ready": r.copy_ready,
                          "sleep_level": r.sleep_level, "park_seconds": r.park_seconds, "error": r.error}
                         for r in rev.replicas],
                "hibernated": sum(1 for r in rev.replicas if r.state == State.PARKED and r.sleep_level == 2),
            })
        shown.append({"name": name, "served_name": entry.model.served_name,
                       "weights": str(entry.model.source), "revisions": revisions})
    platform = detect()
    host = psutil.virtual_memory()
    return {"models": shown, "standby": standby_ready, "spec_refused": spec_refused, "engine_pool": engine_pool or [],
            "platform": {"device": platform.device, "vllm": platform.vllm, "sleep_mode": platform.sleep_mode},
            "gpu": {"total": memory.total, "free": memory.free} if memory else None,
            "host": {"total": host.total, "available": host.available, "floor": host_floor,
                     "host_copies": sum(r.copy_bytes for e in models.values() for rev in e.revisions.values()
                                        for r in rev.replicas)}}
