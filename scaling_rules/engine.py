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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import priors
from .evidence import BatchSummary
from .learning import EvidenceModel, RunEvidence
from .models import (
    ADAM_FAMILY,
    OptimizerConfig,
    Recipe,
    RecommendationRequest,
    Reference,
    Stage,
    StageRequest,
)
from .schedule import schedule_area

__all__ = ["RecipeError", "area_gaps", "recommend"]


class RecipeError(ValueError):
    """A request that is well-formed but cannot be turned into a recipe; names the field."""


@dataclass
class _Plan:
    """One stage being worked out, with the notes that explain it."""

    index: int
    req: StageRequest
    ref: Reference
    steps: int = 0
    ideal_lr: float = 0.0
    lr: float = 0.0
    cap: float | None = None
    capped: bool = False
    rationale: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _default_rule(optimizer: str) -> str:
    return "sqrt" if optimizer in ADAM_FAMILY else "linear"


def _stage_requests(req: RecommendationRequest) -> list[StageRequest]:
    if req.stages is not None:
        return list(req.stages)
    assert req.target is not None  # enforced by the model validator
    return [StageRequest(batch_size=req.target.batch_size, steps=req.target.steps)]


def _prefix(plan: _Plan, n_stages: int) -> str:
    return f"stage {plan.index + 1}: " if n_stages > 1 else ""


def _plan_steps(plan: _Plan, req: RecommendationRequest, n: int) -> None:
    p, ref, s = _prefix(plan, n), plan.ref, plan.req
    if s.steps is not None:
        plan.steps = s.steps
        plan.rationale.append(f"{p}steps: {s.steps}, given explicitly")
        return
    ref_steps = ref.steps
    # A share splits the top-level reference's steps between stages (BERT: 90% seq 128, 10% seq 512).
    if s.share is not None and s.reference is None:
        ref_steps = s.share * ref.steps
    if req.budget == "same-steps":
        plan.steps = max(1, math.ceil(ref_steps - 1e-9))
        plan.rationale.append(f"{p}steps: {plan.steps}, the reference's step count (budget same-steps)")
        return
    # same-epochs: the same number of examples, so steps shrink by k (LAMB Table 4: 1M -> 15625).
    exact = ref_steps * ref.batch_size / s.batch_size
    plan.steps = max(1, math.ceil(exact - 1e-9))
    plan.rationale.append(
        f"{p}steps: {_fmt(ref_steps)} x {ref.batch_size}/{s.batch_size} = {plan.steps} "
        "(same number of examples; budget same-epochs)"
    )


def _apply_evidence(plan: _Plan, evidence: EvidenceModel, p: str) -> None:
    """Replace the rule's LR by what the study's runs say (issue #7): the fitted scaling curve, or
    else a re-anchoring on the best-measured nearby batch size."""
    target = plan.req.batch_size
    rule_lr = plan.ideal_lr
    fit = evidence.fit
    used = evidence.run_ids()
    ids = f"runs {', '.join(map(str, used[:12]))}{' ...' if len(used) > 12 else ''}" if used else "past runs"
    if fit is not None:
        plan.ideal_lr = fit.optimum(target)
        plan.rationale.append(
            f"{p}evidence ({ids}; {fit.n_runs} completed at batch sizes "
            f"{', '.join(map(str, fit.batch_sizes))}): LR ~ batch^a with a = {fit.exponent:.3f} +- "
            f"{fit.exponent_sd:.3f} (prior 0.5, data weight {fit.data_weight:.2f}); best LR at {target} is "
            f"{_fmt(plan.ideal_lr)}, the rule gave {_fmt(rule_lr)} ({plan.ideal_lr / rule_lr - 1:+.1%})"
        )
        return
    anchor = evidence.nearest_measured_batch(target)
    best = evidence.best_run(anchor) if anchor is not None else None
    if best is None:
        return
    plan.ideal_lr = best.lr * math.sqrt(target / best.batch_size)
    plan.rationale.append(
        f"{p}evidence: re-anchored on run {best.run_id} (batch {best.batch_size}, LR {_fmt(best.lr)}, the "
        f"best measured near {target}) with sqrt scaling: {_fmt(plan.ideal_lr)}, the reference rule gave "
        f"{_fmt(rule_lr)} ({plan.ideal_lr / rule_lr - 1:+.1%})"
    )


