"""Revision lifecycle CloudEvents in ApiServerSource's Resource-mode format.

The embedded plane emits what a Knative ApiServerSource watching `serving.knative.dev/v1` Revisions
would: `dev.knative.apiserver.resource.add|update|delete`, subject
`/apis/serving.knative.dev/v1/namespaces/<ns>/revisions/<name>`, data the Revision object. The cache
warmer consumes the same events from either source.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import aiohttp

from thaw.eventing import events

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


def revision_status(ready: int, desired: int) -> dict[str, Any]:
    ready_cond = "True" if ready > 0 else ("Unknown" if desired > 0 else "False")
    return {"actualReplicas": ready, "desiredReplicas": desired,
            "conditions": [{"type": "Ready", "status": ready_cond},
                           {"type": "Active", "status": "True" if ready > 0 else "False"}]}


class LifecycleEmitter:
    """Posts events to each sink in the background, each sink with its own queue so a slow one (the
    warmer answers once it has staged) holds up no other. A sink with one worker gets events in order.
    A sink that is down is retried with backoff for about half a minute per event."""

    ATTEMPTS = 8

    def __init__(self, sinks: list[tuple[str, int]], namespace: str):
        self.sinks = [(url, workers) for url, workers in sinks if url]
        self.namespace = namespace
        self.queues = {url: asyncio.Queue() for url, _ in self.sinks}
        self.uids: dict[str, str] = {}
        self._tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        if not self.sinks:
            return
        # Staging a revision's weights can take a while; the warmer answers when it is done.
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600))
        for url, workers in self.sinks:
            self._tasks += [asyncio.create_task(self._run(url)) for _ in range(workers)]

    def emit(self, kind: str, revision: dict[str, Any]) -> None:
        if not self.sinks:
            return
        name = revision["metadata"]["name"]
        event = events.make_event(kind, SOURCE, revision,
                                  subject=f"/apis/serving.knative.dev/v1/namespaces/{self.namespace}/revisions/{name}")
        for queue in self.queues.values():
            queue.put_nowait(event)

    def uid(self, revision: str) -> str:
        return self.uids.setdefault(revision, str(uuid.uuid4()))

    async def _run(self, sink: str) -> None:
        while True:
            event = await self.queues[sink].get()
            await self._post(sink, event)

    async def _post(self, sink: str, event) -> None:
        headers, body = events.to_http(event)
        for attempt in range(self.ATTEMPTS):
            try:
                async with self._session.post(sink, data=body, headers=headers) as r:
                    if r.status < 300:
                        return
                    log.warning("%s answered %d for %s", sink, r.status, event.get_type())
                    if r.status < 500:
                        return  # the sink refuses it; sending it again would not help
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if attempt == self.ATTEMPTS - 1:
                    log.warning("%s unreachable (%s); %s dropped", sink, exc, event.get_type())
            await asyncio.sleep(min(5.0, 0.25 * 2 ** attempt))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._session is not None:
            await self._session.close()
