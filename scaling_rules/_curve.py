"""The LR-vs-batch curve fitted on a study's runs: the regime curve, whose bend is fitted or measured.

The curve. The engine's rule moves the LR along f(B) = (1 + B_noise/B)^-e (see ``_lr.regime_factor``):
a power of the batch well below the critical batch, flat beyond it. The fitted curve has that shape,

    ln lr*(B) = log_c + a * h_N(B),    h_N(B) = ln B - ln(1 + B/N),

``a`` the exponent well below the bend (prior N(e, 0.15^2), e the optimizer's rule: 1/2 for the Adam
family, the papers' sqrt; 1 for SGD and LARS, Goyal et al.'s linear) and ``N`` the bend
(h_N = ln B when N is infinite: a pure power law). Around its optimum a run's metric is quadratic in
``ln lr - ln lr*(B)``, with a free level per batch size (see :mod:`.learning`); for each (a, N) that is
one least-squares solve, so the posterior over a grid of both is exact up to the noise estimate.

The bend. Two batch sizes cannot tell a power law from a bend (any two optima lie on both), so a
measured critical batch, where one is known, centres the bend's prior (log-normal, x/÷3 at one sd, as
far as a streaming statistic is trusted to agree with a branched one: ``priors.critical_batch_spread``,
which the rule itself averages over): the curve bends where the rule does, and runs that say nothing of
the bend leave the rule's answer. Without one, the runs must show the bend themselves: at three batch sizes or more, the best bend
must explain the optima beyond the best power law by more than the noise (an F-test at 5%, one
parameter more), else the curve is the power law. A bend that passes enters with half the prior, the
other half on no bend, spread log-uniform over the batches near the runs. The answer at a batch is the
posterior mean of ln lr* over the bends (model averaging), each at its exponent's posterior mean.
Without that test the prior on ``a`` alone would read a flat power law (0.3) as sqrt bending, and move
a study's answer off the line its runs lie on. The engine uses the measured bend only; a bend the runs
show alone is reported (``EvidenceModel.shown_bend``): on real sweeps the quadratic U, read on
asymmetric Us, bends the optima's centres enough to pass the test where a power law extrapolates better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import priors, stats
from .models import MAX_LR, MIN_LR

PRIOR_EXPONENT = 0.5  # LAMB section 4.3: sqrt scaling, the Adam family's rule (a linear rule's prior is 1).
PRIOR_SD = 0.15  # covers linear-ish (0.8) to flat (0.2) at 2 sd around sqrt: what LR sweeps in the literature show.
EXPONENT_GRID = np.linspace(-0.25, 1.25, 601)  # +-5 prior sd around PRIOR_EXPONENT; moved with another prior
MIN_CURVATURE_RUNS = 3  # a U needs three LRs
UNBENT_PRIOR = 0.5  # with no measured critical batch, the prior's mass on "no bend": a pure power law
BEND_SPAN = 8.0  # ... and the rest log-uniform on bends from B_min / 8 to B_max x 8
BEND_POINTS = 25
BEND_ALPHA = 0.05  # the F-test level at which runs show a bend no power law explains
_LN_MAX_LR = math.log(MAX_LR)


def standardised(y: np.ndarray) -> np.ndarray:
    """Metrics centred and scaled to at most 1: the fitted optima are the same, and metrics of any
    magnitude (1e155 included) stay finite when squared."""
    centre = np.median(y)
    scale = float(np.max(np.abs(y - centre)))
    if not math.isfinite(scale):
        raise ValueError("metrics too large to compare")
    return (y - centre) / (scale if scale > 0 else 1.0)


def column_basis(fixed: np.ndarray) -> np.ndarray:
    """An orthonormal basis of ``fixed``'s column space (rank-revealing: a warmup's U may repeat a level)."""
    u, sv, _ = np.linalg.svd(fixed, full_matrices=False)
    tol = sv.max(initial=0.0) * max(fixed.shape) * np.finfo(float).eps
    return u[:, sv > tol]


def profile_sse(fixed: np.ndarray, y: np.ndarray, ln_v: np.ndarray, ln_b: np.ndarray,
                grid: np.ndarray, basis: np.ndarray | None = None) -> np.ndarray:
    """The least-squares residual of ``y`` on ``[fixed, x, x^2]`` with ``x = ln_v - g ln_b``, for every ``g``
    of ``grid`` at once. ``x`` and ``x^2`` are polynomials in ``g`` whose terms (ln_v, ln_b, their squares
    and product) do not depend on it: those and ``y`` are projected off ``fixed`` once (``basis``, its
    :func:`column_basis`, shared by every call on the same runs); each ``g`` is then a 2x2 system in
    their inner products."""
    q = column_basis(fixed) if basis is None else basis
    z = np.column_stack([y, ln_v, ln_b, ln_v * ln_v, ln_v * ln_b, ln_b * ln_b])
    resid = z - q @ (q.T @ z)
    m = resid.T @ resid
    # x = e1 - g e2 and x^2 = e3 - 2g e4 + g^2 e5 over z's columns (e0 = y): the 2x2 Gram matrix G of
    # (x, x^2) and their products b with y, as polynomials in g, evaluated on the whole grid at once.
    g = grid
    g00 = m[1, 1] - 2 * g * m[1, 2] + g * g * m[2, 2]
    g01 = m[1, 3] - g * (2 * m[1, 4] + m[2, 3]) + g * g * (m[1, 5] + 2 * m[2, 4]) - g**3 * m[2, 5]
    g11 = (m[3, 3] - 4 * g * m[3, 4] + g * g * (4 * m[4, 4] + 2 * m[3, 5]) - 4 * g**3 * m[4, 5]
           + g**4 * m[5, 5])
    b0 = m[0, 1] - g * m[0, 2]
    b1 = m[0, 3] - 2 * g * m[0, 4] + g * g * m[0, 5]
    # b' G^-1 b in closed form; where G is (near) singular, with its pseudo-inverse.
    det = g00 * g11 - g01 * g01
    ok = np.abs(det) > 1e-10 * (np.abs(g00 * g11) + g01 * g01)
    explained = np.empty(len(grid))
    explained[ok] = (b0[ok] ** 2 * g11[ok] - 2 * b0[ok] * b1[ok] * g01[ok] + b1[ok] ** 2 * g00[ok]) / det[ok]
    if not ok.all():
        gs = np.stack([np.stack([g00, g01], -1), np.stack([g01, g11], -1)], -2)[~ok]
        bs = np.stack([b0, b1], -1)[~ok]
        explained[~ok] = np.einsum("ka,kab,kb->k", bs, np.linalg.pinv(gs), bs)
    return np.maximum(m[0, 0] - explained, 0.0)


def regime_coordinate(batch: np.ndarray | float, bend: float | None) -> np.ndarray | float:
    """h_N(B) = ln B - ln(1 + B/N): ln B for no bend; the curve's exponent multiplies it."""
    ln_b = np.log(batch)
    return ln_b if bend is None else ln_b - np.log1p(np.asarray(batch) / bend)