def _plan_lr(plan: _Plan, req: RecommendationRequest, rule: str, history: Sequence[BatchSummary],
             evidence: EvidenceModel | None, n: int) -> None:
    p, ref, s = _prefix(plan, n), plan.ref, plan.req
    k = s.batch_size / ref.batch_size
    if s.lr is not None:
        plan.ideal_lr = s.lr
        plan.rationale.append(f"{p}peak LR {_fmt(s.lr)}, given explicitly")
    elif rule == "sqrt":
        plan.ideal_lr = ref.lr * math.sqrt(k)
        plan.rationale.append(
            f"{p}LR: sqrt scaling (LAMB section 4.3): {_fmt(ref.lr)} x sqrt({s.batch_size}/{ref.batch_size}) "
            f"= {_fmt(plan.ideal_lr)}"
        )
    else:
        plan.ideal_lr = ref.lr * k
        plan.rationale.append(
            f"{p}LR: linear scaling (Goyal et al. 2017): {_fmt(ref.lr)} x {s.batch_size}/{ref.batch_size} "
            f"= {_fmt(plan.ideal_lr)}"
        )

    if s.lr is None and evidence is not None:
        _apply_evidence(plan, evidence, p)

    caps: list[tuple[float, str]] = []
    explicit = s.lr_cap if s.lr_cap is not None else req.lr_cap
    if explicit is not None:
        caps.append((explicit, f"the LR cap {_fmt(explicit)} given in the request"))
    diverged = [h for h in history if h.min_diverged_lr is not None and h.batch_size <= s.batch_size]
    if diverged:
        worst = min(diverged, key=lambda h: h.min_diverged_lr)  # type: ignore[arg-type, return-value]
        assert worst.min_diverged_lr is not None
        cap = priors.DIVERGENCE_MARGIN * worst.min_diverged_lr
        caps.append((cap, f"study history: LR {_fmt(worst.min_diverged_lr)} diverged at batch "
                          f"{worst.batch_size} (<= {s.batch_size}), so the cap is "
                          f"{priors.DIVERGENCE_MARGIN} x that = {_fmt(cap)}"))
    if evidence is not None:
        worst_run = evidence.min_diverged_at_or_below(s.batch_size)
        if worst_run is not None:
            cap = priors.DIVERGENCE_MARGIN * worst_run.lr
            caps.append((cap, f"evidence: run {worst_run.run_id} diverged at LR {_fmt(worst_run.lr)}, batch "
                              f"{worst_run.batch_size} (<= {s.batch_size}), so the cap is "
                              f"{priors.DIVERGENCE_MARGIN} x that = {_fmt(cap)}"))
    if explicit is None and s.lr is None:
        prior = priors.cap_prior(ref.optimizer, req.model.params)
        stable = evidence.max_stable_at_or_below(s.batch_size) if evidence is not None else None
        if prior is not None and stable is not None and stable > prior:
            plan.rationale.append(f"{p}the model-size cap prior {_fmt(prior)} is raised to {_fmt(stable)}, "
                                  "an LR that trained stably in this study")
            prior = stable
        if prior is not None:
            if prior < ref.lr:
                plan.warnings.append(
                    f"{p}the model-size LR cap prior {_fmt(prior)} is below the reference LR {_fmt(ref.lr)}, "
                    "which trained stably: the cap is raised to the reference LR"
                )
                prior = ref.lr
            caps.append((prior, f"the model-size prior for {ref.optimizer} at {req.model.params:,} parameters "
                                f"({_fmt(prior)}; LANS section 3.3 anchored at BERT-Large, GPT-3 size trend)"))
    plan.lr = plan.ideal_lr
    if caps:
        cap, why = min(caps, key=lambda c: c[0])
        plan.cap = cap
        if plan.ideal_lr > cap:
            plan.lr, plan.capped = cap, True
            plan.rationale.append(f"{p}LR capped at {_fmt(cap)} (LANS section 3.3, LR <= ~1/L): {why}")
            plan.warnings.append(f"{p}LR capped: the scaled LR {_fmt(plan.ideal_lr)} exceeds {_fmt(cap)}")


