"""A revision's state in the embedded plane, and its two decisions as pure functions (table-tested):

- `decide`: the scale to aim for, from the KPA's result (autoscaler.py) and the bounds, initial scale,
  the optimizer's keep-warm floor and the scale-to-zero gate, as Knative's KPA reconciler applies them;
- `plan`: the moves that take the revision's replicas there (wake parked ones for waiting requests,
  start, drain or park, stop parked replicas of a revision without traffic).
The reconciler (reconciler.py) feeds them the revision's state and carries out what they return.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from thaw.spec import Model

from ..dataplane.activator import Activator
from ..dataplane.replica import RUNNING, Replica, State
from ..dataplane.throttler import Throttler
from .autoscaler import Autoscaler, ConcurrencyWindow, ScaleResult, bounded_scale, scale_to_zero_gate
from .traffic import Route


def weight_bytes(source: str) -> int:
    """The bytes of a model's weights here; 0 for an s3 or hf model not staged yet, or a claim's (it costs
    budgets nothing)."""
    if "://" in source:
        return 0
    folder = Path(source)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0


@dataclass(eq=False)
class Revision:
    name: str
    model: Model  # the revision's own snapshot of the model's settings
    generation: int
    autoscaler: Autoscaler
    window: ConcurrencyWindow  # a RateWindow for the rps metric
    desired: int
    throttler: Throttler
    activator: Activator | None = None  # set once the revision exists (it points back at it)
    replicas: list[Replica] = field(default_factory=list)
    launching: int = 0  # replicas asked of the supervisor, not yet a process
    unplaced: int = 0  # of those, the ones Pending: no room on the node for them yet
    routable: bool = True  # a route sends it traffic (Knative's "reachable")
    inactive_since: float | None = None
    initial_reached: bool = False
    panicking: bool = False
    excess_burst_capacity: int = 0
    keep_warm: int = 0  # idle replicas the optimizer wants kept (a floor under the KPA's decision)
    pending: str | None = None  # why a wanted replica cannot start now (the scheduler's message), if one cannot
    failure: str | None = None  # why its last replica failed to start (cleared by one that starts)
    unservable: str | None = None  # why no replica can ever start as configured (requests refused at once)
    failures: int = 0  # starts failed in a row: the next waits, doubling (Kubernetes' CrashLoopBackOff)
    upsets: int = 0  # starts failed in a row because GPU memory moved under vLLM's measurement (retried at once)
    retry_at: float = 0.0  # no new replica before this time (monotonic)
    last_reported: tuple = ()
    arrivals: int = 0  # requests the activator took for it (the rps metric counts them)
    arrivals_sampled: int = 0
    last_marks: dict = field(default_factory=dict)  # the last start's or wake's events (Replica.marks), wall-clock

    @property
    def last_phases(self) -> dict[str, float]:
        """Where the newest replica that reported its start spent it ({} before any did)."""
        return next((r.phases for r in reversed(self.replicas) if r.phases), {})

    @property
    def last_timeline(self) -> dict[str, float]:
        """The last start or wake that put a replica in rotation, event by event in time order: seconds since the
        plane was asked for it ({} before any). Where its wall went beyond the replica's phases (placement, GPU
        room, the process launch, the engine's thread, the probe, the handover to the held requests). Kept
        after the replica is gone: a cold start is looked into once the revision is back at zero."""
        if not self.last_marks:
            return {}
        asked = self.last_marks["asked"]  # a start and a wake both begin there
        return {k: round(v - asked, 4) for k, v in sorted(self.last_marks.items(), key=lambda kv: kv[1])}

    def count(self, *states: State) -> int:
        return sum(1 for r in self.replicas if r.state in states)

    @property
    def ready(self) -> list[Replica]:
        return [r for r in self.replicas if r.state == State.READY]

    @property
    def parked(self) -> list[Replica]:
        return [r for r in self.replicas if r.state == State.PARKED]

    @property
    def concurrency(self) -> int:
        """Requests at replicas plus requests the activator holds."""
        return self.throttler.in_flight + self.throttler.queued

    def sample(self, poke: bool = False) -> float:
        """What the autoscaler's window records now: the concurrency, or for the rps metric the requests that
        arrived since the last sample. A poke (a request at a revision with nothing running) reports that
        request as Knative's activator does: concurrency 1 before the request is held, or its arrival."""
        if self.autoscaler.spec.metric == "rps":
            arrived, self.arrivals_sampled = self.arrivals - self.arrivals_sampled, self.arrivals
            return arrived
        return self.concurrency + (1 if poke else 0)