@dataclass(frozen=True)
class ScalingFit:
    """The fitted curve ln lr*(B) = log_c + exponent * h_N(B), averaged over the bends ``N`` the posterior
    keeps (``components``: weight, exponent, log_c, N or None for no bend)."""

    exponent: float  # the exponent well below the bend (the posterior mean over every bend)
    exponent_sd: float
    log_c: float  # the level at B = 1 of the posterior's mean curve where it does not bend
    curvature: float
    n_runs: int
    batch_sizes: tuple[int, ...]
    data_weight: float  # 0 = prior only, 1 = data only (how far the exponent's posterior moved off the prior)
    components: tuple[tuple[float, float, float, float | None], ...]
    bend: float | None = None  # the posterior's geometric-mean bend, where it puts weight on one
    bend_weight: float = 0.0  # the posterior's mass on a bend (1 where a measured critical batch sets it)
    measured_bend: float | None = None  # the critical batch the prior was centred on, if any
    prior_exponent: float = PRIOR_EXPONENT  # the rule's exponent, the prior's centre

    def log_optimum(self, batch_size: float) -> float:
        return math.fsum(w * (c + a * float(regime_coordinate(batch_size, n))) for w, a, c, n in self.components)

    def optimum(self, batch_size: int) -> float:
        # Clamped to the LRs a request may name: a fit extrapolated far past its evidence stays a number.
        ln = self.log_optimum(batch_size)
        return min(max(math.exp(min(ln, _LN_MAX_LR)), MIN_LR), MAX_LR)


def _bends(batches: list[int], measured: float | None) -> list[tuple[float | None, float]]:
    """The bends the posterior averages over, with their prior weights (summing to 1)."""
    if measured is not None:
        return list(priors.critical_batch_spread(measured))
    grid = np.geomspace(min(batches) / BEND_SPAN, max(batches) * BEND_SPAN, BEND_POINTS)
    return [(None, UNBENT_PRIOR)] + [(float(n), (1 - UNBENT_PRIOR) / BEND_POINTS) for n in grid]