def _plan_schedule(plan: _Plan, req: RecommendationRequest, n: int, evidence: EvidenceModel | None = None) -> Stage:
    p, ref, s, T = _prefix(plan, n), plan.ref, plan.req, plan.steps
    k = s.batch_size / ref.batch_size
    ref_ratio = ref.ratio
    if ref_ratio == 0:
        ref_ratio = priors.DEFAULT_REFERENCE_WARMUP_RATIO
        plan.warnings.append(
            f"{p}the reference has no warmup; large batches need one: assuming 1/320 (LAMB's 512 reference)"
        )
    scale = s.warmup_scale if s.warmup_scale is not None else k
    ratio = ref_ratio * scale
    if s.warmup_scale is not None:
        plan.rationale.append(f"{p}warmup ratio {_fmt(ref_ratio)} x {_fmt(scale)} (given scale) = {_fmt(ratio)}")
    else:
        plan.rationale.append(
            f"{p}linear-epoch warmup (LAMB Tables 4, 5): ratio {_fmt(ref_ratio)} x {_fmt(k)} = {_fmt(ratio)}"
        )
    # --- issue #11 hook (learning.py owns the fit): the study's runs that varied the warmup replace
    # the linear-epoch rule, unless the request fixed the warmup scale itself.
    learned = evidence.warmup_ratio_at(s.batch_size) if evidence is not None and s.warmup_scale is None else None
    if learned is not None and evidence is not None and evidence.warmup_fit is not None:
        wf, ids = evidence.warmup_fit, ", ".join(map(str, evidence.warmup_fit.run_ids[:12]))
        plan.rationale.append(
            f"{p}evidence (runs {ids or '?'}; warmup varied at batch sizes {', '.join(map(str, wf.batch_sizes))}): "
            f"warmup ratio ~ batch^w with w = {wf.exponent:.3f} +- {wf.exponent_sd:.3f} (prior 1, linear-epoch; "
            f"data weight {wf.data_weight:.2f}): {_fmt(learned)} at {s.batch_size}, the rule gave {_fmt(ratio)}"
        )
        ratio = learned
    # --- end of the issue #11 hook
    if ratio > priors.MAX_WARMUP_RATIO:
        plan.warnings.append(
            f"{p}warmup ratio {_fmt(ratio)} clamped to {priors.MAX_WARMUP_RATIO} (largest published: LANS 42.65%)"
        )
        ratio = priors.MAX_WARMUP_RATIO
    warmup = math.floor(ratio * T + 1e-9)
    if k > 1 and warmup == 0 and T > 1:
        warmup = 1

    plateau = s.plateau_ratio if s.plateau_ratio is not None else req.plateau_ratio
    const, const_ratio = 0, 0.0
    if plateau is not None:
        if plateau < ratio:
            raise RecipeError(
                f"stages[{plan.index}].plateau_ratio ({_fmt(plateau)}) is below the warmup ratio ({_fmt(ratio)})"
            )
        const = max(0, min(T - warmup, round(plateau * T) - warmup))
        const_ratio = round(plateau - ratio, 12)
        plan.rationale.append(
            f"{p}warmup + constant = {_fmt(plateau)} of the stage (LANS eq. 9 / Table 1): constant {const} steps"
        )
    elif plan.capped:
        ideal_const = priors.lans_equal_area_const_steps(plan.ideal_lr, plan.lr, T)
        room = max(0, math.floor((1 - priors.MIN_DECAY_TAIL) * T + 1e-9) - warmup)
        const = min(round(ideal_const), room)
        const_ratio = const / T
        plan.rationale.append(
            f"{p}constant phase of {const} steps after warmup (LANS eq. 9) gives back area lost to the cap: "
            f"equal area needs {_fmt(ideal_const)} steps, limited to keep a {priors.MIN_DECAY_TAIL:.0%} decay tail"
        )
        if const < round(ideal_const):
            ideal_area = plan.ideal_lr * T / 2
            area = plan.lr * (T + const) / 2
            plan.warnings.append(
                f"{p}the cap costs {(ideal_area - area) / ideal_area:.1%} of the area under the LR curve "
                "even with the constant phase"
            )
    stage = Stage(
        batch_size=s.batch_size,
        steps=T,
        peak_lr=plan.lr,
        warmup_steps=warmup,
        const_steps=const,
        decay_steps=T - warmup - const,
        warmup_ratio=round(ratio, 12),
        const_ratio=const_ratio,
        decay=req.decay,
        end_lr=min(req.end_lr, plan.lr),
        seq_len=s.seq_len,
        ideal_lr=plan.ideal_lr,
        lr_cap=plan.cap,
    )
    if plan.capped:
        gap, gap_without = area_gaps(stage)
        plan.rationale.append(
            f"{p}area under the LR curve: gap to the uncapped schedule {gap:.4g} "
            f"(it would be {gap_without:.4g} without the constant phase)"
        )
    return stage


