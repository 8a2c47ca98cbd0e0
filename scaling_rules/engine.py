"""The recipe engine: a reference setup + a target batch -> a large-batch recipe, with reasons.

Rules (each cites its source; constants live in :mod:`.priors`):

1. LR scaling. sqrt for Adam-family optimizers, LAMB and LANS (LAMB section 4.3, "square root
   LR scaling"); linear for SGD and LARS (Goyal et al. 2017).
2. Linear-epoch warmup (LAMB Tables 4 and 5): the warmup ratio grows with the batch ratio k, so at
   a fixed epoch budget the warmup length in steps stays constant (3125 steps from 512 to 32K).
3. The LR cap (LANS section 3.3): the LR cannot grow past ~1/L. When the scaled LR exceeds the cap,
   use the cap and add a constant phase after warmup (LANS eq. 9) that gives back as much of the
   lost area under the LR curve as a 30% decay tail allows.
4. Optimizer choice from the papers' evidence: AdamW stops scaling at 16K (LAMB Table 8), LARS
   fails on attention models beyond 16K (LAMB Table 2) but suits CNNs, LAMB scales to 32K and to
   64K/32K mixed-batch, LANS beyond that or whenever the cap binds.
5. Multi-stage training: each stage has its own batch, steps, sequence length and reference, and
   re-warms from zero (LAMB section 4.1).
6. Priors keyed by (family, optimizer) (:data:`.priors.PRIORS`, each with its source): no family
   borrows another's cap; where none exists the rationale says so. When the recipe's optimizer
   works in other LR units than the reference's (AdamW -> LAMB, SGD -> LARS), the LR, warmup and
   decay are re-anchored on the new optimizer's prior, never the old LR in new units.
7. Warmup per optimizer: linear-epoch for LAMB/LANS/AdamW (Tables 4, 5), constant-epoch for SGD
   (Goyal et al.: 5 epochs at every batch), the TPU reference's table for LARS.
8. Tokens: with sequence lengths known, batches may be given in tokens; the batch ratio is counted
   in tokens where a batch was given in tokens, and AdamW's limit is then GPT-3's 3.2M tokens.
9. Model size: a reference measured on another size moves by the GPT-3 Table 2.1 size law.
10. Critical batch (McCandlish et al. 2018): with a measured noise scale B_noise, each stage
    predicts the examples ratio (1 + B/B_noise)/(1 + B_ref/B_noise) and its steps ratio; the
    "same-loss" budget scales steps by it; batch_size "auto" picks B near B_noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from . import priors
from ._lr import _plan_lr
from ._phases import _plan_schedule, area_gaps
from ._plan import (
    RecipeError,
    _fmt,
    _Plan,
    _plan_noise,
    _plan_steps,
    _prefix,
    _resolve_batches,
    _stage_requests,
    auto_batch_size,
    examples_ratio,
)
from .evidence import BatchSummary
from .learning import EvidenceModel, RunEvidence
from .models import OptimizerConfig, Recipe, RecommendationRequest

__all__ = ["RecipeError", "area_gaps", "auto_batch_size", "examples_ratio", "recommend"]


def _choose_optimizer(req: RecommendationRequest, plans: list[_Plan]) -> tuple[str, list[str], list[str]]:
    """Returns (name, rationale, warnings), before any cap is known (a binding cap turns LAMB into LANS)."""
    family = req.model.family
    max_batch = max(p.batch for p in plans)
    max_tokens = max((p.tokens or 0) for p in plans)
    token_regime = any(p.req.batch_tokens is not None or p.ref.batch_tokens is not None for p in plans)
    ref_opts = {p.ref.optimizer for p in plans}
    ref_opt = plans[0].ref.optimizer
    mixed = len(plans) > 1
    lamb_limit = priors.LAMB_MAX_BATCH_MIXED if mixed else priors.LAMB_MAX_BATCH
    notes: list[str] = []
    warns: list[str] = []
    adamw_ok = max_batch <= priors.ADAMW_MAX_BATCH or (token_regime and 0 < max_tokens <= priors.ADAMW_MAX_TOKENS)
    if req.optimizer is not None:
        name = req.optimizer
        notes.append(f"optimizer {name}: forced by the request")
        if name == "adamw" and not adamw_ok and max_batch > priors.ADAMW_MAX_BATCH * 2 - 1:
            warns.append(f"AdamW at batch {max_batch}: LAMB Table 8 shows AdamW stops scaling at 16K")
        if name == "lars" and family != "cnn" and max_batch > priors.LARS_MAX_BATCH_ATTENTION:
            warns.append(f"LARS on a {family} at batch {max_batch}: LAMB Table 2 shows LARS fails beyond 16K on BERT")
        if name == "lamb" and max_batch > lamb_limit:
            warns.append(f"LAMB at batch {max_batch}: the LAMB paper scaled to 32K (64K only mixed-batch)")
    elif family == "cnn" and ref_opt in ("sgd", "lars"):
        if max_batch > priors.SGD_MAX_BATCH or ref_opt == "lars":
            name = "lars"
            notes.append("optimizer lars: layer-wise adaptation keeps CNNs accurate beyond 8K "
                         "(LAMB Algorithm 1; Goyal et al.'s linear scaling holds only to 8K)")
        else:
            name = "sgd"
            notes.append("optimizer sgd: linear scaling with warmup holds up to 8K on CNNs (Goyal et al. 2017)")
    elif family != "cnn" and ref_opt in ("adamw", "adam") and adamw_ok:
        name = "adamw"
        if max_batch <= priors.ADAMW_MAX_BATCH:
            notes.append(f"optimizer adamw: batch {max_batch} <= 8K, where AdamW still matches LAMB (LAMB Table 8)")
        else:
            notes.append(f"optimizer adamw: {max_tokens:,} tokens per batch, within GPT-3's AdamW batches "
                         f"(up to {priors.ADAMW_MAX_TOKENS:,} tokens, GPT-3 Table 2.1)")
    elif max_batch > lamb_limit:
        name = "lans"
        notes.append(f"optimizer lans: batch {max_batch} is beyond LAMB's tested range; LANS (Nesterov + per-block "
                     "normalised gradients) trained BERT-Large at 96K/33K (LANS Table 1)")
    elif family == "cnn" and ref_opt in ("lamb", "lans"):
        name = ref_opt
        notes.append(f"optimizer {name}: LAMB trains ResNet-50 to 32K with sqrt LR and linear-epoch warmup, "
                     "untuned (LAMB Table 5)")
    elif family == "transformer":
        name = "lamb"
        notes.append("optimizer lamb: scales BERT to 32K with sqrt LR and linear-epoch warmup (LAMB Table 4) "
                     "where AdamW stops at 16K (Table 8) and LARS fails beyond 16K (Table 2)")
    else:
        name = "lamb"
        notes.append(f"optimizer lamb: the layer-wise Adam that the LAMB paper found robust across models with "
                     f"sqrt LR and linear-epoch warmup (Tables 4, 5); no {family}-specific evidence exists")
    if name in ("lamb", "lans") and ref_opts & {"adam", "adamw"}:
        warns.append("the reference LR was tuned for AdamW; LAMB/LANS LRs are per-layer relative steps and "
                     "usually several times larger (BERT: 1e-4 AdamW vs 6.25e-4 LAMB at 512): the LR is "
                     "re-anchored on LAMB's prior where one exists; check it with \"explore\"")
    if name in ("adamw",) and ref_opts & {"lamb", "lans", "lars"}:
        warns.append("the reference LR was tuned for a layer-wise optimizer; AdamW usually needs a smaller LR")
    if name == "lars" and ref_opts & {"sgd"}:
        warns.append("the reference LR was tuned for SGD; LARS LRs are scaled by its trust coefficient (0.001) "
                     "and are not comparable: the LR is re-anchored on the LARS prior")
    if name == "lars" and max_batch > 65536:
        warns.append(f"batch {max_batch} is beyond what the papers tested (65536 for LARS)")
    return name, notes, warns


def _check_lans_limit(name: str, plans: list[_Plan]) -> list[str]:
    max_batch = max(p.batch for p in plans)
    if name == "lans" and max_batch > priors.LANS_MAX_BATCH:
        return [f"batch {max_batch} is beyond what the papers tested ({priors.LANS_MAX_BATCH} for LANS)"]
    return []


def _optimizer_config(name: str, lr: float, req: RecommendationRequest, plan: _Plan,
                      notes: list[str], warns: list[str]) -> OptimizerConfig:
    ref = plan.ref
    wd = ref.weight_decay
    own = priors.same_units(name, ref.optimizer) or (name in ("lamb", "lans", "adamw")
                                                      and ref.optimizer in ("lamb", "lans", "adamw", "adam"))
    if name in ("lamb", "lans", "adamw"):
        betas = ref.betas if (own and ref.betas is not None) else (0.9, 0.999)
        eps = ref.eps if (own and ref.eps is not None) else (1e-6 if name != "adamw" else 1e-8)
        if own and (ref.betas is not None or ref.eps is not None):
            notes.append(f"betas {betas} and eps {eps:g}: the reference's, passed through")
        if req.adam_hparams == "sde":
            betas, eps = _sde(plan, betas, eps, notes, warns)
        return OptimizerConfig(
            name=name, lr=lr, betas=betas, eps=eps, weight_decay=0.01 if wd is None else wd,
            exclude_from_weight_decay=["bias", "LayerNorm", "layer_norm", "norm"],
        )
    momentum = ref.momentum if (ref.momentum is not None and ref.optimizer in ("sgd", "lars")) else 0.9
    if name == "lars":
        return OptimizerConfig(
            name=name, lr=lr, betas=None, eps=1e-9, weight_decay=5e-5 if wd is None else wd, momentum=momentum,
            trust_coefficient=0.001, exclude_from_weight_decay=["bias", "bn", "BatchNorm", "norm"],
        )
    return OptimizerConfig(
        name="sgd", lr=lr, betas=None, eps=0.0, weight_decay=1e-4 if wd is None else wd, momentum=momentum,
        exclude_from_weight_decay=["bias", "bn", "BatchNorm", "norm"],
    )


def _sde(plan: _Plan, betas: tuple[float, float], eps: float, notes: list[str],
         warns: list[str]) -> tuple[tuple[float, float], float]:
    """Malladi et al. 2022: batch x k -> (1 - beta) x k, eps / sqrt(k); valid for small k only."""
    k = plan.k
    b1, b2 = 1 - k * (1 - betas[0]), 1 - k * (1 - betas[1])
    if k <= 1:
        notes.append("adam_hparams sde: the batch does not grow; betas and eps kept")
        return betas, eps
    if b1 < priors.SDE_MIN_BETA1 or b2 <= 0:
        warns.append(f"adam_hparams sde: at k = {_fmt(k)} the SDE rule gives beta1 = {_fmt(b1)} (< "
                     f"{priors.SDE_MIN_BETA1}), outside its validity (Malladi et al. 2022); betas and eps kept")
        return betas, eps
    new = (round(b1, 12), round(b2, 12))
    new_eps = eps / math.sqrt(k)
    notes.append(f"adam_hparams sde (Malladi et al. 2022, SDE scaling rule): batch x {_fmt(k)} -> 1 - beta scaled by "
                 f"k: betas {betas} -> {new}, eps {eps:g} / sqrt(k) = {new_eps:.3g}")
    return new, new_eps


def recommend(
    request: RecommendationRequest | dict,
    *,
    history: Sequence[BatchSummary] = (),
    evidence: Sequence[RunEvidence | dict] | EvidenceModel = (),
    direction: str = "minimize",
    noise_scale: float | None = None,
) -> Recipe:
    """Turn a request into a recipe.

    Args:
        request: the request (or its JSON dict, validated here).
        history: what past runs of this study taught, per batch size (may be empty).
        evidence: the past runs themselves (or a fitted :class:`EvidenceModel`): the LR-vs-batch
            curve is fitted on them and replaces the rule's LR (issue #7).
        direction: whether the study's metric is minimised or maximised.
        noise_scale: a gradient noise scale measured in the study (used when the request's
            reference gives none).

    Raises:
        pydantic.ValidationError: a malformed request (names the field).
        RecipeError: a request that is valid but contradicts itself (names the field).
    """
    req = request if isinstance(request, RecommendationRequest) else RecommendationRequest.model_validate(request)
    if req.target is not None and req.target.batch_size == "auto" and req.reference is not None \
            and req.reference.noise_scale is None and noise_scale is not None:
        req = req.model_copy(update={"reference": req.reference.model_copy(update={"noise_scale": noise_scale})})
    stage_reqs = _stage_requests(req)
    if isinstance(evidence, EvidenceModel):
        evidence_model: EvidenceModel | None = evidence
    else:
        evidence_model = EvidenceModel.from_runs(evidence, direction=direction) if evidence else None  # type: ignore[arg-type]
    plans: list[_Plan] = []
    for i, s in enumerate(stage_reqs):
        ref = s.reference or req.reference
        assert ref is not None
        plans.append(_Plan(index=i, req=s, ref=ref))
    n = len(plans)
    rationale: list[str] = []
    warnings: list[str] = []
    if req.target is not None and req.target.batch_size == "auto":
        t, bn = req.target, req.reference.noise_scale  # type: ignore[union-attr]
        limits = f" within the limits {t.min_batch_size or 1}..{t.max_batch_size or 'none'}" \
            if (t.min_batch_size or t.max_batch_size) else ""
        rationale.append(f"batch size {plans[0].req.batch_size} (auto): the power of two nearest the noise scale "
                         f"B_noise = {_fmt(bn)}{limits}; there steps and examples are each 2x their minimum "
                         "(McCandlish et al. 2018, eq. 2.11): smaller wastes steps, larger wastes examples")

    for plan in plans:
        _resolve_batches(plan, n)
        _plan_noise(plan, n, noise_scale)
        _plan_steps(plan, req, n)
        p = _prefix(plan, n)
        if plan.k < 1:
            plan.warnings.append(f"{p}the target batch is smaller than the reference's (ratio {_fmt(plan.k)}): this "
                                 "scales down, and the papers' rules were measured scaling up")
        if plan.steps < 10:
            plan.warnings.append(f"{p}the stage has only {plan.steps} step(s): too short for a warmup and a decay "
                                 "to mean anything; check the steps or the budget")
    name, notes, warns = _choose_optimizer(req, plans)
    for plan in plans:
        _plan_lr(plan, req, name, history, evidence_model, n)
    if name == "lamb" and req.optimizer is None and any(p.capped for p in plans):
        name = "lans"
        notes = [n_ for n_ in notes if not n_.startswith("optimizer lamb:")]
        notes.append("optimizer lans: the LR cap binds; LANS (Nesterov + per-block normalised gradients) trained "
                     "BERT-Large at 96K/33K with a capped LR and a constant phase (LANS Table 1)")
    warns += _check_lans_limit(name, plans)
    rationale += notes
    stages = []
    for plan in plans:
        stages.append(_plan_schedule(plan, req, name, n, evidence_model))
        rationale += plan.rationale
        warnings += plan.warnings
    warnings += warns
    if req.rule == "linear" and name in ("lamb", "lans", "adamw"):
        warnings.append("linear LR scaling with an adaptive optimizer: the LAMB paper found sqrt scaling right")
    if n > 1:
        rationale.append("each stage re-warms from zero (LAMB section 4.1, mixed-batch training)")
    if evidence_model is not None:
        warnings += [f"evidence conflict: {c}" for c in evidence_model.conflicts]
    total = sum(s.steps for s in stages)
    opt_notes: list[str] = []
    config = _optimizer_config(name, stages[0].peak_lr, req, plans[0], opt_notes, warnings)
    rationale += opt_notes
    return Recipe(
        optimizer=config,
        stages=stages,
        total_steps=total,
        rationale=rationale,
        warnings=warnings,
    )