def _shows_a_bend(sses: np.ndarray, n: int, p: int) -> bool:
    """Whether the best bend (rows 1.. of ``sses``) explains the runs beyond the best power law (row 0) by
    more than their noise: an F-test of one added parameter (``fit_curve`` asks at three batch sizes or more)."""
    dof = n - p - 1
    if dof < 1:
        return False
    power, bent = float(sses[0].min()), float(sses[1:].min())
    if bent <= 0:
        return power > 0
    return stats.f_sf(max(power - bent, 0.0) / (bent / dof), 1, dof) < BEND_ALPHA


def fit_curve(batch: np.ndarray, ln_lr: np.ndarray, y: np.ndarray, fixed: np.ndarray, batches: list[int],
              measured: float | None = None, *, bend: bool = True,
              prior_exponent: float = PRIOR_EXPONENT) -> ScalingFit | None:
    """The posterior over (exponent, bend) for runs at ``batch`` with LRs ``ln_lr`` and standardised metrics
    ``y`` (minimised), ``fixed`` the design's other columns (a level per batch size, the warmup's U);
    ``measured`` the critical batch in the runs' batch units, if one is known; ``bend=False``: the power
    law alone; ``prior_exponent`` the optimizer's rule (one batch size says nothing of the exponent, and
    a study of SGD runs must not be pulled toward the Adam family's sqrt). None where no U is seen."""
    grid = EXPONENT_GRID if prior_exponent == PRIOR_EXPONENT else EXPONENT_GRID + (prior_exponent - PRIOR_EXPONENT)
    n, p = len(y), fixed.shape[1] + 2
    if not bend:
        measured = None
    bends = _bends(batches, measured)
    if not bend or (measured is None and len(batches) < 3):
        bends = bends[:1]  # two batch sizes show no bend (see _shows_a_bend): the power law alone
    q = column_basis(fixed)
    sses = np.array([profile_sse(fixed, y, ln_lr, regime_coordinate(batch, b), grid, q) for b, _ in bends])
    if measured is None and len(bends) > 1 and not _shows_a_bend(sses, n, p):
        bends, sses = bends[:1], sses[:1]
    # Noise variance from the best fit, floored so a perfect fit on few points does not claim infinite precision.
    sigma2 = max(float(sses.min()) / max(n - p, 1), 1e-12, 1e-4 * float(np.var(y)) if n > 1 else 1e-12)
    identifiable = len(batches) >= 2
    log_lik = -sses / (2 * sigma2) if identifiable else np.zeros_like(sses)  # one batch size: the priors'
    log_post = (log_lik - (grid - prior_exponent) ** 2 / (2 * PRIOR_SD**2)
                + np.log([w for _, w in bends])[:, None])
    post = np.exp(log_post - log_post.max())
    post /= post.sum()
    a_marginal = post.sum(axis=0)
    a_mean = float(a_marginal @ grid)
    a_sd = float(math.sqrt(max(a_marginal @ (grid - a_mean) ** 2, 0.0)))
    components, kappas = [], []
    for (at, _), row in zip(bends, post, strict=True):
        weight = float(row.sum())
        if weight < 1e-6:
            continue  # a bend the posterior rules out adds nothing but solves
        a = float(row @ grid) / weight
        x = ln_lr - a * regime_coordinate(batch, at)
        coef, *_ = np.linalg.lstsq(np.column_stack([fixed, x, x * x]), y, rcond=None)
        kappa, beta = float(coef[-1]), float(coef[-2])
        if kappa <= 0:
            continue  # no U along this curve: the best LR lies outside what was tried
        components.append((weight, a, -beta / (2 * kappa), at))
        kappas.append(kappa)
    if not components:
        return None
    total = math.fsum(w for w, *_ in components)
    components = [(w / total, a, c, b) for w, a, c, b in components]
    bent = [(w, b) for w, _, _, b in components if b is not None]
    bend_weight = math.fsum(w for w, _ in bent)
    mean_bend = math.exp(math.fsum(w * math.log(b) for w, b in bent) / bend_weight) if bend_weight > 0 else None
    return ScalingFit(
        exponent=a_mean, exponent_sd=a_sd,
        log_c=math.fsum(w * c for w, _, c, _ in components),
        curvature=math.fsum(w * k for (w, *_), k in zip(components, kappas, strict=True)),
        n_runs=n, batch_sizes=tuple(batches),
        data_weight=1.0 - min(1.0, (a_sd / PRIOR_SD) ** 2) if identifiable else 0.0,
        components=tuple(components), bend=mean_bend, bend_weight=bend_weight, measured_bend=measured,
        prior_exponent=prior_exponent)
