"""Knative's KPA decision, as pure code: `Autoscaler.scale(observed, ready_pods, now) -> ScaleResult`.

This reproduces knative/serving `pkg/autoscaler/scaling/autoscaler.go` `Scale()` and the metric target
resolution of `pkg/reconciler/autoscaling/resources/target.go` for the KPA's two metrics, concurrency and
rps: stable and panic windows over per-second concurrency averages (or request counts), the panic threshold
and panic mode holding its peak until a stable window has passed, the max scale-up and scale-down rates, the
target times its utilisation, activation-scale, the scale-down-delay window, and the excess burst capacity (which in Knative decides whether the
activator stays in the request path; the embedded plane always routes through its activator, so here it is
computed and shown in `thaw status`, not acted on). Bounds and scale-to-zero timing (min/max/initial scale, grace and retention periods)
are applied after the decision by `bounded_scale`, as Knative's KPA scaler does.

Nothing here reads a clock or a socket: time is a float of seconds passed in by the caller.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

TARGET_FLOOR = 1.0  # ResolveMetricTarget's least target per pod (autoscaling.TargetMin bounds only the annotation)


@dataclass(frozen=True)
class AutoscalerConfig:
    """config-autoscaler: the cluster-wide settings the embedded plane reads (Knative's names and values).
    The per-revision defaults (target, utilisation, windows, panic) come from the spec's `Scaling`."""

    container_concurrency_target_default: float = 100
    requests_per_second_target_default: float = 200
    max_scale_up_rate: float = 1000
    max_scale_down_rate: float = 2
    enable_scale_to_zero: bool = True
    scale_to_zero_grace_period: float = 30
    tick_interval: float = 2


@dataclass(frozen=True)
class DeciderSpec:
    """One revision's resolved scaling settings (what Knative's MakeDecider builds)."""

    target_value: float  # per-pod concurrency (or requests per second) to aim for: target x utilisation
    total_value: float  # per-pod capacity: the target before utilisation
    target_burst_capacity: float
    panic_threshold: float  # a ratio: 2.0 is 200 %
    stable_window: float
    panic_window: float
    max_scale_up_rate: float = 1000
    max_scale_down_rate: float = 2
    scale_down_delay: float = 0
    activation_scale: int = 1
    reachable: bool = True
    metric: str = "concurrency"  # or "rps"


def resolve_spec(scaling, container_concurrency: int, config: AutoscalerConfig = AutoscalerConfig()) -> DeciderSpec:
    """Knative's ResolveMetricTarget + MakeDecider.

    `scaling` is a `thaw.spec.Scaling` (or anything with the same attributes). Concurrency: the capacity is
    containerConcurrency (else the default), a target annotation never above it; rps: the default of 200 per
    second, or the target annotation as it is. The target aimed for is that times the utilisation, at least 1.
    """
    from thaw.durations import parse_duration

    if scaling.metric == "rps":
        total = scaling.target if scaling.target is not None else config.requests_per_second_target_default
    else:
        total = float(container_concurrency) or config.container_concurrency_target_default
        if scaling.target is not None:
            total = scaling.target
            if container_concurrency:  # the target never exceeds the hard limit
                total = min(total, float(container_concurrency))
    utilisation = scaling.target_utilization_percentage / 100
    stable = parse_duration(scaling.window)
    return DeciderSpec(
        target_value=max(TARGET_FLOOR, total * utilisation),
        total_value=total,
        target_burst_capacity=scaling.target_burst_capacity,
        panic_threshold=scaling.panic_threshold_percentage / 100,
        stable_window=stable,
        panic_window=stable * scaling.panic_window_percentage / 100,
        max_scale_up_rate=config.max_scale_up_rate,
        max_scale_down_rate=config.max_scale_down_rate,
        scale_down_delay=parse_duration(scaling.scale_down_delay),
        activation_scale=scaling.activation_scale,
        metric=scaling.metric,
    )


class ConcurrencyWindow:
    """Per-second buckets of average concurrency; the window average Knative's metric collector takes.

    Like Knative's TimedFloat64Buckets.WindowAverage, a window only partly observed so far is averaged
    over the observed span, and seconds without a report inside it count as zero.
    """

    def __init__(self, max_window: float):
        self.max_window = max_window
        self.buckets: dict[int, tuple[float, int]] = {}  # second -> (sum, count)
        self.first: int | None = None
        self.last: int | None = None

    def record(self, now: float, value: float) -> None:
        second = int(math.floor(now))
        total, count = self.buckets.get(second, (0.0, 0))
        self.buckets[second] = (total + value, count + 1)
        if self.first is None:
            self.first = second
        self.last = second if self.last is None else max(self.last, second)
        horizon = second - int(math.ceil(self.max_window)) - 1
        for old in [s for s in self.buckets if s < horizon]:
            del self.buckets[old]

    @staticmethod
    def per_second(total: float, count: int) -> float:
        """One second's value from what was recorded in it: concurrency samples are averaged."""
        return total / count

    def average(self, now: float, window: float) -> float | None:
        """Average per-second value over the last `window` seconds; None with no data."""
        if self.first is None:
            return None
        now_s = int(math.floor(now))
        span = min(max(1, int(round(window))), now_s - self.first + 1)
        if span <= 0:
            return None
        seconds = range(now_s - span + 1, now_s + 1)
        total = sum(self.per_second(*self.buckets[s]) for s in seconds if s in self.buckets)
        return total / span


class RateWindow(ConcurrencyWindow):
    """The rps metric's window: what is recorded are request counts, summed per second, so the window average
    is requests per second (Knative's rpsBuckets)."""

    @staticmethod
    def per_second(total: float, count: int) -> float:
        return total


def metric_window(spec: DeciderSpec) -> ConcurrencyWindow:
    return RateWindow(spec.stable_window) if spec.metric == "rps" else ConcurrencyWindow(spec.stable_window)


class MaxWindow:
    """The largest value recorded within the last `window` seconds (Knative's delay window)."""

    def __init__(self, window: float):
        self.window = window
        self.values: deque[tuple[float, int]] = deque()

    def record(self, now: float, value: int) -> None:
        while self.values and self.values[0][0] <= now - self.window:
            self.values.popleft()
        self.values.append((now, value))

    def current(self) -> int:
        return max(v for _, v in self.values)


@dataclass(frozen=True)
class ScaleResult:
    desired: int
    excess_burst_capacity: int
    valid: bool
    panicking: bool


@dataclass
class Autoscaler:
    """The decider of one revision; its only state is panic mode and the delay window."""

    spec: DeciderSpec
    panic_time: float | None = None
    max_panic_pods: int = 0
    delay_window: MaxWindow | None = field(default=None)

    @classmethod
    def new(cls, spec: DeciderSpec, ready_pods: int, now: float) -> "Autoscaler":
        """Knative's New: a decider created over more than one ready pod starts in panic mode, holding that
        scale, since it has lost the metric history a scale-down would need."""
        delay = MaxWindow(spec.scale_down_delay) if spec.scale_down_delay > 0 else None
        if ready_pods > 1:
            return cls(spec, panic_time=now, max_panic_pods=ready_pods, delay_window=delay)
        return cls(spec, max_panic_pods=max(0, ready_pods), delay_window=delay)

    def update(self, spec: DeciderSpec) -> None:
        """Knative's Update: a new spec (a changed target, reachability), the panic state kept."""
        self.spec = spec

    def scale(self, stable: float | None, panic: float | None, ready_pods: int, now: float) -> ScaleResult:
        """One decision from the stable and panic window averages of the observed metric."""
        spec = self.spec
        if stable is None or panic is None:
            return ScaleResult(0, 0, False, self.panic_time is not None)  # no data: Knative's invalid result
        ready = max(1.0, float(ready_pods))
        # Rounded up, so a slow rate (1.1 x 2 pods) still grows by a pod when one is needed.
        max_up = math.ceil(spec.max_scale_up_rate * ready)
        max_down = math.floor(ready / spec.max_scale_down_rate) if spec.reachable else 0.0
        dspc = math.ceil(stable / spec.target_value)
        dppc = math.ceil(panic / spec.target_value)
        desired_stable = int(min(max(dspc, max_down), max_up))
        desired_panic = int(min(max(dppc, max_down), max_up))
        if spec.activation_scale > 1:  # applies when the metric wants a pod, not when the bounds keep one
            if dspc > 0 and spec.activation_scale > desired_stable:
                desired_stable = spec.activation_scale
            if dppc > 0 and spec.activation_scale > desired_panic:
                desired_panic = spec.activation_scale

        over_threshold = dppc / ready >= spec.panic_threshold
        if over_threshold:
            self.panic_time = now  # begin panicking, or extend it
        elif self.panic_time is not None and self.panic_time + spec.stable_window < now:
            self.panic_time = None  # the surge has made its way into the stable window
            self.max_panic_pods = 0

        desired = desired_stable
        if self.panic_time is not None:
            desired = max(desired, desired_panic)
            # No scaling down in panic mode: hold the peak.
            self.max_panic_pods = max(self.max_panic_pods, desired)
            desired = self.max_panic_pods

        # An unreachable revision (no route sends it traffic) goes down without the delay.
        if self.delay_window is not None and spec.reachable:
            self.delay_window.record(now, desired)
            desired = self.delay_window.current()

        if spec.target_burst_capacity == 0:
            excess = 0.0
        elif spec.target_burst_capacity > 0:
            excess = math.floor(ready_pods * spec.total_value - spec.target_burst_capacity - panic)
        else:
            excess = -1.0
        return ScaleResult(desired, int(excess), True, self.panic_time is not None)


def bounded_scale(desired: int, min_scale: int, max_scale: int) -> int:
    """Knative's applyBounds: min-scale and max-scale (0 = unbounded) around a decision."""
    if max_scale > 0:
        desired = min(desired, max_scale)
    return max(desired, min_scale)


def scale_to_zero_gate(desired: int, current: int, inactive_since: float | None, now: float, grace: float,
                       retention: float, enabled: bool = True) -> tuple[int, float | None]:
    """Knative's handleScaleToZero: a revision whose decision is 0 keeps one replica until it has been
    inactive for the longer of the grace period and the pod-retention period.

    Returns the scale to apply and the time the revision became inactive (None while active)."""
    if desired != 0:
        return desired, None
    if not enabled:
        return 1, None
    since = now if inactive_since is None else inactive_since
    if current == 0:
        return 0, since
    if now - since >= max(grace, retention):
        return 0, since
    return 1, since
