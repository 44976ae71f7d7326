"""Where a replica runs: the node's allocatable, what each replica holds of it, and Pending while nothing fits
(the I/O around node.py's pure rules: the scheduler's part of Kubernetes, on one node)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable, Protocol

from thaw.spec import Spec
from thaw.vllm_platform import detect, gpu_count

from ..dataplane.replica import RUNNING
from .node import Claim, Node, node_of, place, request_of, shared_cores
from .revision import Revision

log = logging.getLogger("thaw.placement")

PLACEMENT_POLL = 0.25  # how often a Pending replica looks for room on the node again


class Loop(Protocol):
    """What placement reads of the reconcile loop (reconciler.py)."""

    stopping: bool

    def report(self, rev: Revision) -> None: ...


class Placement:
    def __init__(self, spec: Callable[[], Spec], loop: Loop, held_host_bytes: Callable[[], int]):
        """`held_host_bytes()`: host RAM held outside any request (sleeping replicas' pinned weights)."""
        self.spec = spec
        self.loop = loop
        self.held_host_bytes = held_host_bytes
        self.claims: dict[str, Claim] = {}  # replica id (or a launch's placeholder) -> what it holds of the node

    @property
    def node(self) -> Node:
        """The node's allocatable: the machine's, or what the spec's platform.node says."""
        import psutil

        return node_of(self.spec().platform.node, tuple(sorted(os.sched_getaffinity(0))),
                       psutil.virtual_memory().total, gpu_count())

    async def place(self, rev: Revision, key: str) -> Claim | None:
        """Room on the node for one more replica of `rev`, held under `key`; while there is none the replica
        is Pending with the scheduler's reason. None: the revision no longer wants it."""
        request = request_of(rev.model.resources, rev.model.engine.tensor_parallel_size)
        waiting = False
        try:
            while not self.loop.stopping:
                claim = place(request, self.node, list(self.claims.values()), self.held_host_bytes())
                if isinstance(claim, Claim):
                    self.claims[key] = claim
                    if rev.pending:
                        rev.pending = None
                        self.loop.report(rev)
                    return claim
                if rev.desired < rev.count(*RUNNING) + rev.launching:
                    break
                if not waiting:
                    waiting = True
                    rev.unplaced += 1
                if rev.pending != claim:
                    rev.pending = claim
                    log.warning("a replica of %s is Pending: %s", rev.name, claim)
                    self.loop.report(rev)
                await asyncio.sleep(PLACEMENT_POLL)
            rev.pending = None
            return None
        finally:
            if waiting:
                rev.unplaced -= 1

    def try_place(self, rev: Revision, key: str) -> Claim | None:
        """Room for one more replica of `rev` now, held under `key`, or None (never Pending: for the engine pool,
        which starts only into room that is free)."""
        request = request_of(rev.model.resources, rev.model.engine.tensor_parallel_size)
        claim = place(request, self.node, list(self.claims.values()), self.held_host_bytes())
        if not isinstance(claim, Claim):
            return None
        self.claims[key] = claim
        return claim

    def bind(self, key: str, replica_id: str) -> None:
        """A launch's placeholder claim becomes its replica's."""
        self.claims[replica_id] = self.claims.pop(key)

    def release(self, key: str) -> None:
        """What a replica (or a launch that failed) held of the node is free again."""
        self.claims.pop(key, None)

    def env(self, claim: Claim) -> dict[str, str]:
        """Where the replica runs: its cores (the function pins itself there, vLLM's CPU engine binds its
        threads there) and its GPUs."""
        cores = ",".join(map(str, claim.cores or shared_cores(self.node, list(self.claims.values()))))
        env = {"THAW_CPU_CORES": cores}
        if not detect().gpu:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cores
        if claim.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, claim.gpus))
        return env
