"""Learning the LR-vs-batch scaling curve from past runs (issue #7), in pure Python + numpy.

The papers give one rule: the best LR grows as ``B^(1/2)`` (LAMB section 4.3) until a cap near
1/L (LANS section 3.3). Real models deviate on both counts, and the study store holds the evidence.

The model. Around its optimum a run's final metric is close to quadratic in log LR (the usual
"U-shaped" LR sweep); the optimum moves with the batch along the regime curve the rule uses, a power
law well below the critical batch that bends flat beyond it (:mod:`._curve`):

    metric(B, lr) = m_B + kappa * (ln lr - ln c - a * h_N(B))^2          (minimise)
    h_N(B) = ln B - ln(1 + B/N)                                           (ln B with no bend)

``m_B`` is a free level per batch size (larger batches may end a little worse: that must not bias
``a``); ``kappa`` (curvature) and ``c`` are shared. For a fixed (a, N) this is *linear* in
(m_B, kappa, beta = -2 kappa ln c) with x = ln lr - a h_N(B), so each point of a grid is one least
squares solve; the exponent's prior is N(1/2, 0.15^2), centred on the paper's rule, and the bend's is
centred on a measured critical batch where one is known, else half "no bend" and half spread over the
batches near the runs. Thin evidence leaves the priors in charge (shrinkage); the posterior standard
deviation is the uncertainty.

The warmup (issue #11). The same model with a second quadratic term, in the log warmup ratio:

    metric = m_B + kappa (x - x0)^2 + kappa_w (ln r - ln c_w - w ln B)^2

The papers' rule is linear-epoch warmup (LAMB Table 4: constant warmup steps at fixed epochs, so the
ratio grows as B), so the prior on ``w`` is N(1, 0.35^2) and, as for ``a``, the posterior over a
grid is the profile likelihood times that prior. Runs must vary the warmup at one batch size at
least (else the warmup is confounded with the level m_B and nothing is fitted); the optimum is kept
within a factor 2 of the warmups tried (a quadratic extrapolated further says nothing), and with no
U at all (the metric only falls towards one end) it is the better end, if clearly better. When the
warmup terms explain nothing beyond the noise (an F-test against the fit without them, at 5%), or the
two ends tie, the answer is the shortest warmup tried, in the prior's coordinates: every warmup tried
was enough, and on a short run a longer one costs loss (0.4% on the fidelity benchmark's MLP at 64x:
0.32 of a 200-step run against 0.02).

Stability. An LR that diverged at batch B diverges at every larger batch too (the stable region
grows more slowly than the sqrt line: the "cliff" of LANS Fig. 1), so the recommendation stays
below ``DIVERGENCE_MARGIN`` x the smallest LR that diverged at that batch size or a smaller one.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from . import optimizers, priors, stats
from ._curve import MIN_CURVATURE_RUNS, ScalingFit, fit_curve, profile_sse, standardised
from .evidence import Direction, Outcome
from .models import MAX_LR, MIN_LR

__all__ = ["EvidenceModel", "RunEvidence", "ScalingFit", "WarmupFit", "explore_lrs"]

MAX_BEND_FITS = 16  # fits kept per model, one per critical batch a request brought
# The warmup exponent's prior is the optimizer's rule (priors.warmup_power: linear-epoch 1, LAMB Table 4 and
# You et al. 2019 "LEGW"; constant epochs or samples 0). 2 sd around linear-epoch reaches 0.3 (close to a
# fixed warmup ratio) and 1.7: tuned warmups in the literature sit in there.
WARMUP_PRIOR_SD = 0.35
WARMUP_EXPONENT_GRID = np.linspace(-0.5, 2.5, 301)  # around linear-epoch's 1; moved with another rule
WARMUP_EXTRAPOLATION = math.log(2.0)  # the fitted optimum stays within 2x of the warmups tried
WARMUP_EFFECT_ALPHA = 0.05  # the F-test level below which the warmups tried differ beyond the noise


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
class WarmupFit:
    """The fitted warmup curve ln ratio*(B) = log_c + exponent * ln B + rest(B), limited to what was tried;
    rest(B) is the part of the optimizer's warmup rule that is no power of the batch (LARS's 1 + B/B_w; 0
    for the others)."""

    exponent: float
    exponent_sd: float
    log_c: float
    curvature: float
    n_runs: int
    batch_sizes: tuple[int, ...]  # the batch sizes whose runs varied the warmup
    data_weight: float
    u_range: tuple[float, float]  # ln ratio - exponent ln B over the runs: where the fit has data
    run_ids: tuple[int, ...] = ()
    # No warmup tried did better than another beyond the noise: ``log_c`` is the shortest tried, an
    # upper bound of what the warmup needs, not an optimum (the rule's own ratio wins when shorter).
    flat: bool = False
    effect_p: float | None = None  # the F-test's p-value for any warmup effect at all
    rule: str = "linear-epoch"  # the optimizer's warmup rule: the exponent's prior and rest(B)

    def ratio(self, batch_size: int) -> float:
        u = self.log_c
        lo, hi = self.u_range
        u = min(max(u, lo - WARMUP_EXTRAPOLATION), hi + WARMUP_EXTRAPOLATION)
        # a ratio of the steps: <= 1
        return math.exp(min(u + self.exponent * math.log(batch_size) + _warmup_rest(self.rule, batch_size), 0.0))


def _warmup_rest(rule: str, batch: float) -> float:
    """ln of the warmup rule's growth beyond its power of the batch (0.0 exactly for a pure power)."""
    return math.log(priors.warmup_growth(rule, batch)) - priors.warmup_power(rule) * math.log(batch)