def area_gaps(stage: Stage) -> tuple[float, float]:
    """(area gap with the stage's constant phase, gap with none) against the uncapped schedule.

    LANS section 3.3: for 0.01 ideal vs 0.007 capped, T = 3519, warmup 1500, const 963 these are
    1.91 and 5.28.
    """
    if stage.ideal_lr is None:
        raise ValueError("stage has no ideal_lr")
    ideal = stage.model_copy(update={"peak_lr": stage.ideal_lr, "const_steps": 0,
                                     "decay_steps": stage.steps - stage.warmup_steps,
                                     "end_lr": min(stage.end_lr, stage.ideal_lr)})
    flat = stage.model_copy(update={"const_steps": 0, "decay_steps": stage.steps - stage.warmup_steps})
    ideal_area = schedule_area(ideal)
    return ideal_area - schedule_area(stage), ideal_area - schedule_area(flat)


def _choose_optimizer(req: RecommendationRequest, plans: list[_Plan]) -> tuple[str, list[str], list[str]]:
    """Returns (name, rationale, warnings)."""
    family = req.model.family
    max_batch = max(p.req.batch_size for p in plans)
    ref_opts = {p.ref.optimizer for p in plans}
    ref_opt = plans[0].ref.optimizer
    mixed = len(plans) > 1
    lamb_limit = priors.LAMB_MAX_BATCH_MIXED if mixed else priors.LAMB_MAX_BATCH
    notes: list[str] = []
    warns: list[str] = []
    if req.optimizer is not None:
        name = req.optimizer
        notes.append(f"optimizer {name}: forced by the request")
        if name == "adamw" and max_batch > priors.ADAMW_MAX_BATCH:
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
    elif family != "cnn" and ref_opt in ("adamw", "adam") and max_batch <= priors.ADAMW_MAX_BATCH:
        name = "adamw"
        notes.append(f"optimizer adamw: batch {max_batch} <= 8K, where AdamW still matches LAMB (LAMB Table 8)")
    elif any(p.capped for p in plans) or max_batch > lamb_limit:
        name = "lans"
        why = "the LR cap binds" if any(p.capped for p in plans) else f"batch {max_batch} is beyond LAMB's tested range"
        notes.append(f"optimizer lans: {why}; LANS (Nesterov + per-block normalised gradients) trained "
                     "BERT-Large at 96K/33K (LANS Table 1)")
    else:
        name = "lamb"
        notes.append("optimizer lamb: scales BERT to 32K with sqrt LR and linear-epoch warmup (LAMB Table 4) "
                     "where AdamW stops at 16K (Table 8) and LARS fails beyond 16K (Table 2)")
    if name in ("lamb", "lans") and ref_opts & {"adam", "adamw"}:
        warns.append("the reference LR was tuned for AdamW; LAMB/LANS LRs are per-layer relative steps and "
                     "usually several times larger (BERT: 1e-4 AdamW vs 6.25e-4 LAMB at 512): check it")
    if name in ("adamw",) and ref_opts & {"lamb", "lans", "lars"}:
        warns.append("the reference LR was tuned for a layer-wise optimizer; AdamW usually needs a smaller LR")
    if (name == "lans" and max_batch > priors.LANS_MAX_BATCH) or (name == "lars" and max_batch > 32768):
        warns.append(f"batch {max_batch} is beyond what the papers tested ({priors.LANS_MAX_BATCH} for LANS)")
    return name, notes, warns


