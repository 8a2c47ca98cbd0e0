"""The should_stop rule on its own numbers (the HTTP side is in test_api.py)."""

from __future__ import annotations

import math

import pytest

from largebatch.service.divergence import DivergenceRule


def test_non_finite_always_stops():
    rule = DivergenceRule()
    for bad in (math.nan, math.inf, -math.inf):
        assert rule.judge(3, bad, None, None).should_stop
    assert rule.judge(3, 1.0, math.nan, None).should_stop
    assert not rule.judge(3, 1.0, 2.0, None).should_stop


def test_early_loss_is_median_of_first_window_by_step():
    rule = DivergenceRule(factor=3, window=5)
    assert rule.learn(1, [(0, 10.0), (1, 9.0)]) is None  # not enough reports yet
    reports = [(4, 8.0), (0, 10.0), (2, 100.0), (1, 9.0), (3, 8.5), (9, 1.0)]  # one odd early value
    assert rule.learn(1, reports) == 9.0
    assert rule.learn(1, [(0, 1.0)] * 5) == 9.0  # fixed once known
    assert not rule.judge(50, 26.9, None, 9.0).should_stop  # a spike below 3x
    v = rule.judge(51, 27.5, None, 9.0)
    assert v.should_stop and "27.5" in v.reason and "early loss 9" in v.reason
    rule.forget(1)
    assert rule.early_loss(1) is None


def test_healthy_noisy_curve_never_stops_and_a_blow_up_does_quickly():
    rule = DivergenceRule()
    curve = [(s, 10.4 * math.exp(-s / 300) + 1.5 + 0.8 * math.sin(s)) for s in range(2000)]
    early = rule.learn(7, curve[:5])
    assert not any(rule.judge(s, loss, None, early).should_stop for s, loss in curve)
    blow = [(2000 + i, 2.0 * 2.5**i) for i in range(20)]
    first = next(s for s, loss in blow if rule.judge(s, loss, None, early).should_stop)
    assert first - 2000 <= 4


def test_non_positive_early_loss_switches_the_ratio_rule_off():
    rule = DivergenceRule()
    assert not rule.judge(9, 1e6, None, -2.0).should_stop
    assert rule.judge(9, math.nan, None, -2.0).should_stop


@pytest.mark.parametrize("factor,window", [(1.0, 5), (math.inf, 5), (3.0, 0)])
def test_bad_parameters(factor, window):
    with pytest.raises(ValueError):
        DivergenceRule(factor, window)


def test_reports_are_read_back_only_once_enough_may_exist():
    rule = DivergenceRule(window=3)
    assert [rule.note_reports(5, 1) for _ in range(4)] == [False, False, True, True]
    assert rule.note_reports(6, 10)
    rule.forget(5)
    assert not rule.note_reports(5, 1)
