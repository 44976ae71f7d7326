"""The node's pool of built engines (functions/pool.py): per shape, `parking.enginePool` replicas started ahead,
in the background, as one model of that shape; each waits without weights until a start of any model of its
shape adopts it (replica_moves.py), after which the pool starts another.

A shape is what an engine can be adopted across (`shape_of`): the architecture view, the tokenizer and the
engine arguments (functions/engine_plan.py's `engine_key`) and the replica's resources on the node. A model
whose weights are staged from s3:// or hf:// has no shape until its folder is known, and on a platform with
sleep mode only a parking model has one: a waiting engine must hold no GPU memory but its context.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from thaw.functions.engine_plan import engine_key
from thaw.functions.weights import fast_load_problem
from thaw.launch import ReplicaBoot
from thaw.spec import Model
from thaw.vllm_platform import detect

from ..dataplane.replica import Replica
from .replica_moves import NoRoom
from .revision import Revision

log = logging.getLogger("thaw.pool")

BACKOFF = 30.0  # seconds before a shape whose pooled engine failed to start is tried again
ROOM_POLL = 1.0  # seconds before a shape that found no free room looks again


def shape_of(model: Model, boot: ReplicaBoot, sleep_mode: bool) -> str | None:
    """The key of the engines `model` can adopt, or None where it cannot adopt one."""
    folder = boot.model_dir or (boot.source if boot.source and "://" not in boot.source else None)
    if folder is None or not Path(folder).is_dir() or fast_load_problem(folder) is not None:
        return None
    if sleep_mode and not model.park:
        return None
    engine = model.replica_engine().model_dump(mode="json", exclude_none=True)
    resources = model.resources.model_dump(mode="json", exclude_none=True) if model.resources else None
    return engine_key(folder, {"engine": engine, "resources": resources})


@dataclass(frozen=True)
class Shape:
    key: str
    template: str  # the revision whose model a pooled engine is launched as


def shapes(revisions: list[tuple[str, str | None]]) -> list[Shape]:
    """One pool per key among (revision, key) pairs, launched as the first revision (by name) of that key."""
    first: dict[str, str] = {}
    for name, key in sorted(revisions):
        if key is not None:
            first.setdefault(key, name)
    return [Shape(key, name) for key, name in sorted(first.items())]


def starts_wanted(size: int, have: int, starting: bool, retry_at: float, now: float, contexts_free: int) -> int:
    """How many engines of a shape to start now: one at a time, up to `size`, none during a back-off, and none
    once the pool's engines of every shape fill the node's budget of sleeping engines (gpuContexts: each holds a
    process and a CUDA context, as a sleeper does)."""
    return 1 if size > have and not starting and now >= retry_at and contexts_free > 0 else 0


class EnginePool:
    def __init__(self, size: Callable[[], int], boot_of: Callable[[Revision], ReplicaBoot], launch, stop,
                 contexts: Callable[[], int]):
        """`launch(rev, boot, pool_id)` starts a replica as `rev`'s model with `boot` and waits for it (the
        replica moves' `launch_pooled`): the replica, ready, or None; `stop(replica)` stops one; `contexts()` the
        node's budget of sleeping engines (parking.gpuContexts), which the pool's engines count against."""
        self.size = size
        self.contexts = contexts
        self.boot_of = boot_of
        self.launch = launch
        self.stop = stop
        self.waiting: dict[str, list[Replica]] = {}  # key -> pooled replicas, ready for an adoption
        self.starting: set[str] = set()
        self.retry_at: dict[str, float] = {}
        self.templates: dict[str, str] = {}  # key -> the revision its engines are launched as
        self.adopted: dict[str, int] = {}  # key -> engines adopted so far
        self._keys: dict[str, str | None] = {}  # revision -> its shape, computed once
        self._told = False  # that no model has a shape
        self._built: dict[str, asyncio.Event] = {}  # key -> set once its latest engine start ended

    def key_of(self, rev: Revision) -> str | None:
        if rev.name not in self._keys:
            self._keys[rev.name] = shape_of(rev.model, self.boot_of(rev), detect().sleep_mode)
        return self._keys[rev.name]

    def fill(self, revisions: list[Revision], track) -> None:
        """Start what each shape lacks and stop what no shape wants any more (in tasks `track` keeps); forget
        pooled replicas that died."""
        size = self.size()
        by_name = {rev.name: rev for rev in revisions}
        now = time.monotonic()
        wanted = shapes([(rev.name, self.key_of(rev)) for rev in revisions]) if size else []
        if size and not wanted and not self._told:
            self._told = True
            log.warning("parking.enginePool is %d but no model can adopt an engine: a model needs its weights in a "
                        "folder (not s3:// or hf://), a safetensors checkpoint that is not quantized, and, where vLLM "
                        "has sleep mode, park: true", size)
        for key in set(self.waiting) - {shape.key for shape in wanted}:
            for replica in self.waiting.pop(key):
                track(self.stop(replica))
        for shape in wanted:
            self.templates[shape.key] = shape.template
            engines = self.waiting.setdefault(shape.key, [])
            for dead in [r for r in engines if not r.alive()]:
                log.error("pooled replica %s died (see %s)", dead.id, dead.log_path)
                engines.remove(dead)
                track(self.stop(dead))  # what is left of its process tree, and its place on the node
            while len(engines) > size:
                track(self.stop(engines.pop()))
            if starts_wanted(size, len(engines), shape.key in self.starting, self.retry_at.get(shape.key, 0), now,
                             self.contexts() - self.held()):
                self.starting.add(shape.key)
                track(self._start(shape, by_name[shape.template]))

    async def _start(self, shape: Shape, rev: Revision) -> None:
        built = self._built[shape.key] = asyncio.Event()
        try:
            replica = await self.launch(rev, dataclasses.replace(self.boot_of(rev), pool=True), f"pool-{shape.key[:8]}")
        except NoRoom as why:
            log.debug("no pooled engine of %s's shape yet: %s", rev.name, why)
            self.retry_at[shape.key] = time.monotonic() + ROOM_POLL
            return
        finally:
            self.starting.discard(shape.key)
            built.set()
        if replica is None:
            self.retry_at[shape.key] = time.monotonic() + BACKOFF
            return
        self.waiting.setdefault(shape.key, []).append(replica)
        log.info("pooled replica %s waits for a model of %s's shape", replica.id, rev.name)

    async def give_back(self, rev: Revision, replica: Replica, release) -> bool:
        """`rev`'s sleeping replica into the pool, where its shape lacks an engine (`release(replica)` makes its
        engine give its model up); False where the pool has no room for it or it could not."""
        key = self.key_of(rev) if self.size() else None
        if key is None or key in self.starting or len(self.waiting.get(key, [])) >= self.size():
            return False
        self.starting.add(key)  # no launch for this shape meanwhile
        try:
            if not await release(replica):
                return False
        finally:
            self.starting.discard(key)
        self.waiting.setdefault(key, []).append(replica)
        return True

    async def take(self, rev: Revision) -> Replica | None:
        """A waiting engine of `rev`'s shape, out of the pool (the pool starts another), or None. One being built
        is waited for: a launch now would queue behind it for the GPU (one engine starts at a time there) and
        then build all it has built."""
        key = self.key_of(rev)
        built = self._built.get(key) if key else None
        if built is not None and not self.waiting.get(key):
            await built.wait()
        engines = self.waiting.get(key, []) if key else []
        replica = next((r for r in engines if r.alive()), None)  # a dead one is the next fill's to stop
        if replica is not None:
            engines.remove(replica)
            self.adopted[key] = self.adopted.get(key, 0) + 1
        return replica

    def replicas(self) -> list[Replica]:
        return [r for engines in self.waiting.values() for r in engines]

    def held(self) -> int:
        """The engines the pool holds on the node: waiting, and being started."""
        return len(self.replicas()) + len(self.starting)

    def view(self) -> list[dict]:
        """For the status: each shape's waiting engines."""
        return [{"shape": key, "launchedAs": self.templates.get(key),
                 "waiting": [{"id": r.id, "pid": r.pid} for r in engines],
                 "starting": key in self.starting, "adopted": self.adopted.get(key, 0)}
                for key, engines in sorted(self.waiting.items())]
