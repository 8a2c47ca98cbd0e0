"""The statistics behind every claim about training outcomes, against values from published tables."""

import math

import pytest

from largebatch.scaling_rules.stats import (
    bootstrap_interval,
    f_sf,
    holm,
    non_inferiority,
    seeds_for_margin,
    t_cdf,
    t_quantile,
)


@pytest.mark.parametrize("p, df, expected", [
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776), (0.95, 4, 2.132), (0.95, 9, 1.833),
    (0.975, 29, 2.045), (0.8, 4, 0.941), (0.8, 9, 0.883)])
def test_t_quantile_matches_the_table(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=2e-3 * expected)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 20, 60])
@pytest.mark.parametrize("p", [0.6, 0.8, 0.9, 0.95, 0.975])
def test_t_cdf_inverts_the_quantile(p, df):
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=2e-3)
    assert t_cdf(-t_quantile(p, df), df) == pytest.approx(1 - p, abs=2e-3)


def test_t_cdf_exact_at_one_degree_of_freedom():  # the Cauchy distribution
    for t in (-3.0, -0.5, 0.0, 0.7, 10.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)


@pytest.mark.parametrize("f, d1, d2, p", [
    (4.103, 2, 10, 0.05), (6.608, 1, 5, 0.05), (4.938, 3, 20, 0.01), (19.00, 2, 2, 0.05), (3.316, 2, 30, 0.05)])
def test_f_sf_matches_the_table(f, d1, d2, p):  # F tables, upper 5% and 1% points
    assert f_sf(f, d1, d2) == pytest.approx(p, rel=2e-3)


def test_f_sf_is_t_squared_with_one_numerator_degree():
    for t, df in ((0.5, 3), (2.0, 7), (3.5, 12)):
        assert f_sf(t * t, 1, df) == pytest.approx(2 * (1 - t_cdf(t, df)), rel=1e-9)
    assert f_sf(0.0, 2, 5) == 1.0 and f_sf(math.inf, 2, 5) == 0.0


def test_non_inferiority_decides_three_ways():
    close = non_inferiority([0.001, -0.002, 0.0005, 0.0, -0.001], margin=0.005)
    assert close.decided == "non-inferior" and close.p < 0.05 and close.upper < 0.005
    worse = non_inferiority([0.02, 0.021, 0.019, 0.022, 0.02], margin=0.005)
    assert worse.decided == "inferior" and worse.lower > 0.005 and worse.p > 0.95
    noisy = non_inferiority([0.03, -0.03, 0.01, -0.02, 0.0], margin=0.005)
    assert noisy.decided == "undecided"


def test_non_inferiority_bound_is_the_t_bound():
    d = [0.01, 0.0, 0.02, -0.01, 0.005]
    r = non_inferiority(d, margin=0.01)
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    assert r.upper == pytest.approx(mean + 2.132 * sd / math.sqrt(5), rel=1e-3)


@pytest.mark.parametrize("bad, match", [([0.1], "2 paired"), ([0.1, float("nan")], "finite")])
def test_non_inferiority_refuses_what_it_cannot_test(bad, match):
    with pytest.raises(ValueError, match=match):
        non_inferiority(bad, margin=0.01)


def test_holm_steps_down():
    # alpha 0.05 over 4: thresholds 0.0125, 0.0167, 0.025, 0.05
    assert holm([0.01, 0.04, 0.02, 0.005]) == [True, True, True, True]
    assert holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]
    assert holm([0.01, 0.04, 0.03, 0.02]) == [True, False, False, False]
    assert holm([0.2, 0.001]) == [False, True]
    assert holm([]) == []


def test_seeds_for_margin_grows_with_the_noise():
    assert seeds_for_margin(0.001, 0.01) == 5  # the floor
    few, many = seeds_for_margin(0.005, 0.01), seeds_for_margin(0.01, 0.01)
    assert 5 <= few < many <= 64
    # the normal approximation's n for sd = margin, alpha 0.05, power 0.8 is (1.645 + 0.842)^2 = 6.2; t needs more
    assert many in (8, 9)
    assert seeds_for_margin(0.01, 0.01, tests=4) > many  # Holm's worst case: alpha / 4
    assert seeds_for_margin(0.01, 0.01, true_difference=0.02) == 64


def test_bootstrap_interval_covers_the_mean():
    import random

    rng = random.Random(1)
    data = [rng.gauss(10, 2) for _ in range(40)]
    lo, hi = bootstrap_interval([data], lambda g: sum(g[0]) / len(g[0]), resamples=1000)
    assert lo < sum(data) / 40 < hi
    assert hi - lo == pytest.approx(2 * 1.96 * 2 / math.sqrt(40), rel=0.35)
    # a statistic undefined on most resamples widens to infinity rather than hiding it
    lo, hi = bootstrap_interval([[0.0, 1.0]], lambda g: 1 / g[0][0] if g[0][0] else math.nan, resamples=200)
    assert (lo, hi) == (-math.inf, math.inf) or hi == math.inf
