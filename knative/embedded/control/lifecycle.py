"""Revision lifecycle CloudEvents in ApiServerSource's Resource-mode format.

The embedded plane emits what a Knative ApiServerSource watching `serving.knative.dev/v1` Revisions
would: `dev.knative.apiserver.resource.add|update|delete`, subject
`/apis/serving.knative.dev/v1/namespaces/<ns>/revisions/<name>`, data the Revision object. As on a
cluster, they go into the default broker, whose triggers take them to the cache warmer (and to
`platform.eventSink`); one event path in both modes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any, Awaitable, Callable

from cloudevents.core.v1.event import CloudEvent

from thaw.eventing import events
from thaw.eventing.store import StoreError

log = logging.getLogger("thaw.lifecycle")

SOURCE = "https://kubernetes.default.svc"  # what ApiServerSource sets: the API server it watches


def revision_object(name: str, model_name: str, namespace: str, template: dict[str, Any], generation: int,
                    status: dict[str, Any], uid: str, start_phases: dict[str, float] | None = None) -> dict[str, Any]:
    """A Revision as the API server would serve it (the fields thaw fills); the last replica's start
    phases (cache wait, staging, prewarm, imports, engine init...) ride along as an annotation."""
    from thaw.spec import Model

    model = Model.model_validate({"name": model_name, **template})
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Revision",
        "metadata": {
            "name": name, "namespace": namespace, "uid": uid, "generation": 1,
            "labels": {"serving.knative.dev/service": model_name,
                       "serving.knative.dev/configuration": model_name,
                       "serving.knative.dev/configurationGeneration": str(generation)},
            "annotations": {**model.scaling.annotations(), "thaw.dev/source": model.source,
                            "thaw.dev/served-name": model.served_name,
                            **({"thaw.dev/start-phases": json.dumps(start_phases)} if start_phases else {})},
        },
        "spec": {
            "containerConcurrency": model.containerConcurrency,
            "timeoutSeconds": model.timeoutSeconds,
            "containers": [{"name": "function", "env": [{"name": "THAW_MODEL_SOURCE", "value": model.source}]}],
        },
        "status": status,
    }


def revision_status(ready: int, desired: int, pending: str | None = None, failure: str | None = None) -> dict[str, Any]:
    """A Revision's status as Knative writes it; a replica that cannot be scheduled shows as Knative shows an
    unschedulable pod: ResourcesAvailable False, reason Unschedulable, the scheduler's message; one whose
    replica failed to start, ContainerHealthy False."""
    ready_cond = "True" if ready > 0 else ("Unknown" if desired > 0 else "False")
    conditions = [{"type": "Ready", "status": ready_cond},
                  {"type": "Active", "status": "True" if ready > 0 else "False"}]
    if pending:
        conditions.append({"type": "ResourcesAvailable", "status": "False", "reason": "Unschedulable",
                           "message": pending})
    if failure:
        conditions.append({"type": "ContainerHealthy", "status": "False", "reason": "ReplicaFailed",
                           "message": failure})
    return {"actualReplicas": ready, "desiredReplicas": desired, "conditions": conditions}


class LifecycleEmitter:
    """Publishes revision events into the broker in the order they happened (one worker), in the
    background, so no plane decision waits for the broker's commit. Without a broker (a plane outside
    thaw up), nothing is emitted."""

    def __init__(self, namespace: str, publish: Callable[[CloudEvent], Awaitable[None]] | None = None):
        self.namespace = namespace
        self.publish = publish
        self.uids: dict[str, str] = {}
        self._queue: asyncio.Queue[CloudEvent] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.publish is not None:
            self._task = asyncio.create_task(self._run())

    def emit(self, kind: str, revision: dict[str, Any]) -> None:
        if self.publish is None:
            return
        name = revision["metadata"]["name"]
        self._queue.put_nowait(events.make_event(
            kind, SOURCE, revision, subject=f"/apis/serving.knative.dev/v1/namespaces/{self.namespace}/revisions/{name}"))

    def uid(self, revision: str) -> str:
        return self.uids.setdefault(revision, str(uuid.uuid4()))

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self.publish(event)
            except StoreError as exc:  # a full disk: one line, not a traceback (the warmer stages at boot anyway)
                log.warning("the broker could not take %s: %s", event.get_type(), exc)
            except Exception:  # noqa: BLE001 - one event the broker could not take must not stop the rest
                log.exception("the broker refused %s", event.get_type())
            finally:
                self._queue.task_done()

    async def stop(self) -> None:
        """Publish what is still queued (for up to 5 s), then stop."""
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), 5)
        except asyncio.TimeoutError:
            log.warning("%d revision events not published before stopping", self._queue.qsize())
        self._task.cancel()