@dataclass
class EvidenceModel:
    runs: list[RunEvidence]
    direction: Direction = "minimize"
    fit: ScalingFit | None = None
    conflicts: list[str] = field(default_factory=list)
    warmup_fit: WarmupFit | None = None
    rule: str = "sqrt"  # the LR rule whose exponent centres the fitted exponent's prior
    warmup_rule: str = "linear-epoch"  # the warmup rule that is the warmup curve's prior (priors.warmup_growth)
    # in_units_of's sub-models and better_elsewhere's lines, once per model (the service keeps a
    # study's fitted model for every request until its evidence changes)
    _memo: dict[tuple[str, str, str], Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_runs(cls, runs: Iterable[RunEvidence | dict], *, direction: Direction = "minimize",
                  rule: str | None = None, warmup_rule: str | None = None) -> EvidenceModel:
        """The fitted model of ``runs``. ``rule`` ("sqrt", "linear") centres the LR exponent's prior and
        ``warmup_rule`` (the optimizer table's) is the warmup curve's; by default the rules the runs'
        optimizers share (SGD and LARS linear, the Adam family sqrt; LAMB and LANS linear-epoch, AdamW
        constant samples, ...), else sqrt and linear-epoch."""
        parsed = [r if isinstance(r, RunEvidence) else RunEvidence.model_validate(r) for r in runs]
        # Deterministic: the same evidence in any order gives the same recipe.
        parsed.sort(key=lambda r: (r.batch_size, r.lr, r.outcome, r.metric if r.metric is not None else 0.0,
                                   r.run_id or 0))
        rows = [optimizers.OPTIMIZERS[r.optimizer] for r in parsed if r.optimizer in optimizers.OPTIMIZERS]
        if rule is None:
            rules = {row.lr_rule for row in rows}
            rule = rules.pop() if len(rules) == 1 else "sqrt"
        if warmup_rule is None:
            warmups = {row.warmup_rule for row in rows}
            warmup_rule = warmups.pop() if len(warmups) == 1 else "linear-epoch"
        optimizers.rule_exponent(rule)  # a ValueError naming an unknown rule, before any fit
        model = cls(runs=parsed, direction=direction, rule=rule, warmup_rule=warmup_rule)
        model.fit = model._fit(bend=False)
        model.warmup_fit = model._fit_warmup()
        model.conflicts = model._find_conflicts()
        return model

    @property
    def exponent_prior(self) -> float:
        """The rule's exponent (:data:`.optimizers.RULE_EXPONENTS`): 1 linear, 1/2 sqrt."""
        return optimizers.rule_exponent(self.rule)

    # ----- optimizers -----

    def in_units_of(self, optimizer: str, unnamed: str, rule: str | None = None) -> EvidenceModel:
        """The model of the runs whose LRs are in ``optimizer``'s units (a run that names no optimizer
        counts as ``unnamed``'s, the reference's; one that names an optimizer the table does not know is
        left out), its priors ``optimizer``'s rules (its LR rule unless ``rule`` is given; its warmup
        rule). A study that changed optimizer (the engine's own recipes switch AdamW to LAMB past 16K)
        holds LRs of two units, several times apart: one curve through both would read the change of
        units as an effect of the batch or the LR. ``self`` where every run is in those units and the
        rules are its own."""
        row = optimizers.OPTIMIZERS.get(optimizer)
        rule = rule or (row.lr_rule if row is not None else "sqrt")
        warmup = row.warmup_rule if row is not None else self.warmup_rule
        key = ("units", optimizers.units_of(optimizer), f"{optimizers.units_of(unnamed)} {rule} {warmup}")
        if key not in self._memo:
            mine = [r for r in self.runs if optimizers.run_units(r.optimizer, unnamed) == key[1]]
            own = len(mine) == len(self.runs) and (rule, warmup) == (self.rule, self.warmup_rule)
            self._memo[key] = self if own else \
                EvidenceModel.from_runs(mine, direction=self.direction, rule=rule, warmup_rule=warmup)
        return self._memo[key]

    def better_elsewhere(self, optimizer: str, unnamed: str) -> list[str]:
        """Where another optimizer's runs beat ``optimizer``'s: at the largest batch size where both were
        tried at two LRs or more (a best of a sweep on each side, not one shot), one line per optimizer
        whose best run there has the better metric."""
        key = ("better", optimizer, unnamed)
        if key not in self._memo:
            self._memo[key] = self._better_elsewhere(optimizer, unnamed)
        return self._memo[key]

    def _better_elsewhere(self, optimizer: str, unnamed: str) -> list[str]:
        units = optimizers.units_of(optimizer)
        sign = 1.0 if self.direction == "minimize" else -1.0
        by_opt: dict[str, dict[int, list[RunEvidence]]] = {}
        for r in self._usable():
            name = r.optimizer or unnamed
            if optimizers.units_of(name) != "?":
                by_opt.setdefault(name, {}).setdefault(r.batch_size, []).append(r)

        def swept(runs: dict[int, list[RunEvidence]]) -> set[int]:
            return {b for b, rs in runs.items() if len({r.lr for r in rs}) >= 2}

        own: dict[int, list[RunEvidence]] = {}  # (LAMB's and LANS's runs together: the same LRs)
        for name, runs in by_opt.items():
            if optimizers.units_of(name) == units:
                for b, rs in runs.items():
                    own.setdefault(b, []).extend(rs)
        lines = []
        for name, runs in sorted(by_opt.items()):
            if optimizers.units_of(name) == units:
                continue
            both = swept(runs) & swept(own)
            if not both:
                continue
            b = max(both)
            theirs = min(runs[b], key=lambda r: sign * r.metric)  # type: ignore[operator]
            ours = min(own[b], key=lambda r: sign * r.metric)  # type: ignore[operator]
            if sign * theirs.metric < sign * ours.metric:  # type: ignore[operator]
                lines.append(
                    f"evidence: at batch {b} the study's best {name} run (LR {theirs.lr:.4g}, of {len(runs[b])}) "
                    f"reached {theirs.metric:.6g}, better than the best {optimizer} run (LR {ours.lr:.4g}, of "
                    f"{len(own[b])}) at {ours.metric:.6g}; the recipe keeps {optimizer}: set \"optimizer\": "
                    f"\"{name}\" to follow that evidence (its LR then comes from its own runs)")
        return lines

    # ----- the scaling curve -----

    def _usable(self) -> list[RunEvidence]:
        return [r for r in self.runs if r.outcome == "completed" and r.metric is not None
                and math.isfinite(r.metric) and r.lr > 0 and r.batch_size > 0]

    def fit_for(self, noise: float | None) -> ScalingFit | None:
        """The curve with its bend centred on the critical batch ``noise`` (in the runs' batch units), as
        the rule bends at it; :attr:`fit`, the power law, where no critical batch is known."""
        if noise is None or not math.isfinite(noise) or noise <= 0:
            return self.fit
        key = ("bend", f"{noise:.6g}", "")
        if key not in self._memo:
            # A request names its own noise_scale: the service's cached model keeps only the latest few.
            bends = [k for k in self._memo if k[0] == "bend"]
            for old in bends[:max(len(bends) - MAX_BEND_FITS + 1, 0)]:
                del self._memo[old]
            self._memo[key] = self._fit(noise)
        return self._memo[key]

    def shown_bend(self) -> ScalingFit | None:
        """The curve with a bend fitted from the runs alone, where they show one beyond their noise (an
        F-test at 5%, three batch sizes or more), else None. Reported, not used: on the fidelity
        benchmark's LM the test fired on LAMB's optima at 1x, 4x, 16x (a quadratic U read on asymmetric
        sweeps bends the centres) and the bent curve's 64x LR (0.030) lost to the power law's (0.0435,
        the oracle there); only a measured critical batch moves the recipe's curve (:meth:`fit_for`)."""
        key = ("shown bend", "", "")
        if key not in self._memo:
            fit = self._fit(None, bend=True) if self.fit is not None and len(self.fit.batch_sizes) >= 3 else None
            self._memo[key] = fit if fit is not None and fit.bend_weight > 0.5 else None
        return self._memo[key]

    def _fit(self, noise: float | None = None, *, bend: bool = True) -> ScalingFit | None:
        """The fitted curve, or None (the rule stays in charge) when the evidence shows no U shape, or
        holds numbers no fit can use: whatever a store holds (a metric of 1e155 written by any Optuna
        client), this degrades to the rule and never raises."""
        try:
            with np.errstate(all="ignore"):
                fit = self._fit_unchecked(noise, bend)
        except (ArithmeticError, ValueError, np.linalg.LinAlgError):
            return None
        if fit is None:
            return None
        numbers = (fit.exponent, fit.exponent_sd, fit.log_c, fit.curvature, fit.data_weight,
                   *(x for comp in fit.components for x in comp if x is not None))
        if not all(math.isfinite(x) for x in numbers):
            return None
        # An optimum outside the LRs anyone trains with, at a batch size that was measured, is no fit.
        if not all(MIN_LR <= math.exp(min(fit.log_optimum(b), 700.0)) <= MAX_LR for b in fit.batch_sizes):
            return None
        return fit

    def _fit_unchecked(self, noise: float | None, bend: bool) -> ScalingFit | None:
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
        y = standardised(np.array([sign * r.metric for r in rows]))  # type: ignore[operator]
        batch = np.array([float(r.batch_size) for r in rows])
        fixed = np.array([[1.0 if r.batch_size == b else 0.0 for b in batches] for r in rows])
        # Runs that also varied the warmup: its U (at the rule's exponent) joins the design, so a
        # warmup effect is not read as an LR effect.
        if all(r.warmup_ratio is not None and r.warmup_ratio > 0 for r in rows) and any(
                len({x.warmup_ratio for x in rs}) >= 2 for rs in informative.values()):
            u = (np.log([r.warmup_ratio for r in rows]) - priors.warmup_power(self.warmup_rule) * np.log(batch)  # type: ignore[misc]
                 - np.array([_warmup_rest(self.warmup_rule, b) for b in batch]))
            fixed = np.column_stack([fixed, u, u * u])
        return fit_curve(batch, np.log([r.lr for r in rows]), y, fixed, batches, noise, bend=bend,
                         prior_exponent=self.exponent_prior)

    # ----- the warmup -----

    def warmup_ratio_at(self, batch_size: int) -> float | None:
        """The warmup ratio the study's runs say is best at ``batch_size``, or ``None`` when they
        never varied the warmup at one batch size (then the rule's linear-epoch warmup stands)."""
        return None if self.warmup_fit is None else self.warmup_fit.ratio(batch_size)

    def _fit_warmup(self) -> WarmupFit | None:
        """Like :meth:`_fit`: None rather than an exception or a non-finite fit."""
        try:
            with np.errstate(all="ignore"):
                fit = self._fit_warmup_unchecked()
        except (ArithmeticError, ValueError, np.linalg.LinAlgError):
            return None
        if fit is None:
            return None
        numbers = (fit.exponent, fit.exponent_sd, fit.log_c, fit.curvature, fit.data_weight, *fit.u_range)
        return fit if all(math.isfinite(x) for x in numbers) else None

    def _fit_warmup_unchecked(self) -> WarmupFit | None:
        runs = [r for r in self._usable() if r.warmup_ratio is not None and r.warmup_ratio > 0]
        by_batch: dict[int, list[RunEvidence]] = {}
        for r in runs:
            by_batch.setdefault(r.batch_size, []).append(r)
        varied = sorted(b for b, rs in by_batch.items() if len({x.warmup_ratio for x in rs}) >= 2)
        if not varied or len({(r.batch_size, r.warmup_ratio) for r in runs}) < MIN_CURVATURE_RUNS:
            return None
        batches = sorted(by_batch)
        sign = 1.0 if self.direction == "minimize" else -1.0
        y = standardised(np.array([sign * r.metric for r in runs]))  # type: ignore[operator]
        ln_b = np.log([r.batch_size for r in runs])
        # the rule's growth that is no power of the batch comes off first (0.0 for a pure power)
        ln_r = np.log([r.warmup_ratio for r in runs]) - np.array(  # type: ignore[misc]
            [_warmup_rest(self.warmup_rule, r.batch_size) for r in runs])
        prior = priors.warmup_power(self.warmup_rule)
        grid = WARMUP_EXPONENT_GRID if prior == 1.0 else WARMUP_EXPONENT_GRID + (prior - 1.0)
        columns = [np.array([1.0 if r.batch_size == b else 0.0 for r in runs]) for b in batches]
        if self.fit is not None:
            # The LR's own U, along its fitted curve, so LR changes are not read as warmup effects.
            x = np.log([r.lr for r in runs]) - np.array([self.fit.log_optimum(r.batch_size) for r in runs])
            columns += [x, x * x]
        base = np.column_stack(columns)

        def solve(w: float) -> tuple[float, np.ndarray]:
            u = ln_r - w * ln_b
            design = np.column_stack([base, u, u * u])
            coef, *_ = np.linalg.lstsq(design, y, rcond=None)
            resid = y - design @ coef
            return float(resid @ resid), coef

        sse = profile_sse(base, y, ln_r, ln_b, grid)
        n, p = len(runs), base.shape[1] + 2
        sigma2 = max(float(sse.min()) / max(n - p, 1), 1e-12, 1e-4 * float(np.var(y)) if n > 1 else 1e-12)
        # The exponent is identified only by warmup optima at two batch sizes or more.
        identifiable = len(varied) >= 2
        log_lik = -sse / (2 * sigma2) if identifiable else np.zeros_like(sse)
        log_post = log_lik - (grid - prior) ** 2 / (2 * WARMUP_PRIOR_SD**2)
        weights = np.exp(log_post - log_post.max())
        weights /= weights.sum()
        w_mean = float(weights @ grid)
        w_sd = float(math.sqrt(max(weights @ (grid - w_mean) ** 2, 0.0)))
        sse_w, coef = solve(w_mean)
        kappa, beta = float(coef[-1]), float(coef[-2])
        u = ln_r - w_mean * ln_b
        lo, hi = float(u.min()), float(u.max())
        # Did the warmup change the metric beyond the noise? The warmup's two terms against the fit
        # without them (the levels and the LR's U alone), an F-test.
        effect_p = None
        if n > p:
            resid0 = y - base @ np.linalg.lstsq(base, y, rcond=None)[0]
            gain = max(float(resid0 @ resid0) - sse_w, 0.0)
            effect_p = stats.f_sf(gain / 2 / max(sse_w / (n - p), 1e-300), 2, n - p)
        # No effect beyond the noise, or no U and two edges the noise cannot tell apart: every warmup
        # tried was as good as any other, so the shortest tried is enough, grown with the batch as the
        # optimizer's warmup rule grows it (a longer one only delays the training).
        shortest = float(min(x for x, r in zip(u, runs, strict=True) if r.batch_size in varied))
        flat = effect_p is not None and effect_p > WARMUP_EFFECT_ALPHA
        if flat:
            log_c = shortest
        elif kappa > 0:
            log_c = -beta / (2 * kappa)
        else:
            at_lo, at_hi = beta * lo + kappa * lo * lo, beta * hi + kappa * hi * hi
            if abs(at_lo - at_hi) < 2 * math.sqrt(sigma2):
                if effect_p is None:
                    return None  # no degrees of freedom left to judge the noise: the runs say nothing
                flat, log_c = True, shortest
            else:
                log_c = lo if at_lo < at_hi else hi
        return WarmupFit(
            exponent=w_mean, exponent_sd=w_sd, log_c=log_c, curvature=kappa, n_runs=n, flat=flat,
            effect_p=effect_p,
            batch_sizes=tuple(varied),
            data_weight=1.0 - min(1.0, (w_sd / WARMUP_PRIOR_SD) ** 2) if identifiable else 0.0,
            u_range=(lo, hi),
            run_ids=tuple(sorted(r.run_id for r in runs if r.run_id is not None)),
            rule=self.warmup_rule,
        )

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
        # The smallest diverged LR at or below each batch size, as a running minimum over the diverged
        # runs sorted by batch size: each completed run then looks its batch size up (O(n log n)).
        diverged = sorted((r for r in self.runs if r.outcome == "diverged"), key=lambda r: r.batch_size)
        edges = [r.batch_size for r in diverged]
        worst_upto: list[RunEvidence] = []
        for r in diverged:
            worst_upto.append(r if not worst_upto or (r.lr, r.batch_size) < (worst_upto[-1].lr, worst_upto[-1].batch_size)
                              else worst_upto[-1])
        out = []
        for r in self.runs:
            if r.outcome != "completed":
                continue
            i = bisect.bisect_right(edges, r.batch_size)
            worst = worst_upto[i - 1] if i else None
            if worst is not None and r.lr >= worst.lr:
                out.append(
                    f"run {r.run_id if r.run_id is not None else '?'} completed at LR {r.lr:.4g} (batch "
                    f"{r.batch_size}) although LR {worst.lr:.4g} diverged at batch {worst.batch_size}: "
                    "divergence may have been noise (the cap still honours it)"
                )
        if self.fit is not None and abs(self.fit.exponent - self.exponent_prior) > 3 * max(self.fit.exponent_sd, 1e-9):
            out.append(f"the fitted LR-vs-batch exponent {self.fit.exponent:.3f} +- {self.fit.exponent_sd:.3f} "
                       f"contradicts the {self.rule} rule ({self.exponent_prior:g}) of the papers")
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
