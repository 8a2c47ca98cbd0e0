"""The small-sample statistics every claim about training outcomes goes through, in pure Python.

Student's t (quantile and distribution function), paired one-sided bounds for non-inferiority, Holm's
step-down correction, the number of seeds a margin needs, and a percentile bootstrap. The service's
calibration interval and the benchmarks' verdicts use these, so one definition decides both.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

__all__ = ["NonInferiority", "bootstrap_interval", "f_sf", "holm", "non_inferiority", "seeds_for_margin", "t_cdf",
           "t_quantile"]


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile: exact for 1 and 2 degrees of freedom, else the Cornish-Fisher series
    (within 0.2% at df 3 and p 0.975, better above)."""
    if not 0 < p < 1:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3)
            + (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / (92160 * df ** 4))


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (the incomplete beta function)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


def f_sf(f: float, d1: int, d2: int) -> float:
    """P(F > f) for Fisher's F with ``d1`` and ``d2`` degrees of freedom: the p-value of a nested
    least-squares comparison (``d1`` added terms, ``d2`` residual degrees of freedom)."""
    if d1 < 1 or d2 < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {d1}, {d2}")
    if not f > 0:
        return 1.0
    if math.isinf(f):
        return 0.0
    return _betainc(d2 / 2, d1 / 2, d2 / (d2 + d1 * f))


@dataclass(frozen=True)
class NonInferiority:
    """A paired test that a candidate is no worse than a peer by more than ``margin``.

    ``differences`` are the candidate's relative losses over the peer, seed by seed (positive: the
    candidate is worse). H0: the mean difference >= margin; ``p`` is its one-sided p-value and ``upper``
    the one-sided (1 - alpha) upper bound of the mean difference (``lower`` the matching lower bound,
    which says the candidate is worse by more than the margin when it exceeds it)."""

    n: int
    mean: float
    sd: float
    upper: float
    lower: float
    margin: float
    p: float

    @property
    def decided(self) -> str:
        """Before any multiplicity correction: 'non-inferior', 'inferior' or 'undecided'."""
        if self.upper < self.margin:
            return "non-inferior"
        if self.lower > self.margin:
            return "inferior"
        return "undecided"


def non_inferiority(differences: Sequence[float], margin: float, alpha: float = 0.05) -> NonInferiority:
    """The paired one-sided t test of H0 mean(differences) >= margin against H1 mean < margin."""
    d = [float(x) for x in differences]
    if len(d) < 2:
        raise ValueError(f"differences needs >= 2 paired seeds, got {len(d)}")
    if not all(math.isfinite(x) for x in d):
        raise ValueError("differences must be finite (a diverged run is decided before this test)")
    n = len(d)
    mean = math.fsum(d) / n
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    half = t_quantile(1 - alpha, n - 1) * se
    if se == 0:
        p = 0.0 if mean < margin else 1.0
    else:
        p = t_cdf((mean - margin) / se, n - 1)
    return NonInferiority(n, mean, sd, mean + half, mean - half, margin, p)


def holm(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down procedure: which hypotheses are rejected with the family-wise error <= alpha."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - rank):
            break
        rejected[i] = True
    return rejected


def seeds_for_margin(sd: float, margin: float, *, alpha: float = 0.05, power: float = 0.8, true_difference: float = 0.0,
                     tests: int = 1, minimum: int = 5, maximum: int = 64) -> int:
    """Paired seeds for a one-sided non-inferiority t test at ``alpha`` (Bonferroni over ``tests``, Holm's
    worst case) to show a candidate whose true difference is ``true_difference`` non-inferior with the
    given power, when the paired differences' standard deviation is ``sd``; clipped to
    [``minimum``, ``maximum``]."""
    if margin <= true_difference:
        return maximum
    if sd <= 0:
        return minimum
    a = alpha / tests
    n = minimum
    while n < maximum:
        need = ((t_quantile(1 - a, n - 1) + t_quantile(power, n - 1)) * sd / (margin - true_difference)) ** 2
        if n >= need:
            return n
        n += 1
    return maximum


def bootstrap_interval(groups: Sequence[Sequence[float]], statistic: Callable[[list[list[float]]], float], *,
                       resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(groups)``, each group resampled with replacement on its
    own (e.g. the seeds at each batch size); resamples where the statistic is not finite count as
    beyond either end (so an often-undefined statistic widens to +-inf)."""
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        sample = [[g[rng.randrange(len(g))] for _ in g] for g in groups]
        values.append(statistic(sample))
    finite = sorted(v for v in values if math.isfinite(v))
    undefined = len(values) - len(finite)
    lo_k = math.floor((1 - level) / 2 * resamples)
    hi_k = math.ceil((1 + level) / 2 * resamples) - 1
    # Undefined resamples sit half below and half above the finite ones.
    below = undefined // 2
    ordered = [-math.inf] * below + finite + [math.inf] * (undefined - below)
    return ordered[lo_k], ordered[min(hi_k, len(ordered) - 1)]
