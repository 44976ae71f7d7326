"""The embedded serving plane: the spec's models as revisions with traffic routes, each revision with its
activator (activator.py) and decider, the reconciler that runs their replicas (reconciler.py), and the
standby they fork from. (thaw up, knative/embedded/up.py, runs the cache warmer and eventing beside it.)

The request path: gateway.py (HTTP, auth, `route` to a revision) -> the revision's activator.py
(wake, throttler, retries) -> proxy.py (to a replica). The event path: lifecycle.py -> the local broker
-> triggers -> the cache warmer, as on a cluster.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp

from thaw.cache_warmer.optimizer.loop import keep_warm_loop
from thaw.durations import parse_duration
from thaw.launch import ReplicaBoot, replica_boot
from thaw.spec import Model, Spec, SpecError, load_spec, pvc_parts, spec_warnings
from thaw.vllm_platform import gpu_memory

from ..dataplane.activator import Activator
from ..dataplane.throttler import Throttler
from . import lifecycle
from .autoscaler import Autoscaler, AutoscalerConfig, bounded_scale, metric_window, resolve_spec
from .backend import EmbeddedBackend
from .node import system_floor
from .reconciler import Reconciler
from .revision import ModelRoutes, Revision
from .status import model_states, plane_status
from .supervisor import Supervisor, start_standby, stop_helper
from .traffic import (RevisionHistory, SpecRefused, model_traffic, pick_revision, resolve_traffic, tagged_revision,
                      traffic_problems)

log = logging.getLogger("thaw.plane")


class UnknownModel(KeyError):
    pass


def local_path(source: str, spec: Spec) -> str:
    """Where a folder source is on this machine: a path resolved, a pvc:// claim through
    platform.persistentVolumeClaims (replica_moves.never_starts refuses a claim without a folder first)."""
    if source.startswith("pvc://"):
        claim, path = pvc_parts(source)
        return str(Path(spec.platform.persistentVolumeClaims[claim], path).resolve())
    return str(Path(source).resolve())


def replica_weights(model: Model, spec: Spec) -> ReplicaBoot:
    """A replica's weights here: the spec's paths resolved on this machine."""
    return replica_boot(model, spec, Path(spec.platform.cache.path).resolve(),
                        Path(spec.platform.cache.dramPath).resolve(), local=lambda p: local_path(p, spec))


class ServingPlane:
    def __init__(self, spec: Spec, spec_path: Path | None = None, use_standby: bool | None = None,
                 publish: Callable[[Any], Awaitable[None]] | None = None):
        """`publish` puts an event into the local broker (thaw up's eventing): revision events and the
        optimizer's warm requests go there."""
        self.spec = spec
        self.spec_path = spec_path
        self.state_dir = Path(spec.platform.stateDir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.models: dict[str, ModelRoutes] = {}
        self.history = RevisionHistory.of_state_dir(self.state_dir)
        self.use_standby = any(m.standby for m in spec.models) if use_standby is None else use_standby
        self.standby = None
        self.session: aiohttp.ClientSession | None = None
        self.publish = publish
        self.events = lifecycle.LifecycleEmitter(spec.platform.namespace, publish)
        self.reconciler = Reconciler(self, Supervisor(self.state_dir, None),
                                     lambda rev: replica_weights(rev.model, self.spec))
        self._tasks: list[asyncio.Task] = []
        self._spec_mtime = spec_path.stat().st_mtime if spec_path else None
        self.calls: dict[str, collections.deque] = {}  # model -> request times, for the optimizer
        for warning in spec_warnings(spec, str(spec_path or "thaw.yaml")):
            log.warning(warning)
        self.spec_listeners: list = []  # called with each new spec (eventing follows spec changes)
        self.spec_refused: list[str] = []  # why the newest edit of the spec file was not applied

    @property
    def supervisor(self) -> Supervisor:
        return self.reconciler.supervisor

    @property
    def config(self) -> AutoscalerConfig:
        a = self.spec.platform.autoscaler
        return AutoscalerConfig(max_scale_up_rate=a.max_scale_up_rate, max_scale_down_rate=a.max_scale_down_rate,
                                enable_scale_to_zero=a.enable_scale_to_zero,
                                container_concurrency_target_default=a.container_concurrency_target_default,
                                requests_per_second_target_default=a.requests_per_second_target_default,
                                scale_to_zero_grace_period=parse_duration(a.scale_to_zero_grace_period),
                                tick_interval=parse_duration(a.tick_interval))

    # ---- revisions and traffic ------------------------------------------------------------------

    def apply_spec(self, spec: Spec) -> None:
        """Make the running plane match a spec: new revisions for changed models, traffic re-split,
        revisions without traffic (and removed models) drained to zero. A spec applies whole or not at all:
        one that cannot (traffic to a revision that does not exist) raises SpecRefused, changing nothing."""
        problems = traffic_problems(spec.models, self.history)
        if problems:
            raise SpecRefused(problems)
        self.spec = spec
        wanted = {m.name for m in spec.models}
        for model in spec.models:
            entry = self.models.setdefault(model.name, ModelRoutes(model))
            entry.model = model
            revisions, created = self.history.sync(model.name, model.revision_template())
            latest = revisions[-1]
            if latest["name"] not in entry.revisions:
                rev = self._new_revision(model, latest["name"], len(revisions))
                entry.revisions[rev.name] = rev
                self.emit_revision("dev.knative.apiserver.resource.add", rev)
                log.info("revision %s %s", rev.name, "created" if created else "restored")
            traffic = model_traffic(model, [r["name"] for r in revisions])
            for past in revisions:  # traffic may name older revisions still in the history
                if past["name"] not in entry.revisions and any(t.revisionName == past["name"] for t in traffic):
                    old = Model.model_validate({"name": model.name, **past["template"]})
                    entry.revisions[past["name"]] = self._new_revision(old, past["name"], revisions.index(past) + 1)
            entry.routes = resolve_traffic(traffic, latest["name"], set(entry.revisions))
            routed = {r.revision for r in entry.routes}
            for rev in entry.revisions.values():
                self._set_routable(rev, rev.name in routed)
        for name, entry in self.models.items():
            if name not in wanted:
                entry.routes = []
                for rev in entry.revisions.values():
                    self._set_routable(rev, False)

    @staticmethod
    def _set_routable(rev: Revision, routable: bool) -> None:
        """A revision no route sends traffic to is what Knative's decider calls unreachable: it scales down
        without the max-scale-down-rate bound or the scale-down delay."""
        rev.routable = routable
        rev.autoscaler.update(replace(rev.autoscaler.spec, reachable=routable))

    def _new_revision(self, model: Model, name: str, generation: int) -> Revision:
        decider = resolve_spec(model.scaling, model.containerConcurrency, self.config)
        initial = bounded_scale(model.scaling.initial_scale, model.scaling.min_scale, model.scaling.max_scale)
        rev = Revision(name=name, model=model, generation=generation,
                       autoscaler=Autoscaler.new(decider, ready_pods=0, now=time.time()),
                       window=metric_window(decider), desired=initial,
                       throttler=Throttler(self.spec.platform.activator.queueDepth, model.containerConcurrency),
                       initial_reached=initial == 0)
        rev.activator = Activator(rev, rev.throttler, self.reconciler)
        return rev

    def emit_revision(self, kind: str, rev: Revision) -> None:
        self.events.emit(kind, lifecycle.revision_object(
            rev.name, rev.model.name, self.spec.platform.namespace, rev.model.revision_template(), rev.generation,
            lifecycle.revision_status(len(rev.ready), rev.desired, rev.pending, rev.failure), self.events.uid(rev.name),
            rev.last_phases or None))

    def revisions(self) -> list[Revision]:
        return [rev for m in self.models.values() for rev in m.revisions.values()]

    def delete_removed_models(self) -> None:
        """Models gone from the spec leave once their revisions have drained: a delete event each."""
        wanted = {m.name for m in self.spec.models}
        for name in [n for n in self.models if n not in wanted]:
            revisions = self.models[name].revisions.values()
            if all(not rev.replicas and rev.launching == 0 for rev in revisions):
                for rev in revisions:
                    self.emit_revision("dev.knative.apiserver.resource.delete", rev)
                del self.models[name]
                log.info("model %s removed", name)

    # ---- routing ---------------------------------------------------------------------------------

    def find_model(self, name: str) -> ModelRoutes:
        for entry in self.models.values():
            if entry.routes and name in (entry.model.name, entry.model.served_name):
                return entry
        raise UnknownModel(name)

    def route(self, model: str, tag: str | None = None) -> Revision:
        """The revision a request for `model` (or its tagged route) goes to."""
        entry = self.find_model(model)
        if tag is not None:
            name = tagged_revision(entry.routes, tag)
            if name is None:
                raise UnknownModel(f"{model}@{tag}")
        else:
            name = pick_revision(entry.routes, random.uniform(0, 100))
        return entry.revisions[name]

    def record_call(self, model: str) -> None:
        """A request for `model` arrived (the optimizer ranks models by these)."""
        self.calls.setdefault(model, collections.deque(maxlen=10_000)).append(time.time())

    # ---- start and stop --------------------------------------------------------------------------

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()
        if self.use_standby:
            self.standby, self.supervisor.standby_socket = start_standby(self.state_dir)
            self.supervisor.standby_process = self.standby
        self.events.start()
        await asyncio.to_thread(gpu_memory)  # NVML's first initialisation can take seconds: not on a request
        self.apply_spec(self.spec)
        self._tasks = self.reconciler.start(self.session)
        self._tasks += [asyncio.create_task(self._watch_spec_loop()),
                        asyncio.create_task(keep_warm_loop(EmbeddedBackend(self),
                                                           lambda: self.spec.platform.optimizer))]
        for rev in self.revisions():
            self.reconciler.reconcile(rev)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.reconciler.stop()
        if self.standby is not None:
            await stop_helper(self.standby)
        await self.events.stop()
        await self.session.close()

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
                self.apply_spec(spec)
            except (SpecError, SpecRefused) as exc:
                self.spec_refused = exc.problems
                log.error("spec change refused, the running configuration stays:\n%s", "\n".join(exc.problems))
                continue
            self.spec_refused = []
            log.info("spec changed: applied")
            for listener in self.spec_listeners:
                listener(spec)
            for rev in self.revisions():
                self.reconciler.reconcile(rev)

    def model_states(self) -> list[dict[str, Any]]:
        return model_states(self.models)

    def status(self) -> dict[str, Any]:
        import psutil

        floor = system_floor(psutil.virtual_memory().total, self.spec.platform.node.systemReserved)
        return plane_status(self.models, self.supervisor.standby_ready(), self.spec_refused, floor,
                            self.reconciler.pool.view())