def _optimizer_config(name: str, lr: float, req: RecommendationRequest, ref: Reference) -> OptimizerConfig:
    wd = ref.weight_decay
    if name in ("lamb", "lans"):
        return OptimizerConfig(
            name=name, lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01 if wd is None else wd,
            exclude_from_weight_decay=["bias", "LayerNorm", "layer_norm", "norm"],
        )
    if name == "adamw":
        return OptimizerConfig(
            name=name, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01 if wd is None else wd,
            exclude_from_weight_decay=["bias", "LayerNorm", "layer_norm", "norm"],
        )
    if name == "lars":
        return OptimizerConfig(
            name=name, lr=lr, betas=None, eps=1e-9, weight_decay=5e-5 if wd is None else wd, momentum=0.9,
            trust_coefficient=0.001, exclude_from_weight_decay=["bias", "bn", "BatchNorm", "norm"],
        )
    return OptimizerConfig(
        name="sgd", lr=lr, betas=None, eps=0.0, weight_decay=1e-4 if wd is None else wd, momentum=0.9,
        exclude_from_weight_decay=["bias", "bn", "BatchNorm", "norm"],
    )


def recommend(
    request: RecommendationRequest | dict,
    *,
    history: Sequence[BatchSummary] = (),
    evidence: Sequence[RunEvidence | dict] | EvidenceModel = (),
    direction: str = "minimize",
) -> Recipe:
    """Turn a request into a recipe.

    Args:
        request: the request (or its JSON dict, validated here).
        history: what past runs of this study taught, per batch size (may be empty).
        evidence: the past runs themselves (or a fitted :class:`EvidenceModel`): the LR-vs-batch
            curve is fitted on them and replaces the rule's LR (issue #7).
        direction: whether the study's metric is minimised or maximised.

    Raises:
        pydantic.ValidationError: a malformed request (names the field).
        RecipeError: a request that is valid but contradicts itself (names the field).
    """
    req = request if isinstance(request, RecommendationRequest) else RecommendationRequest.model_validate(request)
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

    for plan in plans:
        rule = req.rule or _default_rule(plan.ref.optimizer)
        _plan_steps(plan, req, n)
        _plan_lr(plan, req, rule, history, evidence_model, n)
    name, notes, warns = _choose_optimizer(req, plans)
    rationale += notes
    stages = []
    for plan in plans:
        stages.append(_plan_schedule(plan, req, n, evidence_model))
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
    return Recipe(
        optimizer=_optimizer_config(name, stages[0].peak_lr, req, plans[0].ref),
        stages=stages,
        total_steps=total,
        rationale=rationale,
        warnings=warnings,
    )
