"""Table tests of the KPA decision (knative/embedded/autoscaler.py), cases after Knative's own."""

from __future__ import annotations

import pytest

from thaw.knative.embedded.autoscaler import (Autoscaler, ConcurrencyWindow, DeciderSpec, bounded_scale,
                                              resolve_spec, scale_to_zero_gate)
from thaw.spec import Scaling


def spec(**kw) -> DeciderSpec:
    base = dict(target_value=10, total_value=10, target_burst_capacity=0, panic_threshold=2.0,
                stable_window=60, panic_window=6)
    return DeciderSpec(**{**base, **kw})


@pytest.mark.parametrize("stable,panic,ready,expected", [
    (None, None, 0, -1),  # no data at zero: no decision, the revision stays at 0
    (0, 0, 0, 0),  # data, but no load: zero
    (10, 10, 1, 1),
    (25, 25, 3, 3),  # stable: ceil(25/10)
    (50, 50, 1, 5),  # panic (50/10/1 >= 2): ceil(50/10)
    (1, 1, 10, 5),  # scale down at most halves: floor(10/2)
    (0, 0, 1, 0),
])
def test_decision_table(stable, panic, ready, expected):
    assert Autoscaler(spec()).scale(stable, panic, ready, now=100).desired == expected


def test_stable_versus_panic_selection():
    a = Autoscaler(spec())
    calm = a.scale(stable=20, panic=30, ready_pods=2, now=0)  # 30/10/2 = 1.5 < 2: stable
    assert (calm.desired, calm.panicking) == (2, False)
    surge = a.scale(stable=20, panic=80, ready_pods=2, now=1)  # 8/2 = 4 >= 2: panic picks 8
    assert (surge.desired, surge.panicking) == (8, True)


def test_panic_holds_its_peak_until_a_stable_window_passes():
    a = Autoscaler(spec())
    assert a.scale(10, 100, 1, now=0).desired == 10
    assert a.scale(10, 40, 5, now=10).desired == 10  # over threshold? 4/5 < 2: no, but still panicking
    assert a.scale(10, 10, 10, now=59).desired == 10  # within the stable window of the last panic
    out = a.scale(10, 10, 10, now=61)  # a stable window after the panic began: back to stable
    assert (out.desired, out.panicking) == (5, False)  # and halving is the most it may drop


def test_rate_limits():
    fast = Autoscaler(spec(max_scale_up_rate=2))
    assert fast.scale(1000, 1000, 3, now=0).desired == 6  # at most 2x the ready pods
    assert Autoscaler(spec(max_scale_up_rate=2)).scale(1000, 1000, 0, now=0).desired == 2  # zero counts as one
    slow = Autoscaler(spec(max_scale_down_rate=4))
    assert slow.scale(0, 0, 8, now=0).desired == 2  # at most down to a quarter


def test_scale_down_delay_keeps_the_max_of_the_window():
    a = Autoscaler(spec(scale_down_delay=30))
    assert a.scale(50, 50, 5, now=0).desired == 5
    assert a.scale(0, 0, 5, now=10).desired == 5  # wanted 2 (halving), held at 5
    assert a.scale(0, 0, 5, now=29).desired == 5
    assert a.scale(0, 0, 5, now=31).desired == 2  # the 5 left the 30 s window


def test_activation_scale():
    a = Autoscaler(spec(activation_scale=3))
    assert a.scale(5, 5, 0, now=0).desired == 3  # from zero: straight to 3
    assert a.scale(0, 0, 0, now=1).desired == 0  # zero stays zero


@pytest.mark.parametrize("tbc,ready,panic,expected", [
    (0, 3, 5, 0),  # 0: the activator leaves the path once pods are up
    (-1, 3, 5, -1),  # -1: always in the path
    (211, 1, 0, -201),  # default 211 with 1 pod of 10: the activator stays
    (15, 3, 5, 10),  # floor(3*10 - 15 - 5)
])
def test_excess_burst_capacity(tbc, ready, panic, expected):
    assert Autoscaler(spec(target_burst_capacity=tbc)).scale(5, panic, ready, now=0).excess_burst_capacity == expected


def test_resolve_spec_uses_knative_defaults_and_caps_target_by_concurrency():
    default = resolve_spec(Scaling(), container_concurrency=0)
    assert (default.total_value, default.target_value) == (100, 70)
    assert (default.stable_window, default.panic_window, default.panic_threshold) == (60, 6, 2.0)
    capped = resolve_spec(Scaling(target=50), container_concurrency=8)
    assert (capped.total_value, capped.target_value) == (8, pytest.approx(5.6))
    hard = resolve_spec(Scaling(), container_concurrency=4)
    assert hard.total_value == 4


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
