"""The embedded serving plane: revisions, their activators and autoscalers, and the replicas they run.

One asyncio loop does it all. Every 100 ms each revision's concurrency (requests at its replicas plus
requests waiting in its activator) is sampled into per-second buckets; every tick (2 s by default) the
KPA decides each revision's scale from the stable and panic window averages; a request arriving at a
revision with nothing running pokes its decision at once, so 0 -> 1 never waits for a tick.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from thaw.durations import parse_duration
from thaw.launch import replica_args
from thaw.cache_warmer.optimize import keep_warm_loop
from thaw.spec import Model, Spec, SpecError, load_spec, spec_warnings

from thaw.vllm_platform import detect, gpu_memory

from . import lifecycle
from .activator import Activator
from .autoscaler import (Autoscaler, AutoscalerConfig, ConcurrencyWindow, bounded_scale, resolve_spec,
                         scale_to_zero_gate)
from .parking import Awake, Parked, decide_park, plan_gpu_room
from .revisions import Route, RevisionHistory, pick_revision, resolve_traffic, tagged_revision
from .supervisor import Replica, Supervisor, start_standby, start_warmer

log = logging.getLogger("thaw.plane")

SAMPLE_INTERVAL = 0.1
PROGRESS_DEADLINE = 600  # seconds a replica may take to become ready (Knative's progress-deadline)
GPU_ROOM_POLL = 0.25  # how often a start or wake waiting for GPU memory looks again
READINESS_PERIOD = 1.0  # how often ready replicas' /readyz is probed (a worker restarted inside one)
READINESS_TIMEOUT = 5.0  # a probe answered no faster than this fails (a busy replica answers in ms)


class UnknownModel(KeyError):
    pass


@dataclass(eq=False)
class RevisionRuntime:
    name: str
    model: Model  # the revision's own snapshot of the model's settings
    generation: int
    activator: Activator
    autoscaler: Autoscaler
    window: ConcurrencyWindow
    desired: int
    replicas: list[Replica] = field(default_factory=list)
    launching: int = 0
    routable: bool = True
    inactive_since: float | None = None
    initial_reached: bool = False
    panicking: bool = False
    excess_burst_capacity: int = 0
    keep_warm: int = 0  # idle replicas the optimizer wants kept (a floor under the KPA's decision)
    last_reported: tuple = ()

    @property
    def last_phases(self) -> dict[str, float]:
        """Where the newest replica that reported its start spent it ({} before any did)."""
        return next((r.phases for r in reversed(self.replicas) if r.phases), {})

    def count(self, *states: str) -> int:
        return sum(1 for r in self.replicas if r.state in states)

    @property
    def ready(self) -> list[Replica]:
        return [r for r in self.replicas if r.state == "ready"]

    @property
    def parked(self) -> list[Replica]:
        return [r for r in self.replicas if r.state == "parked"]

    @property
    def concurrency(self) -> int:
        return self.activator.in_flight + self.activator.queued


@dataclass(eq=False)
class ModelRuntime:
    model: Model
    revisions: dict[str, RevisionRuntime] = field(default_factory=dict)
    routes: list[Route] = field(default_factory=list)


def replica_weights(model: Model, spec: Spec) -> tuple[Path | None, list[str] | None]:
    """A replica's weights here: the spec's paths resolved on this machine."""
    folder, source_args = replica_args(model, spec, Path(spec.platform.cache.path).resolve(),
                                       Path(spec.platform.cache.dramPath).resolve())
    return (Path(folder) if folder else None), source_args


def _weight_bytes(model: Model) -> int:
    if model.source.startswith("s3://"):
        return 0  # not known before staging: such a model costs the memory budget nothing yet
    folder = Path(model.source)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0


def _process_tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0



class ServingPlane:
    def __init__(self, spec: Spec, spec_path: Path | None = None, use_standby: bool | None = None):
        self.spec = spec
        self.spec_path = spec_path
        self.state_dir = Path(spec.platform.stateDir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.models: dict[str, ModelRuntime] = {}
        self.history = RevisionHistory(self.state_dir / "revisions.json")
        self.use_standby = any(m.standby for m in spec.models) if use_standby is None else use_standby
        self.standby = None
        self.supervisor: Supervisor | None = None
        self.session: aiohttp.ClientSession | None = None
        self.warmer = None
        self.warmer_url = None
        if spec_path is not None:  # thaw up runs the cache warmer; it hears of every revision
            self.warmer, self.warmer_url = start_warmer(spec_path, self.state_dir)
        self.events = lifecycle.LifecycleEmitter([(spec.platform.eventSink, 1), (self.warmer_url, 4)],
                                                 spec.platform.namespace)
        self._tasks: list[asyncio.Task] = []
        self._replica_tasks: set[asyncio.Task] = set()
        self._spec_mtime = spec_path.stat().st_mtime if spec_path else None
        self.calls: dict[str, collections.deque] = {}  # model -> request times, for the optimizer
        # On a GPU, one start or wake at a time claims memory (vLLM sizes its KV cache from what is free).
        self.gpu_lock = asyncio.Lock() if detect().gpu else contextlib.nullcontext()
        for warning in spec_warnings(spec, str(spec_path or "thaw.yaml")):
            log.warning(warning)
        self.spec_listeners: list = []  # called with each new spec (eventing follows spec changes)
        self.stopping = False

    # ---- configuration ---------------------------------------------------------------------------

    @property
    def config(self) -> AutoscalerConfig:
        a = self.spec.platform.autoscaler
        return AutoscalerConfig(max_scale_up_rate=a.max_scale_up_rate, max_scale_down_rate=a.max_scale_down_rate,
                                enable_scale_to_zero=a.enable_scale_to_zero,
                                scale_to_zero_grace_period=parse_duration(a.scale_to_zero_grace_period),
                                tick_interval=parse_duration(a.tick_interval))

    def apply_spec(self, spec: Spec) -> None:
        """Make the running plane match a spec: new revisions for changed models, traffic re-split,
        revisions without traffic (and removed models) drained to zero."""
        self.spec = spec
        wanted = {m.name for m in spec.models}
        for model in spec.models:
            runtime = self.models.setdefault(model.name, ModelRuntime(model))
            runtime.model = model
            revisions, created = self.history.sync(model.name, model.revision_template())
            latest = revisions[-1]
            if latest["name"] not in runtime.revisions:
                rev = self._new_revision(model, latest["name"], len(revisions))
                runtime.revisions[rev.name] = rev
                self.events.emit("dev.knative.apiserver.resource.add", self._revision_object(rev))
                log.info("revision %s %s", rev.name, "created" if created else "restored")
            for entry in revisions:  # traffic may name older revisions still in the history
                if entry["name"] not in runtime.revisions and any(
                        t.revisionName == entry["name"] for t in model.traffic):
                    old = Model.model_validate({"name": model.name, **entry["template"]})
                    runtime.revisions[entry["name"]] = self._new_revision(old, entry["name"], revisions.index(entry) + 1)
            runtime.routes = resolve_traffic(model.traffic, latest["name"], set(runtime.revisions))
            routed = {r.revision for r in runtime.routes}
            for rev in runtime.revisions.values():
                self._set_routable(rev, rev.name in routed)
        for name, runtime in self.models.items():
            if name not in wanted:
                runtime.routes = []
                for rev in runtime.revisions.values():
                    self._set_routable(rev, False)

    @staticmethod
    def _set_routable(rev: "RevisionRuntime", routable: bool) -> None:
        """A revision no route sends traffic to is what Knative's decider calls unreachable: it scales down
        without the max-scale-down-rate bound or the scale-down delay."""
        rev.routable = routable
        rev.autoscaler.update(replace(rev.autoscaler.spec, reachable=routable))

    def _new_revision(self, model: Model, name: str, generation: int) -> RevisionRuntime:
        decider = resolve_spec(model.scaling, model.containerConcurrency, self.config)
        initial = bounded_scale(model.scaling.initial_scale, model.scaling.min_scale, model.scaling.max_scale)
        return RevisionRuntime(
            name=name, model=model, generation=generation,
            activator=Activator(self.spec.platform.activator.queueDepth, model.containerConcurrency),
            autoscaler=Autoscaler.new(decider, ready_pods=0, now=time.time()),
            window=ConcurrencyWindow(decider.stable_window),
            desired=initial, initial_reached=initial == 0)

    def _revision_object(self, rev: RevisionRuntime) -> dict[str, Any]:
        return lifecycle.revision_object(
            rev.name, rev.model.name, self.spec.platform.namespace,
            rev.model.revision_template(), rev.generation,
            lifecycle.revision_status(len(rev.ready), rev.desired), self.events.uid(rev.name),
            rev.last_phases or None)

    # ---- routing ---------------------------------------------------------------------------------

    def find_model(self, name: str) -> ModelRuntime:
        for runtime in self.models.values():
            if runtime.routes and name in (runtime.model.name, runtime.model.served_name):
                return runtime
        raise UnknownModel(name)

    def route(self, model: str, tag: str | None = None) -> RevisionRuntime:
        runtime = self.find_model(model)
        if tag is not None:
            name = tagged_revision(runtime.routes, tag)
            if name is None:
                raise UnknownModel(f"{model}@{tag}")
        else:
            name = pick_revision(runtime.routes, random.uniform(0, 100))
        return runtime.revisions[name]

    async def acquire(self, rev: RevisionRuntime, timeout: float, count: bool = True) -> Replica:
        """A replica slot; `count` records the call in the model's request history (once per request)."""
        if count:
            self.calls.setdefault(rev.model.name, collections.deque(maxlen=10_000)).append(time.time())
        self._wake(rev)
        replica = await rev.activator.acquire(timeout)
        replica.last_used = time.time()
        return replica

    def start_ahead(self, models: list[str]) -> list[str]:
        """Graph look-ahead: start each model that has nothing running or starting, as a request at zero
        would (the autoscaler lets it go again if no request follows). Returns the models started."""
        started = []
        for name in models:
            try:
                rev = self.route(name)
            except UnknownModel:
                continue
            if self._wake(rev):
                started.append(name)
        return started

    def release(self, rev: RevisionRuntime, replica: Replica) -> None:
        rev.activator.release(replica)

    def unreachable(self, rev: RevisionRuntime, replica: Replica) -> None:
        """A ready replica refused a connection: out of rotation now (the liveness loop would notice a
        death only on its next pass), stopped, and replaced if the revision still wants it. A draining
        replica is already out of rotation; its drain stops it without cutting its other streams."""
        if replica.state != "ready":
            return
        log.warning("replica %s refused a connection; replacing it", replica.id)
        self._forget(rev, replica, "dead")
        self._track(self.supervisor.stop(replica, 0))
        self._reconcile(rev)

    def not_ready(self, rev: RevisionRuntime, replica: Replica) -> None:
        """A ready replica's engine is loading again (its gunicorn worker was restarted): out of rotation
        until its readiness probe passes, as Knative takes a pod whose readiness fails out of its endpoints."""
        if replica.state == "ready":
            log.warning("replica %s is not ready (its engine is loading again); holding its requests", replica.id)
            replica.state = "unready"
            rev.activator.remove_replica(replica)
            self._report(rev)

    async def _readiness_loop(self) -> None:
        """Probe the /readyz of replicas in (or taken out of) rotation; move them out and back in."""
        timeout = aiohttp.ClientTimeout(total=READINESS_TIMEOUT)

        async def probe(rev: RevisionRuntime, replica: Replica) -> None:
            try:
                async with self.session.get(replica.url + "/readyz", timeout=timeout) as r:
                    ready = r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ready = False  # a dead process is the liveness loop's to handle
            if not ready:
                self.not_ready(rev, replica)
            elif replica.state == "unready":
                log.info("replica %s is ready again", replica.id)
                replica.state = "ready"
                rev.activator.add_replica(replica)
                self._report(rev)

        while True:
            await asyncio.gather(*(probe(rev, replica) for rev in self._revisions() for replica in list(rev.replicas)
                                   if replica.state in ("ready", "unready") and replica.alive()))
            await asyncio.sleep(READINESS_PERIOD)

    def _wake(self, rev: RevisionRuntime) -> bool:
        """Poke a revision that has nothing running, starting or waking; whether it did. Its reconcile then
        wakes a parked replica if it has one, else starts one."""
        if rev.ready or rev.launching + rev.count("starting", "unready", "waking"):
            return False
        if rev.parked:
            self._begin_wake(rev, rev.parked[0])
        self._poke(rev)
        return True

    def _poke(self, rev: RevisionRuntime) -> None:
        """What Knative's activator does for a revision at zero: report load now, decide now."""
        now = time.time()
        rev.window.record(now, rev.concurrency + 1)
        self._decide(rev, now)
        self._reconcile(rev)

    # ---- the loops -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()
        self.supervisor = Supervisor(self.state_dir, None)
        if self.use_standby:
            self.standby, socket_path = start_standby(self.state_dir)
            self.supervisor.standby_socket = socket_path
        self.events.start()
        await asyncio.to_thread(gpu_memory)  # NVML's first initialisation can take seconds: not on a request
        self.apply_spec(self.spec)
        for coro in (self._tick_loop(), self._sample_loop(), self._liveness_loop(), self._readiness_loop(),
                     self._watch_spec_loop(),
                     keep_warm_loop(self, lambda: self.spec.platform.optimizer)):
            self._tasks.append(asyncio.create_task(coro))
        for runtime in self.models.values():
            for rev in runtime.revisions.values():
                self._reconcile(rev)

    async def stop(self) -> None:
        self.stopping = True
        for task in self._tasks + list(self._replica_tasks):
            task.cancel()
        replicas = [r for m in self.models.values() for rev in m.revisions.values() for r in rev.replicas
                    if r.state != "stopped"]
        grace = self.spec.platform.activator.terminationGracePeriodSeconds
        await asyncio.gather(*(self.supervisor.stop(r, grace) for r in replicas), return_exceptions=True)
        for helper in (self.standby, self.warmer):
            if helper is None:
                continue
            helper.terminate()
            try:
                await asyncio.wait_for(asyncio.to_thread(helper.wait), 10)
            except asyncio.TimeoutError:
                helper.kill()
        await self.events.stop()
        await self.session.close()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_interval)
            now = time.time()
            for rev in self._revisions():
                self._decide(rev, now)
                self._reconcile(rev)
            self._delete_removed_models()

    def _delete_removed_models(self) -> None:
        """Models gone from the spec leave once their revisions have drained: a delete event each."""
        wanted = {m.name for m in self.spec.models}
        for name in [n for n in self.models if n not in wanted]:
            revisions = self.models[name].revisions.values()
            if all(not rev.replicas and rev.launching == 0 for rev in revisions):
                for rev in revisions:
                    self.events.emit("dev.knative.apiserver.resource.delete", self._revision_object(rev))
                del self.models[name]
                log.info("model %s removed", name)

    async def _sample_loop(self) -> None:
        while True:
            now = time.time()
            for rev in self._revisions():
                rev.window.record(now, rev.concurrency)
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def _liveness_loop(self) -> None:
        while True:
            for rev in self._revisions():
                for replica in list(rev.replicas):
                    if replica.state not in ("starting", "stopped") and not replica.alive():
                        log.warning("replica %s died", replica.id)
                        self._forget(rev, replica, "dead")
                        self._reconcile(rev)
            await asyncio.sleep(0.1)

    async def _watch_spec_loop(self) -> None:
        while self.spec_path is not None:
            await asyncio.sleep(1)
            try:
                mtime = self.spec_path.stat().st_mtime
            except OSError:
                continue
            if mtime == self._spec_mtime:
                continue
            self._spec_mtime = mtime
            try:
                spec = load_spec(self.spec_path)
            except SpecError as exc:
                log.error("spec change ignored:\n%s", "\n".join(exc.problems))
                continue
            log.info("spec changed: applying")
            self.apply_spec(spec)
            for listener in self.spec_listeners:
                listener(spec)
            for rev in self._revisions():
                self._reconcile(rev)

    # ---- the optimizer's effects (knative/backend.py's ServingBackend) --------------------------

    def demands(self) -> list:
        from thaw.cache_warmer.optimizer import Demand

        return [Demand(name, tuple(self.calls.get(name, ())), _weight_bytes(runtime.model))
                for name, runtime in self.models.items() if runtime.routes]

    def keep_replicas(self, models: frozenset[str]) -> None:
        for name, runtime in self.models.items():
            # one idle replica per kept model, on the revision that takes most of its traffic
            main = max(runtime.routes, key=lambda r: r.percent).revision if runtime.routes else None
            for rev in runtime.revisions.values():
                rev.keep_warm = 1 if name in models and rev.name == main else 0

    async def warm(self, model: str) -> bool:
        """Ask the warmer to stage (or prewarm) a model's weights."""
        from thaw.eventing import events

        if not self.warmer_url:
            return True
        headers, body = events.to_http(events.make_event(events.CACHE_WARM, "/thaw/optimizer", {"model": model}))
        try:
            async with self.session.post(self.warmer_url, data=body, headers=headers) as r:
                await r.read()
            return True
        except aiohttp.ClientError as exc:
            log.warning("optimizer could not ask the warmer for %s: %s", model, exc)
            return False

    def _revisions(self) -> list[RevisionRuntime]:
        return [rev for m in self.models.values() for rev in m.revisions.values()]

    # ---- decide and reconcile --------------------------------------------------------------------

    def _decide(self, rev: RevisionRuntime, now: float) -> None:
        model = rev.model
        spec = rev.autoscaler.spec
        ready = len(rev.ready)
        result = rev.autoscaler.scale(rev.window.average(now, spec.stable_window),
                                      rev.window.average(now, spec.panic_window), ready, now)
        rev.panicking = result.panicking
        rev.excess_burst_capacity = result.excess_burst_capacity
        desired = result.desired if result.valid else rev.desired
        desired = bounded_scale(max(desired, rev.keep_warm), model.scaling.min_scale, model.scaling.max_scale)
        if not rev.initial_reached:
            if ready >= rev.desired:
                rev.initial_reached = True
            else:
                desired = max(desired, rev.desired)
        config = self.config
        current = ready + rev.count("starting") + rev.launching
        desired, rev.inactive_since = scale_to_zero_gate(
            desired, current, rev.inactive_since, now, config.scale_to_zero_grace_period,
            parse_duration(model.scaling.scale_to_zero_pod_retention_period), config.enable_scale_to_zero)
        rev.desired = desired

    def _reconcile(self, rev: RevisionRuntime) -> None:
        if self.stopping:
            return
        running = rev.launching + rev.count("starting", "ready", "unready", "waking")
        if rev.activator.queued:  # requests wait: the cheapest road back is waking a parked replica
            for replica in rev.parked[:max(0, rev.desired - running)]:
                self._begin_wake(rev, replica)
                running += 1
        # A parked (or parking) replica stands for one the autoscaler wants: it wakes when a request comes for
        # it (one parked to make GPU room for another model must not wake at once and take the room back).
        for _ in range(rev.desired - running - rev.count("parked", "parking")):
            self._spawn(rev)
        if not rev.routable:  # a revision without traffic keeps nothing parked
            for replica in rev.parked:
                self._track(self._stop(rev, replica))
        if running > rev.desired:
            extra = running - rev.desired
            candidates = sorted((r for r in rev.replicas if r.state in ("starting", "ready", "unready")),
                                key=lambda r: (r.state == "ready", r.in_flight))
            for replica in candidates[:extra]:
                last = rev.desired == 0 and replica is candidates[-1]
                if last and replica.state == "ready" and self._park_decision(rev, replica):
                    self._track(self._park(rev, replica))
                else:
                    self._track(self._drain(rev, replica))
        self._report(rev)

    # ---- parking ---------------------------------------------------------------------------------

    def _park_decision(self, rev: RevisionRuntime, replica: Replica) -> bool:
        """Whether the last replica of a revision going to zero parks (stopping older parked replicas to
        make room in the host-RAM budget) rather than stops."""
        why_not = ("the model does not park" if not rev.model.park
                   else "the revision has no traffic" if not rev.routable else detect().park_problem())
        parked = [(r, other) for other in self._revisions() for r in other.replicas if r.state in ("parked", "parking")]
        decision = decide_park(why_not, _weight_bytes(rev.model) or replica.gpu_bytes,
                               [Parked(r.id, r.host_bytes, r.last_used) for r, _ in parked],
                               self.spec.platform.parking.host_memory_bytes)
        if rev.model.park and not decision.park:
            log.info("replica %s not parked: %s", replica.id, decision.reason)
        for r, other in parked:
            if r.id in decision.evict:
                log.info("stopping parked replica %s to make room in the parking budget", r.id)
                self._track(self._stop(other, r))
        return decision.park

    async def _park(self, rev: RevisionRuntime, replica: Replica) -> None:
        """Out of rotation, in-flight requests finish, then the engine sleeps: GPU memory released."""
        await self._leave_rotation(rev, replica, "parking")
        try:
            async with self.session.post(replica.url + "/sleep?level=1",
                                         timeout=aiohttp.ClientTimeout(total=120)) as r:
                body = await r.json()
                if r.status != 200:
                    raise RuntimeError(body.get("error", {}).get("message", r.status))
        except Exception as exc:  # noqa: BLE001 - a replica that cannot park is stopped as Knative would
            log.warning("replica %s could not park (%s); stopping it", replica.id, exc)
            await self._stop(rev, replica)
            self._reconcile(rev)  # a request that came meanwhile gets a new replica
            return
        if replica.state != "parking":  # stopped meanwhile (spec change, plane stopping)
            return
        replica.state = "parked"
        replica.host_bytes = _process_tree_rss(replica.pid)
        replica.gpu_bytes = (body.get("gpu") or {}).get("held", 0)
        log.info("replica %s parked in %.2fs (host %.1f GiB, GPU %.1f GiB)", replica.id, body.get("seconds", 0),
                 replica.host_bytes / 2**30, replica.gpu_bytes / 2**30)
        self._reconcile(rev)  # reports the parked replica; wakes it if a request came while it was parking

    def _begin_wake(self, rev: RevisionRuntime, replica: Replica) -> None:
        replica.state = "waking"
        self._track(self._unpark(rev, replica))

    async def _unpark(self, rev: RevisionRuntime, replica: Replica) -> None:
        """Wake a parked replica for a request the activator holds; a wake is a cold start of its own kind."""
        t = time.time()
        try:
            async with self.gpu_lock:
                await self._make_gpu_room(rev, exclude=replica)
                async with self.session.post(replica.url + "/wake_up",
                                             timeout=aiohttp.ClientTimeout(total=120)) as r:
                    body = await r.json()
                    if r.status != 200:
                        raise RuntimeError(body.get("error", {}).get("message", r.status))
        except Exception as exc:  # noqa: BLE001 - a replica that cannot wake is replaced by a fresh one
            log.warning("replica %s could not wake (%s); replacing it", replica.id, exc)
            await self._stop(rev, replica)
            self._reconcile(rev)
            return
        if replica.state != "waking":
            return
        replica.state = "ready"
        replica.host_bytes = 0
        replica.gpu_bytes = (body.get("gpu") or {}).get("held", 0)
        replica.phases = {"wake": body.get("seconds", 0.0), "wake_total": time.time() - t}
        replica.ready_at = time.time()
        rev.activator.add_replica(replica)
        log.info("replica %s woken in %.2fs", replica.id, time.time() - t)
        self._report(rev)  # an update event whose status carries the wake phase

    async def _make_gpu_room(self, rev: RevisionRuntime, exclude: Replica | None = None) -> None:
        """Before a replica of `rev` starts or wakes: park or stop idle replicas (least recently used first)
        until its share of the GPU (gpu_memory_utilization) is free; wait while busy ones leave too little."""
        end = time.monotonic() + PROGRESS_DEADLINE
        while time.monotonic() < end and not self.stopping:
            memory = await asyncio.to_thread(gpu_memory)
            if memory is None:
                return
            need = int(rev.model.engine.gpu_memory_utilization * memory.total)
            holders = []
            for other in self._revisions():
                for r in other.ready:
                    if r is exclude:
                        continue
                    holders.append((Awake(r.id, memory.held_by(r.pid), r.in_flight == 0 and other.activator.queued == 0,
                                          r.last_used, other.model.park and detect().sleep_mode), other, r))
            plan = plan_gpu_room(need, memory.free, [a for a, _, _ in holders])
            if plan is None:
                await asyncio.sleep(GPU_ROOM_POLL)
                continue
            if not plan.park and not plan.stop:
                return
            moves = []
            for awake, other, r in holders:
                if awake.id in plan.park and self._park_decision(other, r):  # within the host-RAM budget too
                    log.info("parking %s to make GPU room for %s", r.id, rev.name)
                    moves.append(self._park(other, r))
                elif awake.id in plan.park + plan.stop:
                    log.info("stopping %s to make GPU room for %s", r.id, rev.name)
                    moves.append(self._drain(other, r))
            await asyncio.gather(*moves)
        log.warning("no GPU room for %s within %ss; starting anyway", rev.name, PROGRESS_DEADLINE)

    async def _stop(self, rev: RevisionRuntime, replica: Replica) -> None:
        if replica.state == "stopped":
            return
        rev.activator.remove_replica(replica)
        await self.supervisor.stop(replica, self.spec.platform.activator.terminationGracePeriodSeconds)
        self._forget(rev, replica, "stopped")
        self._report(rev)

    def _report(self, rev: RevisionRuntime) -> None:
        state = (len(rev.ready), rev.desired, len(rev.parked))
        if state != rev.last_reported:
            rev.last_reported = state
            self.events.emit("dev.knative.apiserver.resource.update", self._revision_object(rev))

    def _spawn(self, rev: RevisionRuntime) -> None:
        rev.launching += 1
        self._track(self._run_replica(rev))

    def _track(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._replica_tasks.add(task)
        task.add_done_callback(self._replica_tasks.discard)

    async def _run_replica(self, rev: RevisionRuntime) -> None:
        async with self.gpu_lock:  # held until ready: the memory a start claims is known only then
            await self._make_gpu_room(rev)
            try:
                replica = await self.supervisor.start(rev.name, rev.model, *replica_weights(rev.model, self.spec), {})
            except Exception:  # noqa: BLE001 - a failed launch is retried by the next reconcile
                log.exception("could not start a replica of %s", rev.name)
                return
            finally:
                rev.launching -= 1
            rev.replicas.append(replica)
            ok = await self.supervisor.wait_ready(replica, self.session, PROGRESS_DEADLINE)
        if ok and replica.state == "starting":
            replica.state = "ready"
            rev.activator.add_replica(replica)
            log.info("replica %s ready after %.2fs", replica.id, replica.ready_at - replica.started_at)
            self._report(rev)
        elif replica.state == "starting":
            log.error("replica %s never became ready; see %s", replica.id, replica.log_path)
            self._forget(rev, replica, "dead")
            await self.supervisor.stop(replica, 0)
            await asyncio.sleep(1)  # do not spin on a replica that cannot start
            self._reconcile(rev)

    @staticmethod
    async def _leave_rotation(rev: RevisionRuntime, replica: Replica, state: str) -> None:
        """No new requests; those in flight (streams too) get up to timeoutSeconds to finish."""
        replica.state = state
        rev.activator.remove_replica(replica)
        end = time.monotonic() + rev.model.timeoutSeconds
        while replica.in_flight > 0 and time.monotonic() < end and replica.alive():
            await asyncio.sleep(0.05)

    async def _drain(self, rev: RevisionRuntime, replica: Replica) -> None:
        """No new requests; in-flight ones (streams too) get up to timeoutSeconds; then stop it."""
        await self._leave_rotation(rev, replica, "draining")
        await self._stop(rev, replica)

    def _forget(self, rev: RevisionRuntime, replica: Replica, state: str) -> None:
        replica.state = state
        rev.activator.remove_replica(replica)
        if replica in rev.replicas:
            rev.replicas.remove(replica)

    # ---- status ----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        memory = gpu_memory()
        models = []
        for name, runtime in self.models.items():
            percents = {r.revision: (r.percent, r.tag) for r in runtime.routes}
            revisions = []
            for rev in runtime.revisions.values():
                percent, tag = percents.get(rev.name, (0, None))
                revisions.append({
                    "name": rev.name, "percent": percent, "tag": tag, "desired": rev.desired,
                    "replicas": {s: rev.count(s) + (rev.launching if s == "starting" else 0)
                                 for s in ("starting", "ready", "unready", "draining", "parked")},
                    "panic": rev.panicking, "queue": rev.activator.queued, "in_flight": rev.activator.in_flight,
                    "excess_burst_capacity": rev.excess_burst_capacity, "keep_warm": rev.keep_warm,
                    "last_start_phases": rev.last_phases,
                    "pods": [{"id": r.id, "pid": r.pid, "port": r.port, "state": r.state, "in_flight": r.in_flight,
                              "standby": r.via_standby, "gpu_bytes": memory.held_by(r.pid) if memory else None,
                              "host_bytes": r.host_bytes if r.state == "parked" else 0} for r in rev.replicas],
                })
            models.append({"name": name, "served_name": runtime.model.served_name,
                           "weights": str(runtime.model.source), "revisions": revisions})
        gpu = {"total": memory.total, "free": memory.free} if memory else None
        return {"models": models, "standby": bool(self.supervisor and self.supervisor.standby_ready()),
                "platform": {"device": detect().device, "vllm": detect().vllm, "sleep_mode": detect().sleep_mode},
                "gpu": gpu}
