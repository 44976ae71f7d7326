"""The local broker: Knative's Broker, its triggers' deliveries, durable on disk (store.py). Its HTTP ingress is
ingress.py; its triggers and their delivery policy come from the spec through triggers.py.

An event accepted (ingress.py, or `publish` from inside thaw up) is stored with one delivery per matching
trigger before it is acknowledged. Like Knative's broker it sets `knativearrivaltime` and a TTL extension
(`knativebrokerttl`, 255, one less on each reply; a reply at 0 is dropped).

Each matching trigger gets its own delivery: retried with the trigger's backoff on no response, 5xx,
404, 408, 409 and 429, then sent to its deadLetterSink with `knativeerrordest`, `knativeerrorcode` and
`knativeerrordata` (base64 of at most 1 KiB of the last response body). A subscriber answering 2xx
with a CloudEvent has that event put back into the broker.

`dev.thaw.inference.request` events with the `thawmodel` extension go to that model's CloudEvents route
(from zero if need be); its `dev.thaw.inference.response` comes back into the broker as a reply.

At least once: a delivery is removed only after its subscriber answered, so a crash between the
answer and the commit sends it again after restart (subscribers may see an event twice; dedupe on
the event's `id` and `source`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

import aiohttp
from cloudevents.core.v1.event import CloudEvent

from . import events
from .delivery import backoff, dead_letter_extensions, next_step
from .filters import matches
from .store import Delivery, EventStore, NewEvent, StoreError
from .triggers import READY_WAIT, BrokerTrigger, event_attributes, model_events_url

SCOPE_EXTENSION = "thawscope"  # the models an event's sender may use, noted by the ingress (never a sender's)

log = logging.getLogger("thaw.broker")

TTL_EXTENSION = "knativebrokerttl"
ARRIVAL_EXTENSION = "knativearrivaltime"
DEFAULT_TTL = 255
CONCURRENT_DELIVERIES = 64


@dataclass
class BrokerStats:
    accepted: int = 0
    delivered: int = 0
    retried: int = 0
    dead_lettered: int = 0
    dropped: int = 0
    replies: int = 0


# (model, headers, body) -> (status, headers, body): an event delivered to a model's CloudEvents route inside
# this process
InProcess = Callable[[str, dict[str, str], bytes], Awaitable[tuple[int, dict[str, str], bytes]]]


class Broker:
    def __init__(self, store_path, namespace: str, brokers: set[str], triggers: list[BrokerTrigger],
                 session: aiohttp.ClientSession | None = None, gateway_auth: tuple[str, str] | None = None,
                 gateway_url: str | None = None, in_process: InProcess | None = None):
        """`gateway_auth` is (URL prefix, Authorization value) for deliveries to thaw's own gateway. An event
        keeps its sender's models (the ingress notes them) through the store and its replies: a delivery the
        sender could not make itself is refused (least privilege).
        With `in_process`, a delivery to a model's CloudEvents route on the gateway at `gateway_url` goes
        straight to that model's activator in this process (thaw up runs the broker and the gateway in one),
        not back in through the gateway's port: the same path after the gateway's auth check, one HTTP hop
        fewer."""
        self.gateway_auth = gateway_auth
        self.gateway_url = gateway_url
        self.in_process = in_process
        self.namespace = namespace
        self.brokers = brokers
        self.triggers = triggers
        self.store = EventStore(store_path)
        self.session = session
        self._own_session = session is None
        self.stats = BrokerStats()
        self._heap: list[tuple[float, int, Delivery]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(CONCURRENT_DELIVERIES)
        self._tasks: set[asyncio.Task] = set()
        self._dispatcher: asyncio.Task | None = None
        # URL prefix -> set once what listens there is ready: thaw up's own subscribers (its gateway, its cache
        # warmer), so that events accepted while they start wait for them instead of spending their retries
        # on a port nobody listens on yet (Knative delivers to a subscriber once its endpoints are ready).
        self.readiness: dict[str, asyncio.Event] = {}

    # ---- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        recovered = await asyncio.to_thread(self.store.pending)
        if recovered:
            log.info("broker: %d deliveries recovered from %s", len(recovered), self.store.path)
        for delivery in recovered:
            self._schedule(delivery)
        self._dispatcher = asyncio.create_task(self._dispatch_loop())

    async def stop_dispatching(self) -> None:
        """No more deliveries: those in flight are cancelled, and every undelivered event stays in the store,
        to be delivered after the next start (at least once). Ingress still accepts (and stores) events.
        thaw up calls this first, while the gateway its deliveries go through is still up: otherwise they
        fail against a closed gateway, run out of retries and are dropped."""
        if self._dispatcher:
            self._dispatcher.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop(self) -> None:
        await self.stop_dispatching()
        await asyncio.to_thread(self.store.close)
        if self._own_session and self.session is not None:
            await self.session.close()

    async def publish(self, broker: str, event: CloudEvent, scope: frozenset[str] | None = None) -> None:
        """Accept an event as the ingress does (with the sender's `scope`), or from inside this process
        (thaw up's revision events: no scope)."""
        new = self._prepare(broker, event, None, _scope_value(scope))
        if new is not None:
            for row in await asyncio.wrap_future(self.store.add(new)):
                self._schedule(row)
        self.stats.accepted += 1

    def _prepare(self, broker: str, event: CloudEvent, ttl: int | None, scope: str | None) -> NewEvent | None:
        """The event as stored (arrival time, TTL and the sender's scope set) with one delivery per matching
        trigger. A scope is never taken from the event itself."""
        attributes = dict(event.get_attributes())
        attributes.pop(SCOPE_EXTENSION, None)
        if scope is not None:
            attributes[SCOPE_EXTENSION] = scope
        attributes[ARRIVAL_EXTENSION] = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        if ttl is None:
            try:
                ttl = int(attributes.get(TTL_EXTENSION, DEFAULT_TTL))
            except (TypeError, ValueError):
                ttl = DEFAULT_TTL
        if ttl <= 0:
            log.info("broker: dropping event %s: its TTL ran out (a reply loop?)", attributes.get("id"))
            return None
        attributes[TTL_EXTENSION] = ttl
        headers, body = events.to_http(CloudEvent(attributes, event.get_data()))
        attrs = event_attributes(headers)
        deliveries = []
        for trigger in self.triggers:
            if trigger.broker == broker and matches(attrs, trigger.filter_attributes, trigger.filters):
                target = trigger.target(attrs)
                if target:
                    deliveries.append((trigger.name, target))
        return NewEvent(broker, headers, body, deliveries, time.time())

    # ---- dispatch ----------------------------------------------------------------------------------

    def _schedule(self, delivery: Delivery) -> None:
        heapq.heappush(self._heap, (delivery.due, next(self._seq), delivery))
        self._wake.set()

    async def _dispatch_loop(self) -> None:
        while True:
            now = time.time()
            while self._heap and self._heap[0][0] <= now:
                _, _, delivery = heapq.heappop(self._heap)
                await self._slots.acquire()
                task = asyncio.create_task(self._deliver(delivery))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self._wake.clear()
            timeout = (self._heap[0][0] - time.time()) if self._heap else None
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    def _trigger(self, name: str) -> BrokerTrigger | None:
        return next((t for t in self.triggers if t.name == name), None)

    @staticmethod
    def _current_target(trigger: BrokerTrigger, delivery: Delivery) -> str | None:
        """Where a delivery goes now. As Knative's dispatcher sends to the trigger's subscriber as it is at
        delivery time, a stored delivery follows its subscriber: after a restart (the warmer's new port) or
        a spec edit (a moved URI)."""
        if delivery.kind == "dead-letter":
            return trigger.policy.dead_letter
        return trigger.target(event_attributes(delivery.headers))

    async def _deliver(self, delivery: Delivery) -> None:
        try:
            trigger = self._trigger(delivery.trigger)
            target = self._current_target(trigger, delivery) if trigger is not None else None
            if target is None:  # its trigger, or its subscriber (a model, a dead-letter sink), left the spec
                await self._keep(self.store.finish(delivery), delivery)
                self.stats.dropped += 1
                log.warning("broker: dropping event for %s: it has no %s now", delivery.trigger,
                            "trigger" if trigger is None else
                            "dead-letter sink" if delivery.kind == "dead-letter" else "subscriber")
                return
            delivery.target = target
            await self._ready(target)
            policy = trigger.policy
            if delivery.kind == "dead-letter":
                policy = replace(policy, dead_letter=None)  # a dead letter that fails is dropped
            status, headers, body = await self._send(delivery, policy.timeout)
            delivery.attempt += 1
            step = next_step(policy, status, delivery.attempt)
            if step == "done":
                self.stats.delivered += 1
                await self._finish_with_reply(delivery, headers, body)
            elif step == "retry":
                self.stats.retried += 1
                delivery.due = time.time() + backoff(policy, delivery.attempt)
                await self._keep(self.store.reschedule(delivery), delivery)
                self._schedule(delivery)
            elif step == "dead-letter":
                self.stats.dead_lettered += 1
                log.info("broker: %s -> dead letter after %d attempts (last: %s)", delivery.trigger,
                         delivery.attempt, status)
                delivery.extra = dead_letter_extensions(delivery.target, status, body)
                delivery.kind, delivery.target, delivery.attempt, delivery.due = "dead-letter", policy.dead_letter, 0, time.time()
                await self._keep(self.store.reschedule(delivery), delivery)
                self._schedule(delivery)
            else:
                self.stats.dropped += 1
                log.warning("broker: dropping event for %s (%s) after %d attempts, last answer %s",
                            delivery.trigger, delivery.target, delivery.attempt, status)
                await self._keep(self.store.finish(delivery), delivery)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a bug here must not stop the dispatcher; the row stays for restart
            log.exception("broker: delivery %d failed unexpectedly", delivery.id)
        finally:
            self._slots.release()

    async def _ready(self, target: str) -> None:
        """Wait (up to READY_WAIT) for thaw's own subscriber at `target` to be ready; then deliver, with the
        trigger's retries as usual."""
        for prefix, ready in self.readiness.items():
            if target.startswith(prefix) and not ready.is_set():
                try:
                    await asyncio.wait_for(ready.wait(), READY_WAIT)
                except asyncio.TimeoutError:
                    log.warning("broker: %s is still not ready after %.0fs; delivering anyway", prefix, READY_WAIT)

    async def _send(self, delivery: Delivery, timeout: float) -> tuple[int | None, dict, bytes]:
        headers = dict(delivery.headers)
        scope = headers.pop(f"ce-{SCOPE_EXTENSION}", None)  # the broker's own note: no subscriber sees it
        refused = self._out_of_scope(delivery, headers, scope)
        if refused:
            log.warning("broker: refusing %s's delivery to %s: %s", delivery.trigger, delivery.target, refused)
            return 403, {}, refused.encode()
        headers.update({f"ce-{k}": v for k, v in delivery.extra.items()})
        model = self._model(delivery)
        if self.in_process and self.gateway_url and model \
                and delivery.target == model_events_url(self.gateway_url, model):
            try:
                return await asyncio.wait_for(self.in_process(model, headers, delivery.body), timeout)
            except asyncio.TimeoutError:
                return None, {}, b""
        if self.gateway_auth and delivery.target.startswith(self.gateway_auth[0]):
            headers["Authorization"] = self.gateway_auth[1]
        try:
            async with self.session.post(delivery.target, data=delivery.body, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                return response.status, dict(response.headers), await response.read()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return None, {}, b""

    def _out_of_scope(self, delivery: Delivery, headers: dict, scope: str | None) -> str | None:
        """Why the sender may not have this delivery made (None: it may). Deliveries through thaw's gateway
        go with the broker's own all-model token, so the sender's models are checked here: the model the
        delivery's trigger reaches (a gateway target that is no model, a graph, is refused), and the model a
        cache warm request names."""
        if scope is None:
            return None
        allowed = set(scope.split(",")) - {""}
        if self.gateway_auth and delivery.target.startswith(self.gateway_auth[0]):
            model = self._model(delivery)
            if model is None or model not in allowed:
                return f"the sender may not use {model or delivery.target!r} (its token allows " \
                       f"{', '.join(sorted(allowed)) or 'no model'})"
        if headers.get("ce-type") == events.CACHE_WARM:
            try:
                model = json.loads(delivery.body).get("model")
            except (ValueError, AttributeError):
                model = None
            if model not in allowed:
                return f"the sender may not warm or pin {model!r}"
        return None

    def _model(self, delivery: Delivery) -> str | None:
        """The model a delivery's trigger reaches through thaw's gateway (None: none, or no trigger now)."""
        trigger = self._trigger(delivery.trigger)
        return trigger.model(event_attributes(delivery.headers)) if trigger is not None else None

    @staticmethod
    async def _keep(write, delivery: Delivery) -> Any:
        """Wait for a store write about a delivery; its result, or None where the store could not make it (a
        full disk). That leaves the row as it was: the broker goes on from what it holds in memory, and after a
        restart it sends that delivery again (at least once), instead of losing it."""
        try:
            return await asyncio.wrap_future(write)
        except StoreError as exc:
            log.warning("broker: %s; delivery %d (%s) goes on from memory", exc, delivery.id, delivery.trigger)
            return None

    async def _finish_with_reply(self, delivery: Delivery, headers: dict, body: bytes) -> None:
        reply = None
        if events.looks_like_event(headers):
            try:
                event = events.parse_http_event(headers, body)
                ttl = int(delivery.headers.get(f"ce-{TTL_EXTENSION}", DEFAULT_TTL)) - 1
                # the broker the event came into: its trigger may have left the spec while the reply was on its way
                reply = self._prepare(delivery.broker, event, ttl, delivery.headers.get(f"ce-{SCOPE_EXTENSION}"))
            except (events.InvalidEvent, ValueError) as exc:
                log.warning("broker: %s answered with an invalid event, not re-entered: %s", delivery.target, exc)
        rows = await self._keep(self.store.finish(delivery, reply), delivery)
        if rows is None:
            return  # the reply was not stored either: after a restart the subscriber is asked, and answers, again
        if reply is not None:
            self.stats.replies += 1
        for row in rows:
            self._schedule(row)


def _scope_value(scope: frozenset[str] | None) -> str | None:
    """A sender's models as the broker notes them on its event ("" for none); None: every model."""
    return None if scope is None else ",".join(sorted(scope))


