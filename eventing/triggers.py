"""The broker's triggers, as the spec declares them and as thaw up adds its own: which events each takes
(Knative's filters), where it sends them (its subscriber, resolved at delivery time), which model that reaches
(what a sender's token must allow), and its delivery policy (Knative's DeliverySpec: retries, backoff, dead
letters, timeout)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from thaw.durations import parse_iso_duration

from . import events
from .delivery import DEFAULT_BACKOFF_DELAY, DEFAULT_TIMEOUT, DeliveryPolicy

INFERENCE_TRIGGER = "thaw-inference"


@dataclass
class BrokerTrigger:
    name: str
    broker: str
    filter_attributes: dict[str, str]
    filters: list[dict[str, Any]]
    target: Callable[[dict[str, str]], str | None]  # event attributes -> subscriber URL
    policy: DeliveryPolicy
    # event attributes -> the model a delivery reaches through thaw's gateway (None: none it can name, such as
    # a graph), which the sender's token must allow: carried as data, never read back from the URL
    model: Callable[[dict[str, str]], str | None] = field(default=lambda attrs: None)


def policy_from_spec(delivery, resolve: Callable[[Any], str], default_timeout: float = DEFAULT_TIMEOUT) -> DeliveryPolicy:
    """A trigger's `delivery` block (Knative's DeliverySpec) as a DeliveryPolicy."""
    if delivery is None:
        return DeliveryPolicy(timeout=default_timeout)
    return DeliveryPolicy(
        retry=delivery.retry or 0,
        backoff_policy=delivery.backoffPolicy,
        backoff_delay=parse_iso_duration(delivery.backoffDelay, "backoffDelay") if delivery.backoffDelay else DEFAULT_BACKOFF_DELAY,
        timeout=parse_iso_duration(delivery.timeout, "timeout") if delivery.timeout else default_timeout,
        dead_letter=resolve(delivery.deadLetterSink) if delivery.deadLetterSink else None)


def event_attributes(headers: dict[str, str]) -> dict[str, str]:
    """Context attributes and extensions of a binary-mode event, as strings (what filters see)."""
    attrs = {k[3:]: v for k, v in headers.items() if k.startswith("ce-")}
    if "content-type" in headers:
        attrs["datacontenttype"] = headers["content-type"]
    return attrs


def model_events_url(gateway_url: str, model: str) -> str:
    """A model's CloudEvents route on thaw's gateway."""
    return f"{gateway_url}/models/{model}/"


def resolve_destination(destination, spec, gateway_url: str) -> str:
    """A Knative Destination as a URL here: a uri, or a ref to a thaw Model (its CloudEvents route) or
    Graph, with an optional relative uri."""
    if destination.ref is None:
        return destination.uri
    ref = destination.ref
    if ref.kind == "Model":
        base = model_events_url(gateway_url, spec.model(ref.name).name)
    elif ref.kind == "Graph":
        base = f"{gateway_url}/graphs/{ref.name}"
    else:
        raise ValueError(f"a ref of kind {ref.kind} is resolved on a cluster only; embedded, give a uri")
    return base.rstrip("/") + "/" + destination.uri.lstrip("/") if destination.uri else base


def subscriber_model(destination, spec, gateway_url: str) -> str | None:
    """The model a trigger's subscriber is: a Model ref, or a uri of a model's route on thaw's own gateway (what
    the spec says, read once when the spec is)."""
    if destination.ref is not None:
        return spec.model(destination.ref.name).name if destination.ref.kind == "Model" else None
    match = re.match(re.escape(gateway_url) + r"/models/([^/@?]+)", destination.uri or "")
    return match.group(1) if match else None


WARMER_TIMEOUT = 3600.0  # the warmer answers once it has staged the weights: a delivery waits that long
READY_WAIT = 300.0  # the longest a delivery waits for thaw's own subscriber to start (a fresh machine's imports)
EVENT_SINK_TRIGGER = "thaw-event-sink"


def triggers_from_spec(spec, gateway_url: str, warmer_url: str | None = None) -> list[BrokerTrigger]:
    """The spec's triggers, plus thaw's own: inference requests to the model named by `thawmodel`; with a
    warmer, its triggers (the ones `thaw render` writes); with `platform.eventSink`, revision events to it."""
    def timeout_for(destination) -> float:
        if destination.ref is not None and destination.ref.kind == "Model":
            return float(spec.model(destination.ref.name).timeoutSeconds)
        return DEFAULT_TIMEOUT

    out = []
    for t in spec.triggers:
        url = resolve_destination(t.subscriber, spec, gateway_url)
        policy = policy_from_spec(t.delivery, lambda d: resolve_destination(d, spec, gateway_url),
                                  timeout_for(t.subscriber))
        model = subscriber_model(t.subscriber, spec, gateway_url)
        out.append(BrokerTrigger(t.name, t.broker, dict(t.filter.attributes) if t.filter else {}, t.filters,
                                 lambda attrs, url=url: url, policy, lambda attrs, m=model: m))
    models = {m.served_name: m for m in spec.models} | {m.name: m for m in spec.models}

    def model_of(attrs: dict[str, str]) -> str | None:
        model = models.get(attrs.get(events.EXT_MODEL, ""))
        return model.name if model else None

    def model_route(attrs: dict[str, str]) -> str | None:
        name = model_of(attrs)
        return model_events_url(gateway_url, name) if name else None

    longest = max((m.timeoutSeconds for m in spec.models), default=300)
    out.append(BrokerTrigger(INFERENCE_TRIGGER, "default", {"type": events.INFERENCE_REQUEST}, [], model_route,
                             DeliveryPolicy(retry=2, backoff_delay=0.5, timeout=float(longest)), model_of))
    if warmer_url:
        out += [BrokerTrigger(name, "default", {"type": kind}, [], lambda attrs: warmer_url,
                              DeliveryPolicy(retry=3, timeout=WARMER_TIMEOUT))
                for name, kind in events.WARMER_TRIGGERS.items()]
    sink = spec.platform.eventSink
    if sink:
        out.append(BrokerTrigger(EVENT_SINK_TRIGGER, "default", {}, [{"prefix": {"type": "dev.knative.apiserver."}}],
                                 lambda attrs: sink, DeliveryPolicy(retry=3)))
    return out


def brokers_in(spec) -> set[str]:
    return {"default"} | {t.broker for t in spec.triggers}
