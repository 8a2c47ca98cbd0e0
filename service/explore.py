"""``"explore": k``: k variants of a recipe for a team that wants to run a small LR sweep.

The LRs come from Optuna's TPE sampler, asked with the batch size fixed (``PartialFixedSampler``)
and fed the study's finished runs as its history, so a sweep concentrates where earlier runs did
well and stays out of where they diverged. The search range is a factor of 2 either side of the
recipe's LR, never above an LR cap the user gave, nor at or above the evidence's stability cap. The
sampler is seeded from the study, the recipe and the amount of evidence: the same request against
the same evidence gives the same variants.

``"explore_warmup": true`` varies the warmup too: TPE samples the LR and a factor of the recipe's
warmup ratio jointly (multivariate TPE: the best LR moves with the warmup), the factor in [1/8, 1].
Shorter only: when the warmups tried do not differ beyond the noise, the evidence model takes the
shortest tried, never a longer one; when they do differ it finds the optimum from shorter warmups
too (a U, extrapolated up to 2x, or the longer end clearly better). Without this nothing ever varies
the warmup (explore varies the LR alone), and the rule's warmup stands for good.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence

import optuna
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.samplers import PartialFixedSampler, TPESampler
from optuna.trial import create_trial

from largebatch.scaling_rules.learning import EvidenceModel, RunEvidence
from largebatch.scaling_rules.models import Recipe, RecommendationRequest, Stage
from largebatch.scaling_rules.recipe import validated

__all__ = ["SHORTEST_WARMUP", "SPREAD", "explore_variants", "user_cap_factor"]

SPREAD = 2.0
SHORTEST_WARMUP = 1 / 8  # of the recipe's warmup ratio: 3 octaves below the rule
_BATCH = IntDistribution(1, 2**40, log=True)
_WARMUP = FloatDistribution(SHORTEST_WARMUP, 1.0, log=True)


def _seed(study: str | None, recipe: Recipe, n_evidence: int) -> int:
    blob = f"{study}|{recipe.fingerprint()}|{n_evidence}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big")


def user_cap_factor(request: RecommendationRequest, recipe: Recipe) -> float | None:
    """How far the recipe's LRs may be scaled up before one passes an ``lr_cap`` the user gave (the
    request's, or a stage's): the user knows that LR to be the largest stable one."""
    stage_requests = request.stages or [None] * len(recipe.stages)
    factors = []
    for stage, asked in zip(recipe.stages, stage_requests, strict=True):
        cap = asked.lr_cap if asked is not None and asked.lr_cap is not None else request.lr_cap
        if cap is not None and stage.peak_lr > 0:
            factors.append(cap / stage.peak_lr)
    return min(factors) if factors else None


def _warmup_factor(run: RunEvidence, ratio: float) -> float:
    """A past run's warmup as a factor of the recipe's ``ratio``, clamped into the explored range."""
    if run.warmup_ratio is None:
        # Told as the recipe's own warmup rather than left out of that dimension: multivariate TPE samples
        # jointly only the parameters every trial has, so one such trial would make TPE model the LR and
        # the warmup apart for the whole sweep. The store records every run's warmup: this is a run from
        # elsewhere, most likely trained with the rule's warmup (before explore_warmup only a recipe the
        # user wrote varied it).
        return 1.0
    return min(max(run.warmup_ratio / ratio, SHORTEST_WARMUP), 1.0)


def _with_warmup(stage: Stage, factor: float) -> Stage:
    """``stage`` with its warmup ratio x ``factor`` (<= 1); a stage without a warmup (a batch ramp's,
    which continues the previous stage's schedule) keeps none (0 x factor)."""
    ratio = round(stage.warmup_ratio * factor, 12)
    warmup = math.floor(ratio * stage.steps + 1e-9)  # the engine's rounding (scaling_rules._phases)
    if stage.warmup_steps >= 1:
        warmup = max(warmup, 1)  # a large batch's first step never at the peak LR, as in the recipe
    freed = stage.warmup_steps - warmup
    const, decay, const_ratio = stage.const_steps, stage.decay_steps + freed, stage.const_ratio
    if stage.decay_steps == 0:
        # No decay: the next stage ramps the batch up and carries this schedule on from the peak, so the
        # steps the warmup gives back hold the peak too (a decay here would drop the LR mid-schedule).
        const, decay = const + freed, 0
        const_ratio = round(stage.const_ratio + stage.warmup_ratio - ratio, 12)
    return validated(Stage, **{**stage.model_dump(), "warmup_steps": warmup, "const_steps": const,
                               "decay_steps": decay, "warmup_ratio": ratio, "const_ratio": const_ratio})


def explore_variants(recipe: Recipe, evidence: Sequence[RunEvidence], k: int, *, study: str | None = None,
                     direction: str = "minimize", max_factor: float | None = None,
                     model: EvidenceModel | None = None, explore_warmup: bool = False) -> list[Recipe]:
    """k recipes that differ from ``recipe`` only in their peak LRs (all stages scaled alike), never
    by more than ``max_factor`` upwards (see :func:`user_cap_factor`); with ``explore_warmup`` in
    their warmups too (every stage that has one shortened alike, see the module docstring)."""
    if k <= 0:
        return []
    # The first stage's warmup is the one a run records (the store's run parameters), hence the one the
    # history's factors are relative to; a recipe without one has none to vary.
    ratio = recipe.stages[0].warmup_ratio
    explore_warmup = explore_warmup and ratio > 0
    batch = max(s.batch_size for s in recipe.stages)
    base = max(s.peak_lr for s in recipe.stages)
    if model is None:
        model = EvidenceModel.from_runs(evidence, direction=direction)  # type: ignore[arg-type]
    seed = _seed(study, recipe, len(evidence))
    # Only runs in the recipe's LR units (the engine's road): an AdamW LR says nothing about LAMB's.
    model = model.in_units_of(recipe.optimizer.name, recipe.optimizer.name)
    evidence = model.runs
    low, high = base / SPREAD, base * SPREAD
    if max_factor is not None and base * max_factor < high:
        high = base * max(max_factor, 1.0)
        low = min(low, high / SPREAD)
    cap = model.stable_cap(batch)
    if cap is not None and high >= cap:
        high = cap * (1 - 1e-9)
        low = min(low, high / SPREAD)
    space = {"peak_lr": FloatDistribution(low, high, log=True), "batch_size": _BATCH}
    if explore_warmup:
        space["warmup_factor"] = _WARMUP

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = PartialFixedSampler({"batch_size": batch},
                                      TPESampler(seed=seed, n_startup_trials=5, multivariate=explore_warmup))
    sweep = optuna.create_study(direction=direction, sampler=sampler)
    finished = [r for r in evidence if r.outcome in ("completed", "diverged") and low <= r.lr <= high]
    worst = [r.metric for r in finished if r.metric is not None and math.isfinite(r.metric)]
    # A divergence is the worst outcome there is: told as a value past the worst completed one.
    penalty = (max(worst) + 1.0 if direction == "minimize" else min(worst) - 1.0) if worst else 1e9
    for r in finished:
        value = r.metric if r.outcome == "completed" and r.metric is not None and math.isfinite(r.metric) else penalty
        params = {"peak_lr": r.lr, "batch_size": r.batch_size}
        if explore_warmup:
            params["warmup_factor"] = _warmup_factor(r, ratio)
        sweep.add_trial(create_trial(params=params, distributions=space, value=value))
    variants = []
    for i in range(k):
        trial = sweep.ask(space)
        factor = trial.params["peak_lr"] / base
        v = recipe.model_copy(deep=True)
        for s in v.stages:
            s.peak_lr = s.peak_lr * factor
            s.end_lr = min(s.end_lr, s.peak_lr)
        v.optimizer.lr = v.stages[0].peak_lr
        v.rationale.append(
            f"explore variant {i + 1}/{k}: peak LR x {factor:.3f} = {v.stages[0].peak_lr:.6g} (Optuna TPE at batch "
            f"{batch}, range [{low:.4g}, {high:.4g}], {len(finished)} past run(s) as its history)"
        )
        if explore_warmup:
            shorter = trial.params["warmup_factor"]
            v.stages = [_with_warmup(s, shorter) for s in v.stages]
            first = v.stages[0]
            v.rationale.append(
                f"explore variant {i + 1}/{k}: warmup x {shorter:.3f} = {first.warmup_ratio:.4g} of the stage "
                f"({first.warmup_steps} steps; the recipe's {ratio:.4g}), sampled by TPE with the LR, range "
                f"[{SHORTEST_WARMUP:.4g}, 1] x the recipe's: shorter only"
            )
        variants.append(v)
    return variants
