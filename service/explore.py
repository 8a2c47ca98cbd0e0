"""``"explore": k``: k variants of a recipe for a team that wants to run a small LR sweep (issue #7).

The LRs come from Optuna's TPE sampler, asked with the batch size fixed (``PartialFixedSampler``)
and fed the study's finished runs as its history, so a sweep concentrates where earlier runs did
well and stays out of where they diverged. The search range is a factor of 2 either side of the
recipe's LR, never above an LR cap the user gave, nor at or above the evidence's stability cap. The
sampler is seeded from the study, the recipe and the amount of evidence: the same request against
the same evidence gives the same variants.
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
from largebatch.scaling_rules.models import Recipe, RecommendationRequest

__all__ = ["SPREAD", "explore_variants", "user_cap_factor"]

SPREAD = 2.0
_BATCH = IntDistribution(1, 2**40, log=True)


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


def explore_variants(recipe: Recipe, evidence: Sequence[RunEvidence], k: int, *, study: str | None = None,
                     direction: str = "minimize", max_factor: float | None = None,
                     model: EvidenceModel | None = None) -> list[Recipe]:
    """k recipes that differ from ``recipe`` only in their peak LRs (all stages scaled alike), never
    by more than ``max_factor`` upwards (see :func:`user_cap_factor`)."""
    if k <= 0:
        return []
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
    lr_dist = FloatDistribution(low, high, log=True)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = PartialFixedSampler({"batch_size": batch},
                                      TPESampler(seed=seed, n_startup_trials=5))
    sweep = optuna.create_study(direction=direction, sampler=sampler)
    finished = [r for r in evidence if r.outcome in ("completed", "diverged") and low <= r.lr <= high]
    worst = [r.metric for r in finished if r.metric is not None and math.isfinite(r.metric)]
    # A divergence is the worst outcome there is: told as a value past the worst completed one.
    penalty = (max(worst) + 1.0 if direction == "minimize" else min(worst) - 1.0) if worst else 1e9
    for r in finished:
        value = r.metric if r.outcome == "completed" and r.metric is not None and math.isfinite(r.metric) else penalty
        sweep.add_trial(create_trial(params={"peak_lr": r.lr, "batch_size": r.batch_size},
                                     distributions={"peak_lr": lr_dist, "batch_size": _BATCH}, value=value))
    variants = []
    for i in range(k):
        trial = sweep.ask({"peak_lr": lr_dist, "batch_size": _BATCH})
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
        variants.append(v)
    return variants