@dataclass(eq=False)
class ModelRoutes:
    """One model of the spec: its revisions by name and the routes that split its traffic among them."""

    model: Model
    revisions: dict[str, Revision] = field(default_factory=dict)
    routes: list[Route] = field(default_factory=list)


@dataclass(frozen=True)
class Decision:
    desired: int
    initial_reached: bool
    inactive_since: float | None


def decide(kpa: ScaleResult, previous: int, *, keep_warm: int, min_scale: int, max_scale: int,
           initial_reached: bool, ready: int, current: int, inactive_since: float | None, now: float,
           grace: float, retention: float, scale_to_zero: bool) -> Decision:
    """The scale to aim for. `kpa` is the decider's result (an invalid one keeps `previous`); the optimizer's
    `keep_warm` is a floor inside min/max-scale; until the initial scale was once reached (`ready` >=
    `previous`) the scale does not drop below it; a decision of 0 waits for the grace and retention
    periods while `current` (ready + starting) replicas exist."""
    desired = kpa.desired if kpa.valid else previous
    desired = bounded_scale(max(desired, keep_warm), min_scale, max_scale)
    if not initial_reached:
        if ready >= previous:
            initial_reached = True
        else:
            desired = max(desired, previous)
    desired, inactive_since = scale_to_zero_gate(desired, current, inactive_since, now, grace, retention,
                                                 scale_to_zero)
    return Decision(desired, initial_reached, inactive_since)


@dataclass(frozen=True)
class ReplicaView:
    id: str
    state: State
    in_flight: int = 0


@dataclass(frozen=True)
class Plan:
    wake: tuple[str, ...] = ()  # parked replicas to wake for waiting requests
    start: int = 0  # new replicas
    stop: tuple[str, ...] = ()  # parked replicas of a revision no route sends traffic to
    shrink: tuple[str, ...] = ()  # replicas the revision no longer wants, drained: idle and not-ready first
    may_park: str | None = None  # of `shrink`, the revision's last replica: parked instead, if it may


def plan(replicas: list[ReplicaView], launching: int, desired: int, queued: int, routable: bool,
         hold_releases: bool = False, unplaced: int = 0) -> Plan:
    """The moves from the replicas there are to `desired`. Waking a parked replica is the cheapest road
    back, so waiting requests wake parked ones first. A parked (or parking) replica stands for one the
    autoscaler wants: it wakes when a request comes for it, never by itself (one parked to make GPU room
    for another model must not wake at once and take the room back). `hold_releases`: an engine is starting
    on the GPU, and vLLM's start fails if the device's free memory grows while it measures it, so replicas
    holding GPU memory are neither drained, parked nor stopped now (the next decision after the start).
    `unplaced`: of `launching`, those Pending (no room on the node yet). Fewer wanted, they give way first, as
    Kubernetes deletes unscheduled pods first: each cancels itself (placement.py) and no replica is drained for it."""
    running = launching + sum(1 for r in replicas if r.state in RUNNING)
    parked = [r.id for r in replicas if r.state == State.PARKED]
    wake = tuple(parked[:max(0, desired - running)]) if queued else ()
    running += len(wake)
    standing_by = len(parked) - len(wake) + sum(1 for r in replicas if r.state == State.PARKING)
    start = max(0, desired - running - standing_by)
    stop = () if routable else tuple(p for p in parked if p not in wake)
    shrink, may_park = (), None
    if running > desired:
        candidates = sorted((r for r in replicas if r.state in (State.STARTING, State.READY, State.UNREADY)),
                            key=lambda r: (r.state == State.READY, r.in_flight))
        chosen = candidates[:max(0, running - desired - unplaced)]  # Pending launches cancel themselves
        shrink = tuple(r.id for r in chosen)
        last = candidates[-1] if candidates else None
        if desired == 0 and last in chosen and last.state == State.READY:
            may_park = last.id
    if hold_releases:
        starting = {r.id for r in replicas if r.state == State.STARTING}
        stop, shrink = (), tuple(rid for rid in shrink if rid in starting)
        may_park = None
    return Plan(wake, start, stop, shrink, may_park)
