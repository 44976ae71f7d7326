"""Table tests of the KPA decision (knative/embedded/control/autoscaler.py), cases after Knative's own."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from thaw.knative.embedded.control.autoscaler import (Autoscaler, AutoscalerConfig, ConcurrencyWindow, DeciderSpec,
                                                     RateWindow, bounded_scale, resolve_spec, scale_to_zero_gate)
from thaw.spec import Scaling


# ---- knative/serving pkg/autoscaler/scaling/autoscaler_test.go, ported ----------------------------
# Its harness: target utilisation 75 % (TotalValue = target / 0.75), panic threshold 2 (200 %), scale rates
# 10 both ways, a 60 s stable window, reachable. `ebc` is its expectedEBC; it compares EBC within +-1.

STABLE_WINDOW = 60.0
TICK = 2.0


def knative_spec(target: float, tbc: float, **kw) -> DeciderSpec:
    base = dict(target_value=target, total_value=target / 0.75, target_burst_capacity=tbc, panic_threshold=2,
                stable_window=STABLE_WINDOW, panic_window=STABLE_WINDOW / 10, max_scale_up_rate=10,
                max_scale_down_rate=10, reachable=True)
    return DeciderSpec(**{**base, **kw})


def ebc(target: float, tbc: float, concurrency: float, pods: float) -> int:
    return math.floor(target / 0.75 * pods - tbc - concurrency)


def expect(a: Autoscaler, stable, panic, ready: int, now: float, desired: int, excess: int | None = None,
           valid: bool = True) -> None:
    got = a.scale(stable, panic, ready, now)
    assert (got.desired, got.valid) == (desired, valid), got
    if excess is not None:
        assert abs(got.excess_burst_capacity - excess) <= 1, got


# TestAutoscalerScale: one decision each, from a fresh decider (label, target, tbc, stable, panic, ready pods,
# prep, desired, ebc)
@pytest.mark.parametrize("label,target,tbc,stable,panic,ready,prep,want,want_ebc", [
    ("AutoscalerNoDataAtZeroNoAutoscale", 10, 100, 0, 0, 1, {}, 0, ebc(10, 100, 0, 1)),
    ("AutoscalerStableModeUnlimitedTBC", 181, -1, 21, 26, 1, {}, 1, -1),
    ("Autoscaler0TBC", 10, 0, 50, 49, 1, {}, 5, 0),
    ("AutoscalerStableModeNoChange", 10, 100, 50, 50, 1, {}, 5, ebc(10, 100, 50, 1)),
    ("AutoscalerPanicStableLargerThanPanic", 1, 100, 50, 30, 5, {"panic_ago": 5, "max_panic_pods": 5},
     50, ebc(1, 100, 30, 5)),
    ("AutoscalerPanicStableLessThanPanic", 1, 100, 20, 30, 5, {"panic_ago": 5, "max_panic_pods": 5},
     30, ebc(1, 100, 30, 5)),
    ("AutoscalerStableModeNoChangeAlreadyScaled", 10, 100, 50, 50, 5, {}, 5, ebc(10, 100, 50, 5)),
    ("AutoscalerStableModeIncreaseWithSmallScaleUpRate", 1, 1982, 3, 3.1, 2, {"max_scale_up_rate": 1.1},
     3, ebc(1, 1982, 3.1, 2)),
    ("AutoscalerStableModeDecreaseWithSmallScaleDownRate", 10, 1982, 1, 1, 100, {"max_scale_down_rate": 1.1},
     90, ebc(10, 1982, 1, 100)),
    ("AutoscalerStableModeDecreaseNonReachable", 10, 1982, 1, 1, 100,
     {"max_scale_down_rate": 1.1, "reachable": False}, 1, ebc(10, 1982, 1, 100)),
    ("AutoscalerPanicModeDoublePodCount", 10, 84, 50, 100, 1, {}, 10, ebc(10, 84, 100, 1)),
])
def test_knative_autoscaler_scale_table(label, target, tbc, stable, panic, ready, prep, want, want_ebc):
    prep = dict(prep)
    panic_ago, max_panic_pods = prep.pop("panic_ago", None), prep.pop("max_panic_pods", 0)
    a = Autoscaler.new(knative_spec(target, tbc, **prep), ready_pods=1, now=0)
    now = 1000.0
    if panic_ago is not None:
        a.panic_time, a.max_panic_pods = now - panic_ago, max_panic_pods
    expect(a, stable, panic, ready, now, want, want_ebc)


def test_no_data_no_autoscale():  # TestAutoscalerNoDataNoAutoscale
    expect(Autoscaler.new(knative_spec(10, 100), 1, 0), None, None, 1, 0, 0, 0, valid=False)


def test_scale_down_delay():  # TestAutoscalerScaleDownDelay
    a = Autoscaler.new(knative_spec(10, 0, panic_threshold=100, scale_down_delay=300), 0, 0)
    expect(a, 40, 40, 0, 2, 4)  # simple: scale up
    expect(a, 0, 0, 0, 300, 4)  # five minutes at reduced concurrency: less than the delay
    expect(a, 0, 0, 0, 302, 0)  # five minutes and two seconds: now down
    expect(a, 40, 40, 0, 540, 4)  # gradual
    expect(a, 30, 30, 0, 600, 4)  # 4 still dominates
    expect(a, 0, 0, 0, 660, 4)
    expect(a, 0, 0, 0, 840, 3)  # 4 scrolls out
    expect(a, 0, 0, 0, 900, 0)  # everything scrolled out


def test_scale_down_delay_not_reachable():  # TestAutoscalerScaleDownDelayNotReachable
    a = Autoscaler.new(knative_spec(10, 0, panic_threshold=100, scale_down_delay=300), 0, 0)
    expect(a, 40, 40, 0, 2, 4)
    expect(a, 0, 0, 0, 60, 4)  # within the delay
    a.update(replace(a.spec, reachable=False))  # another revision takes the traffic
    expect(a, 0, 0, 0, 62, 0)  # unreachable: no delay


def test_scale_down_delay_zero():  # TestAutoscalerScaleDownDelayZero
    a = Autoscaler.new(knative_spec(10, 0, panic_threshold=100, scale_down_delay=0), 0, 0)
    expect(a, 40, 40, 0, 0, 4)
    expect(a, 20, 20, 0, 0.5, 2)  # no window: at once, even within the same tick


def test_stable_mode_increase():  # TestAutoscalerStableModeIncreaseWithConcurrencyDefault
    a = Autoscaler.new(knative_spec(10, 101), 1, 0)
    expect(a, 50, 10, 1, 0, 5, ebc(10, 101, 10, 1))
    expect(a, 100, 10, 1, 0, 10, ebc(10, 101, 10, 1))


def test_unpanic_after_slow_increase():  # TestAutoscalerUnpanicAfterSlowIncrease
    a = Autoscaler.new(knative_spec(1, 98), 1, 0)
    start = 1000.0
    expect(a, 11, 25, 10, start, 25, ebc(1, 98, 25, 10))
    assert a.panic_time == start
    expect(a, 30, 41, 40, start + STABLE_WINDOW / 2, 41, ebc(1, 98, 41, 40))
    assert a.panic_time == start  # 41/40 is under the threshold: the panic is not extended
    expect(a, 50, 56, 55, start + STABLE_WINDOW + TICK, 50, ebc(1, 98, 56, 55))  # no longer in panic
    assert a.panic_time is None


def test_extend_panic_window():  # TestAutoscalerExtendPanicWindow
    a = Autoscaler.new(knative_spec(1, 98), 1, 0)
    start = 1000.0
    expect(a, 11, 25, 10, start, 25, ebc(1, 98, 25, 10))
    expect(a, 30, 80, 40, start + STABLE_WINDOW / 2, 80, ebc(1, 98, 80, 40))
    assert a.panic_time == start + STABLE_WINDOW / 2


def test_stable_mode_decrease():  # TestAutoscalerStableModeDecrease
    a = Autoscaler.new(knative_spec(10, 98), 1, 0)
    expect(a, 100, 100, 8, 0, 10, ebc(10, 98, 100, 8))
    expect(a, 50, 50, 8, 0, 5, ebc(10, 98, 50, 8))


def test_no_traffic_scales_to_zero():  # TestAutoscalerStableModeNoTrafficScaleToZero
    a = Autoscaler.new(knative_spec(10, 75), 1, 0)
    expect(a, 1, 0, 1, 0, 1, ebc(10, 75, 0, 1))
    expect(a, 0, 0, 1, 0, 0, ebc(10, 75, 0, 1))


def test_activation_scale():  # TestAutoscalerActivationScale
    a = Autoscaler.new(knative_spec(10, 75, activation_scale=2), 1, 0)
    expect(a, 0, 0, 1, 0, 0, ebc(10, 75, 0, 1))
    expect(a, 1, 0, 1, 0, 2, ebc(10, 75, 0, 1))


def test_activation_scale_applies_to_the_metric_not_the_bound():
    # 10 ready pods and no load: the scale-down bound keeps 1 (floor(10/10)), but the metric wants none,
    # so activation-scale does not lift it to 3
    a = Autoscaler.new(knative_spec(10, 0, activation_scale=3), 1, 0)
    expect(a, 0, 0, 10, 0, 1)


def test_panic_mode_exponential_track_and_stabilize():  # TestAutoscalerPanicModeExponentialTrackAndStabilize
    a = Autoscaler.new(knative_spec(1, 101), 1, 0)
    expect(a, 6, 6, 1, 0, 6, ebc(1, 101, 6, 1))
    tm = 1000.0
    expect(a, 36, 36, 6, tm, 36, ebc(1, 101, 36, 6))
    assert a.panic_time == tm
    tm += 1
    expect(a, 216, 216, 36, tm, 216, ebc(1, 101, 216, 36))
    assert a.panic_time == tm
    expect(a, 1296, 1296, 216, tm, 1296, ebc(1, 101, 1296, 216))
    assert a.panic_time == tm
    expect(a, 1296, 1296, 1296, tm + 1, 1296, ebc(1, 101, 1296, 1296))


def test_panic_then_unpanic_scale_down():  # TestAutoscalerPanicThenUnPanicScaleDown
    a = Autoscaler.new(knative_spec(10, 93), 1, 0)
    expect(a, 100, 100, 1, 0, 10, ebc(10, 93, 100, 1))
    panic_time = 1000.0
    expect(a, 100, 1000, 10, panic_time, 100, ebc(10, 93, 1000, 10))
    expect(a, 1, 1, 10, panic_time + 30, 100, ebc(10, 93, 1, 10))  # traffic gone, still in panic
    expect(a, 1, 1, 10, panic_time + 61, 1, ebc(10, 93, 1, 10))  # a stable window later


def test_rate_limit_scale_up():  # TestAutoscalerRateLimitScaleUp
    a = Autoscaler.new(knative_spec(10, 61), 1, 0)
    expect(a, 1000, 1001, 1, 0, 10, ebc(10, 61, 1001, 1))  # needs 100, may only go x10
    expect(a, 1000, 1001, 10, 0, 100, ebc(10, 61, 1001, 10))


def test_rate_limit_scale_down():  # TestAutoscalerRateLimitScaleDown
    a = Autoscaler.new(knative_spec(10, 61), 1, 0)
    expect(a, 1, 1, 100, 0, 10, ebc(10, 61, 1, 100))  # needs 1, may only go /10
    expect(a, 1, 1, 10, 0, 1, ebc(10, 61, 1, 10))


def test_one_pod_as_minimum_when_none_is_ready():  # TestAutoscalerUseOnePodAsMinimumIfEndpointsNotFound
    a = Autoscaler.new(knative_spec(10, 81), 1, 0)
    expect(a, 1000, 888, 0, 0, 10, ebc(10, 81, 888, 0))


def test_update_target():  # TestAutoscalerUpdateTarget
    a = Autoscaler.new(knative_spec(10, 77), 1, 0)
    expect(a, 100, 101, 1, 0, 10, ebc(10, 77, 101, 1))
    a.update(knative_spec(1, 71))
    expect(a, 100, 101, 10, 0, 100, ebc(1, 71, 101, 10))


@pytest.mark.parametrize("ready,panicking,max_panic_pods", [(0, False, 0), (1, False, 1), (2, True, 2)])
def test_start_in_panic_mode(ready, panicking, max_panic_pods):  # TestStartInPanicMode
    a = Autoscaler.new(knative_spec(100, 11, total_value=120, panic_threshold=220), ready, now=5)
    assert (a.panic_time is not None, a.max_panic_pods) == (panicking, max_panic_pods)


def test_resolve_spec_uses_knative_defaults_and_caps_target_by_concurrency():
    default = resolve_spec(Scaling(), container_concurrency=0)
    assert (default.total_value, default.target_value, default.metric) == (100, 70, "concurrency")
    assert (default.stable_window, default.panic_window, default.panic_threshold) == (60, 6, 2.0)
    capped = resolve_spec(Scaling(target=50), container_concurrency=8)
    assert (capped.total_value, capped.target_value) == (8, pytest.approx(5.6))
    hard = resolve_spec(Scaling(), container_concurrency=4)
    assert hard.total_value == 4


# Knative's TestResolveMetricTarget (pkg/reconciler/autoscaling/resources/target_test.go). Its config has a
# concurrency target fraction of 1.0 and a utilisation of 0.7 (rps); thaw has one knob for both, the
# target-utilization-percentage annotation, so each case names the fraction Knative's config gives it.
@pytest.mark.parametrize("name, scaling, cc, config, want_target, want_total", [
    ("defaults", {}, 0, {}, 100, 100),
    ("default CC + 80% TU", {"tu": 80}, 0, {}, 80, 100),
    ("non-default CC and TU", {"tu": 30}, 0, {"container_concurrency_target_default": 2}, 1, 2),
    ("CC 12, TU annotation 75%", {"tu": 75}, 12, {}, 9, 12),
    ("CC 10 and TU=80%", {"tu": 80}, 10, {}, 8, 10),
    ("CC 1 and TU=80%: not less than 1", {"tu": 80}, 1, {}, 1, 1),
    ("CC 1", {}, 1, {}, 1, 1),
    ("CC 10", {}, 10, {}, 10, 10),
    ("target annotation 1", {"target": 1}, 0, {}, 1, 1),
    ("target annotation 1 and TU=75%", {"target": 1, "tu": 75}, 0, {}, 1, 1),
    ("target annotation 10 and TU=75%", {"target": 10, "tu": 75}, 0, {}, 7.5, 10),
    ("CC greater than the target annotation", {"target": 1}, 10, {}, 1, 1),
    ("target annotation greater than the default", {"target": 500}, 0, {}, 500, 500),
    ("target annotation greater than CC: CC for safety", {"target": 10}, 1, {}, 1, 1),
    ("RPS: defaults", {"metric": "rps", "tu": 70}, 1, {}, 140, 200),
    ("RPS: target annotation 1", {"metric": "rps", "target": 1, "tu": 70}, 0, {}, 1, 1),
    ("RPS: TU annotation 75%", {"metric": "rps", "tu": 75}, 0, {}, 150, 200),
    ("RPS: target annotation greater than the default", {"metric": "rps", "target": 300, "tu": 70}, 0, {}, 210, 300),
])
def test_resolve_metric_target(name, scaling, cc, config, want_target, want_total):
    tu = scaling.pop("tu", 100)
    spec = resolve_spec(Scaling(target_utilization_percentage=tu, **scaling), cc, AutoscalerConfig(**config))
    assert (spec.target_value, spec.total_value) == (pytest.approx(want_target), want_total), name


def test_the_rps_window_averages_requests_per_second():
    window = RateWindow(60)
    for t, count in [(100.1, 3), (100.6, 2), (101.2, 0), (102.5, 4)]:
        window.record(t, count)  # the sampler's counts of new requests, several a second
    assert window.average(102.9, 60) == pytest.approx((5 + 0 + 4) / 3)  # 3 seconds observed so far
    assert window.average(102.9, 1) == 4
    assert window.average(110.0, 60) == pytest.approx(9 / 11)  # seconds without a sample count as zero
    concurrency = ConcurrencyWindow(60)
    concurrency.record(100.1, 3)
    concurrency.record(100.6, 1)
    assert concurrency.average(100.9, 60) == 2  # concurrency samples are averaged within a second


def test_the_kpa_scales_on_rps_as_on_concurrency():
    decider = Autoscaler.new(resolve_spec(Scaling(metric="rps", target=10), container_concurrency=4), 1, now=0)
    assert decider.spec.target_value == 7  # rps targets are not capped by containerConcurrency
    assert decider.scale(stable=30, panic=30, ready_pods=1, now=1).desired == 5  # ceil(30 / 7); panic: 5/1 >= 2
    assert decider.scale(stable=6, panic=6, ready_pods=2, now=100).desired == 1  # panic over, down to ceil(6/7)


def test_bounds():
    assert bounded_scale(0, min_scale=1, max_scale=0) == 1
    assert bounded_scale(9, min_scale=0, max_scale=3) == 3


def test_window_average_over_the_observed_span():
    w = ConcurrencyWindow(60)
    assert w.average(0, 60) is None
    w.record(100.2, 4)
    w.record(100.7, 2)  # same second: averaged
    assert w.average(100.9, 60) == 3  # only one second observed so far
    w.record(102.1, 6)  # second 101 had no report: counts as zero
    assert w.average(102.5, 60) == pytest.approx((3 + 0 + 6) / 3)
    assert w.average(102.5, 1) == 6


@pytest.mark.parametrize("desired,current,since,now,expected", [
    (3, 2, 50.0, 100, (3, None)),  # active: the decision stands, inactivity resets
    (0, 0, None, 100, (0, 100)),  # already at zero: stays there
    (0, 1, None, 100, (1, 100)),  # just went inactive: keep one for the grace period
    (0, 1, 100.0, 129, (1, 100.0)),  # still within 30 s
    (0, 1, 100.0, 130, (0, 100.0)),  # grace over: zero
])
def test_scale_to_zero_gate(desired, current, since, now, expected):
    assert scale_to_zero_gate(desired, current, since, now, grace=30, retention=0) == expected


def test_pod_retention_period_outlasts_grace():
    assert scale_to_zero_gate(0, 1, 0.0, 45, grace=30, retention=60) == (1, 0.0)
    assert scale_to_zero_gate(0, 1, 0.0, 60, grace=30, retention=60) == (0, 0.0)
    assert scale_to_zero_gate(0, 1, None, 0, grace=30, retention=0, enabled=False) == (1, None)
