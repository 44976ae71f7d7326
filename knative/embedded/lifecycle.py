"""Revision lifecycle CloudEvents in ApiServerSource's Resource-mode format.

The embedded plane emits what a Knative ApiServerSource watching `serving.knative.dev/v1` Revisions
would: `dev.knative.apiserver.resource.add|update|delete`, subject
`/apis/serving.knative.dev/v1/namespaces/<ns>/revisions/<name>`, data the Revision object. The cache
warmer consumes the same events from either source.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import aiohttp

from thaw.eventing import events

log = logging.getLogger("thaw.lifecycle")

SOURCE = "https://kubernetes.default.svc"  # what ApiServerSource sets: the API server it watches


def revision_object(name: str, model_name: str, namespace: str, template: dict[str, Any], generation: int,
                    status: dict[str, Any], uid: str) -> dict[str, Any]:
    """A Revision as the API server would serve it (the fields thaw fills)."""
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
                            "thaw.dev/served-name": model.served_name},
        },
        "spec": {
            "containerConcurrency": model.containerConcurrency,
            "timeoutSeconds": model.timeoutSeconds,
            "containers": [{"name": "function", "env": [{"name": "THAW_MODEL_SOURCE", "value": model.source}]}],
        },
        "status": status,
    }


def revision_status(ready: int, desired: int) -> dict[str, Any]:
    ready_cond = "True" if ready > 0 else ("Unknown" if desired > 0 else "False")
    return {"actualReplicas": ready, "desiredReplicas": desired,
            "conditions": [{"type": "Ready", "status": ready_cond},
                           {"type": "Active", "status": "True" if ready > 0 else "False"}]}


class LifecycleEmitter:
    """Posts events to the sink in order, in the background; a sink that is down loses nothing queued
    before shutdown but is retried only a few times per event (it is a notification, not a log)."""

    def __init__(self, sink: str | None, namespace: str):
        self.sink = sink
        self.namespace = namespace
        self.queue: asyncio.Queue = asyncio.Queue()
        self.uids: dict[str, str] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.sink:
            self._task = asyncio.create_task(self._run())

    def emit(self, kind: str, revision: dict[str, Any]) -> None:
        if not self.sink:
            return
        name = revision["metadata"]["name"]
        event = events.make_event(kind, SOURCE, revision,
                                  subject=f"/apis/serving.knative.dev/v1/namespaces/{self.namespace}/revisions/{name}")
        self.queue.put_nowait(event)

    def uid(self, revision: str) -> str:
        return self.uids.setdefault(revision, str(uuid.uuid4()))

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            while True:
                event = await self.queue.get()
                headers, body = events.to_http(event)
                for attempt in range(3):
                    try:
                        async with session.post(self.sink, data=body, headers=headers) as r:
                            if r.status < 300:
                                break
                            log.warning("event sink answered %d for %s", r.status, event.get_type())
                    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                        log.warning("event sink unreachable (%s), attempt %d", exc, attempt + 1)
                    await asyncio.sleep(0.2 * 2 ** attempt)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
