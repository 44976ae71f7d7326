"""The cold-start optimizer's effects on a Knative cluster (cache-warmer/optimizer/loop.py's ServingBackend), so the
keep-warm loop and graph look-ahead that drive `thaw up` drive a cluster too (`thaw optimize`).

- demands: Knative keeps no request history an API client can read; what it shows is each revision's
  `status.actualReplicas`. A model whose main revision has more replicas than the optimizer keeps was
  called within its stable window, so each look that finds it so counts as a call.
- keep_replicas: the `autoscaling.knative.dev/min-scale` annotation of the Service's revision template,
  server-side applied under a field manager of its own (`thaw-optimizer`; `thaw deploy` owns the rest
  and takes the field back to the spec's value). Knative makes a new revision of any template change
  (knative/serving#6717; a per-revision or service-level bound is not in a release yet), so the kept
  replica is one of a new revision of the same weights and engine: its compile cache is in the tier.
- warm: a `dev.thaw.cache.warm` CloudEvent to the cache warmer's Service.
- start_ahead: what a request at zero does: a GET of the model's `/healthz` through its Knative route,
  which the activator holds while the revision scales up, sent in the background.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import aiohttp
import requests

from thaw.cache_warmer.optimizer.decide import Demand
from thaw.eventing import events
from thaw.spec import Spec

from .deploy import ClusterClient
from .render import SERVING, WARMER

log = logging.getLogger("thaw.optimizer.cluster")

FIELD_MANAGER = "thaw-optimizer"
MIN_SCALE = "autoscaling.knative.dev/min-scale"
WAKE_TIMEOUT = 600  # seconds a start-ahead request waits for its revision (Knative's progress deadline)


class ClusterBackend:
    def __init__(self, spec: Spec, client: ClusterClient):
        self.spec = spec
        self.client = client
        self.namespace = spec.platform.namespace
        self.kept: dict[str, int] = {}  # model -> the min-scale this backend applied
        self.calls: dict[str, collections.deque] = {}

    def _service(self, name: str) -> dict[str, Any]:
        return self.client.get(SERVING, "Service", self.namespace, name)

    def _actual_replicas(self, service: dict[str, Any]) -> int:
        revision = (service.get("status") or {}).get("latestReadyRevisionName")
        if not revision:
            return 0
        live = self.client.get(SERVING, "Revision", self.namespace, revision)
        return int((live.get("status") or {}).get("actualReplicas") or 0)

    def demands(self) -> list[Demand]:
        now = time.time()
        out = []
        for model in self.spec.models:
            try:
                replicas = self._actual_replicas(self._service(model.name))
            except Exception as exc:  # noqa: BLE001 - an unreadable model is left out of this round
                log.warning("cannot read %s: %s", model.name, exc)
                continue
            calls = self.calls.setdefault(model.name, collections.deque(maxlen=10_000))
            if replicas > max(self.kept.get(model.name, 0), model.scaling.min_scale):
                calls.append(now)
            out.append(Demand(model.name, tuple(calls), 0))  # weights are on the nodes' tier, not counted here
        return out

    def keep_replicas(self, models: frozenset[str]) -> None:
        for model in self.spec.models:
            want = max(model.scaling.min_scale, 1 if model.name in models else 0)
            if self.kept.get(model.name, model.scaling.min_scale) == want:
                continue
            self.client.apply({"apiVersion": SERVING, "kind": "Service",
                               "metadata": {"name": model.name, "namespace": self.namespace},
                               "spec": {"template": {"metadata": {"annotations": {MIN_SCALE: str(want)}}}}},
                              field_manager=FIELD_MANAGER)
            self.kept[model.name] = want
            log.info("%s: min-scale %d", model.name, want)

    async def warm(self, model: str) -> bool:
        try:
            url = (self._service(WARMER).get("status") or {}).get("url")
            if not url:
                return False
            headers, body = events.to_http(events.make_event(events.CACHE_WARM, "/thaw/optimizer", {"model": model}))
            async with aiohttp.ClientSession() as session:
                async with session.post(url, data=body, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=30)) as r:
                    return r.status < 300
        except Exception as exc:  # noqa: BLE001 - the warmer could not be asked; the next round asks again
            log.warning("could not ask the warmer for %s: %s", model, exc)
            return False

    def start_ahead(self, models: list[str]) -> list[str]:
        started = []
        for name in models:
            try:
                service = self._service(name)
                if self._actual_replicas(service):
                    continue
                url = (service.get("status") or {})["url"]
            except Exception as exc:  # noqa: BLE001 - not known to the cluster (yet): nothing to start
                log.warning("cannot start %s ahead: %s", name, exc)
                continue
            threading.Thread(target=_wake, args=(url,), daemon=True).start()
            started.append(name)
        return started


def _wake(url: str) -> None:
    try:
        requests.get(url.rstrip("/") + "/healthz", timeout=WAKE_TIMEOUT)
    except requests.RequestException as exc:
        log.warning("start-ahead request to %s failed: %s", url, exc)
