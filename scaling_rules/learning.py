"""Learning the LR-vs-batch scaling curve from past runs (issue #7), in pure Python + numpy.

The papers give one rule: the best LR grows as ``B^(1/2)`` (LAMB section 4.3) until a cap near
1/L (LANS section 3.3). Real models deviate on both counts, and the study store holds the evidence.

The model. Around its optimum a run's final metric is close to quadratic in log LR (the usual
"U-shaped" LR sweep); the optimum moves with the batch as a power law:

    metric(B, lr) = m_B + kappa * (ln lr - ln c - a * ln B)^2          (minimise)

``m_B`` is a free level per batch size (larger batches may end a little worse: that must not bias
``a``); ``kappa`` (curvature) and ``c`` are shared. For a fixed exponent ``a`` this is *linear* in
(m_B, kappa, beta = -2 kappa ln c) with x = ln lr - a ln B, so each ``a`` on a grid is one least
squares solve; the exponent's posterior combines that profile likelihood with a normal prior
N(1/2, 0.15^2) centred on the paper's rule. Thin evidence leaves the prior in charge (shrinkage);
the posterior standard deviation is the uncertainty.

Stability. An LR that diverged at batch B diverges at every larger batch too (the stable region
grows more slowly than the sqrt line: the "cliff" of LANS Fig. 1), so the recommendation stays
below ``DIVERGENCE_MARGIN`` x the smallest LR that diverged at that batch size or a smaller one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict

from . import priors
from .evidence import Direction, Outcome

__all__ = ["EvidenceModel", "RunEvidence", "ScalingFit", "explore_lrs"]

PRIOR_EXPONENT = 0.5  # LAMB section 4.3: sqrt scaling.
PRIOR_SD = 0.15  # covers linear-ish (0.8) to flat (0.2) at 2 sd: what LR sweeps in the literature show.
EXPONENT_GRID = np.linspace(-0.25, 1.25, 601)
MIN_CURVATURE_RUNS = 3  # a U needs three LRs


class RunEvidence(BaseModel):
    """One past run, as the recommender sees it."""

    model_config = ConfigDict(extra="ignore")

    batch_size: int
    lr: float
    outcome: Outcome
    metric: float | None = None
    warmup_ratio: float | None = None
    optimizer: str | None = None
    model_params: int | None = None
    run_id: int | None = None
    study: str | None = None


@dataclass(frozen=True)
class ScalingFit:
    """The fitted curve ln lr*(B) = log_c + exponent * ln B."""

    exponent: float
    exponent_sd: float
    log_c: float
    curvature: float
    n_runs: int
    batch_sizes: tuple[int, ...]
    data_weight: float  # 0 = prior only, 1 = data only (how far the posterior moved off the prior)

    def optimum(self, batch_size: int) -> float:
        return math.exp(self.log_c + self.exponent * math.log(batch_size))


@dataclass
class EvidenceModel:
    runs: list[RunEvidence]
    direction: Direction = "minimize"
    fit: ScalingFit | None = None
    conflicts: list[str] = field(default_factory=list)

    @classmethod
    def from_runs(cls, runs: Iterable[RunEvidence | dict], *, direction: Direction = "minimize") -> EvidenceModel:
        parsed = [r if isinstance(r, RunEvidence) else RunEvidence.model_validate(r) for r in runs]
        # Deterministic: the same evidence in any order gives the same recipe.
        parsed.sort(key=lambda r: (r.batch_size, r.lr, r.outcome, r.metric if r.metric is not None else 0.0,
                                   r.run_id or 0))
        model = cls(runs=parsed, direction=direction)
        model.fit = model._fit()
        model.conflicts = model._find_conflicts()
        return model

    # ----- the scaling curve -----

    def _usable(self) -> list[RunEvidence]:
        return [r for r in self.runs if r.outcome == "completed" and r.metric is not None
                and math.isfinite(r.metric) and r.lr > 0 and r.batch_size > 0]

    def _fit(self) -> ScalingFit | None:
        runs = self._usable()
        by_batch: dict[int, list[RunEvidence]] = {}
        for r in runs:
            by_batch.setdefault(r.batch_size, []).append(r)
        # A batch size with one run only fixes its own level m_B: it says nothing about a or c.
        informative = {b: rs for b, rs in by_batch.items() if len({x.lr for x in rs}) >= 2}
        n_lr_total = sum(len({x.lr for x in rs}) for rs in informative.values())
        if not informative or n_lr_total < MIN_CURVATURE_RUNS:
            return None
        rows = [r for rs in informative.values() for r in rs]
        batches = sorted(informative)
        sign = 1.0 if self.direction == "minimize" else -1.0
        y = np.array([sign * r.metric for r in rows])  # type: ignore[operator]
        ln_lr = np.log([r.lr for r in rows])
        ln_b = np.log([r.batch_size for r in rows])
        onehot = np.array([[1.0 if r.batch_size == b else 0.0 for b in batches] for r in rows])
        n, p = len(rows), len(batches) + 2

        def solve(a: float) -> tuple[float, np.ndarray]:
            x = ln_lr - a * ln_b
            design = np.column_stack([onehot, x, x * x])
            coef, *_ = np.linalg.lstsq(design, y, rcond=None)
            resid = y - design @ coef
            return float(resid @ resid), coef

        sse = np.array([solve(float(a))[0] for a in EXPONENT_GRID])
        dof = max(n - p, 1)
        # Noise variance from the best fit, floored so a perfect fit on few points does not claim
        # infinite precision.
        sigma2 = max(float(sse.min()) / dof, 1e-12, 1e-4 * float(np.var(y)) if n > 1 else 1e-12)
        log_lik = -sse / (2 * sigma2)
        identifiable = len(batches) >= 2
        if not identifiable:
            log_lik = np.zeros_like(log_lik)  # one batch size: the exponent is the prior's
        log_post = log_lik - (EXPONENT_GRID - PRIOR_EXPONENT) ** 2 / (2 * PRIOR_SD**2)
        w = np.exp(log_post - log_post.max())
        w /= w.sum()
        a_mean = float(w @ EXPONENT_GRID)
        a_sd = float(math.sqrt(max(w @ (EXPONENT_GRID - a_mean) ** 2, 0.0)))
        _, coef = solve(a_mean)
        kappa, beta = float(coef[-1]), float(coef[-2])
        if kappa <= 0:
            return None  # no U shape: the best LR lies outside what was tried
        log_c = -beta / (2 * kappa)
        data_weight = 1.0 - min(1.0, (a_sd / PRIOR_SD) ** 2) if identifiable else 0.0
        return ScalingFit(exponent=a_mean, exponent_sd=a_sd, log_c=log_c, curvature=kappa, n_runs=n,
                          batch_sizes=tuple(batches), data_weight=data_weight)

    # ----- stability -----

    def min_diverged_at_or_below(self, batch_size: int) -> RunEvidence | None:
        div = [r for r in self.runs if r.outcome == "diverged" and r.batch_size <= batch_size]
        return min(div, key=lambda r: (r.lr, r.batch_size)) if div else None

    def stable_cap(self, batch_size: int) -> float | None:
        worst = self.min_diverged_at_or_below(batch_size)
        return None if worst is None else priors.DIVERGENCE_MARGIN * worst.lr

    def max_stable_at_or_below(self, batch_size: int) -> float | None:
        ok = [r.lr for r in self.runs if r.outcome == "completed" and r.batch_size <= batch_size]
        return max(ok) if ok else None

    def best_run(self, batch_size: int) -> RunEvidence | None:
        sign = 1.0 if self.direction == "minimize" else -1.0
        runs = [r for r in self._usable() if r.batch_size == batch_size]
        return min(runs, key=lambda r: sign * r.metric) if runs else None  # type: ignore[operator]

    def nearest_measured_batch(self, batch_size: int) -> int | None:
        """The batch size closest (in log) to ``batch_size`` with at least one completed run."""
        batches = sorted({r.batch_size for r in self._usable()})
        if not batches:
            return None
        return min(batches, key=lambda b: (abs(math.log(b / batch_size)), b))

    def _find_conflicts(self) -> list[str]:
        out = []
        for r in self.runs:
            if r.outcome != "completed":
                continue
            worst = self.min_diverged_at_or_below(r.batch_size)
            if worst is not None and r.lr >= worst.lr:
                out.append(
                    f"run {r.run_id if r.run_id is not None else '?'} completed at LR {r.lr:.4g} (batch "
                    f"{r.batch_size}) although LR {worst.lr:.4g} diverged at batch {worst.batch_size}: "
                    "divergence may have been noise (the cap still honours it)"
                )
        if self.fit is not None and abs(self.fit.exponent - PRIOR_EXPONENT) > 3 * max(self.fit.exponent_sd, 1e-9):
            out.append(f"the fitted LR-vs-batch exponent {self.fit.exponent:.3f} +- {self.fit.exponent_sd:.3f} "
                       "contradicts the sqrt rule (0.5) of the papers")
        return out

    def run_ids(self) -> list[int]:
        return sorted(r.run_id for r in self.runs if r.run_id is not None)


def explore_lrs(lr: float, k: int, *, spread: float = 2.0, cap: float | None = None) -> list[float]:
    """k LRs spread geometrically around ``lr`` over [lr/spread, lr*spread], below ``cap``.

    A deterministic sweep (the service uses Optuna's sampler instead); used by the simulation tests
    and the scaling-fidelity benchmark.
    """
    if k <= 0:
        return []
    if k == 1:
        lrs = [lr]
    else:
        lrs = [lr * spread ** (-1 + 2 * i / (k - 1)) for i in range(k)]
    if cap is not None:
        lrs = [min(x, cap * (0.98 ** j)) for j, x in enumerate(lrs)]
    return lrs
