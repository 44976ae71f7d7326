"""Prometheus metrics of one function replica (one registry per app, so tests can make several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

class FunctionMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("thaw_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=self.registry)
        self.in_flight = Gauge("thaw_requests_in_flight", "Generations in the engine now",
                               registry=self.registry)
        self.ttft = Histogram("thaw_time_to_first_token_seconds", "Request arrival to first generated token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                              registry=self.registry)
        self.engine_requests = Gauge("thaw_engine_requests", "Requests (one per choice) inside the engine",
                                     registry=self.registry)
        self.cancelled = Counter("thaw_requests_cancelled", "Requests whose client left before their generation "
                                 "finished: the engine drops them", registry=self.registry)
        self.generated_tokens = Counter("thaw_generated_tokens", "Tokens generated", registry=self.registry)
        self.payload_log = Counter("thaw_payload_log_events", "Payload-log events by outcome: sent, failed (after "
                                   "its retries), dropped (the queue was full)", ["outcome"], registry=self.registry)
        self.start_phase = Gauge("thaw_start_phase_seconds", "Seconds spent in each start-up phase",
                                 ["phase"], registry=self.registry)
        self.parked = Gauge("thaw_engine_parked", "1 while the engine sleeps (parked: GPU memory released)",
                            registry=self.registry)
