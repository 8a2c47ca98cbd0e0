"""The stage's phases: warmup by the optimizer's policy, the constant phase that gives back the
area a cap took (LANS eq. 9), and the decay shape (engine rules 2, 3 and 7)."""

from __future__ import annotations

import math

from . import optimizers, priors
from ._plan import RecipeError, _fmt, _Plan
from .learning import EvidenceModel
from .models import RecommendationRequest, Stage
from .recipe import validated
from .schedule import DEFAULT_DECAY_POWER, StageShape, stage_area

__all__ = ["area_gaps"]


def _warmup_rule(opt: str) -> str:
    return optimizers.info(opt).warmup_rule


def _growth(opt: str, batch: float, plan: _Plan) -> float:
    """How a family's warmup ratio grows with the batch at a fixed epoch budget, relative to the
    reference (``priors.warmup_growth`` of the optimizer table's ``warmup_rule``). A ratio of one function
    of the batch, so A -> B -> A and A -> B -> C are exact."""
    rule = _warmup_rule(opt)
    return priors.warmup_growth(rule, batch) / priors.warmup_growth(rule, plan.ref_batch_x)


def _family_text(opt: str) -> str:
    rule = _warmup_rule(opt)
    if rule == "linear-epoch":
        return ("linear-epoch (LAMB Tables 4, 5, LANS Table 1: the warmup ratio grows with the batch up to "
                "96K, the largest batch they reach, and stays constant in epochs beyond)")
    if rule == "lars-epochs":
        return (f"epochs growing as 1 + B/{priors.LARS_WARMUP_BATCH:.0f} (about constant well below: SimCLR, BYOL; "
                "lengthened past 16K by the LARS reference codes, TPU and MLPerf; the batch fitted on them)")
    if rule == "constant-epochs":
        return "constant epochs (Goyal et al. 2017: 5 epochs at every batch)"
    return "constant samples (AdamW recipes: GPT-3, BLOOM, LLaMA keep warmup tokens fixed; ViT fixed epochs)"


def warmup_ratio(plan: _Plan, req: RecommendationRequest, name: str, n: int,
                 evidence: EvidenceModel | None = None) -> float:
    """The stage's warmup ratio by the optimizer families' rules, continuous in the batch: the
    reference family's rule up to where the recipe left it (``plan.switch_at``), the recipe
    optimizer's rule beyond, so a switch keeps the warmup in samples; then the study's evidence
    and the clamp."""
    p, ref, s, T = plan.prefix, plan.ref, plan.req, plan.steps
    if plan.ramp:
        plan.rationale.append(f"{p}no warmup: a batch ramp at the same seq_len continues the previous stage's "
                              "schedule (re-warming is for stages that change the sequence length, LAMB section 4.1)")
        return 0.0
    ref_ratio = ref.ratio
    if ref_ratio == 0 and not (ref.warmup_steps is not None and ref.warmup_steps > 0):
        ref_ratio = priors.DEFAULT_WARMUP_RATIO[ref.optimizer]
        plan.warnings.append(
            f"{p}the reference has no warmup; large batches need one: assuming {ref.optimizer}'s default, "
            f"{_fmt(ref_ratio)} of the reference run's examples ("
            + ("5 of Goyal et al.'s 90 epochs" if ref.optimizer in ("sgd", "lars") else
               "BERT's 10K of 1M steps" if ref.optimizer in ("adamw", "adam") else "LAMB's 512 reference")
            + ")")
    k = plan.k
    ref_total = plan.ref_steps if ref.steps is not None else T * k
    assert ref_total is not None
    if ref.warmup_ratio is None and ref.steps is None and ref.warmup_steps:
        ref_ratio = ref.warmup_steps / ref_total
    if s.warmup_scale is not None:
        ratio = ref_ratio * s.warmup_scale
        plan.rationale.append(f"{p}warmup ratio {_fmt(ref_ratio)} x {_fmt(s.warmup_scale)} (given scale) = {_fmt(ratio)}")
        return _clamped(plan, _learned(plan, ratio, evidence, p), p)
    old, b = ref.optimizer, plan.batch_x
    sw = plan.switch_at if plan.switch_at is not None else b
    edge = min(b, sw)
    grow = _growth(old, edge, plan)
    if edge != b:  # past a switch the recipe optimizer's rule takes over (x/x is exactly 1: skipped otherwise)
        grow = grow * _growth(name, b, plan) / _growth(name, edge, plan)
    # Constant-sample families keep the warmup's examples when the stage's examples change (an explicit
    # step budget); the LAMB tables state their rule as a ratio of the run.
    same_samples = 1.0 if (_warmup_rule(name) == "linear-epoch" or T * b == ref_total * plan.ref_batch_x) \
        else ref_total * plan.ref_batch_x / (T * b)
    ratio = ref_ratio * grow * same_samples
    if plan.switch_at is not None and priors.same_units(name, old) is False:
        plan.rationale.append(
            f"{p}warmup kept in samples across the switch {old} -> {name}: {old}'s rule ({_family_text(old)}) up "
            f"to batch {_fmt(sw)}, then {name}'s ({_family_text(name)}): ratio {_fmt(ref_ratio)} x {_fmt(grow)}"
            f"{f' x {same_samples:.4g} (same examples)' if abs(same_samples - 1) > 1e-3 else ''} = {_fmt(ratio)}")
    elif k == 1 and abs(same_samples - 1) <= 1e-3:
        plan.rationale.append(f"{p}warmup ratio {_fmt(ratio)}: the reference's, at the reference's batch")
    else:
        plan.rationale.append(
            f"{p}warmup: {_family_text(name)}: ratio {_fmt(ref_ratio)} x {_fmt(grow)}"
            f"{f' x {same_samples:.4g} (the same warmup examples in a run of other length)' if abs(same_samples - 1) > 1e-3 else ''}"
            f" = {_fmt(ratio)}")
    return _clamped(plan, _learned(plan, ratio, evidence, p), p)


def _clamped(plan: _Plan, ratio: float, p: str) -> float:
    # A reference that trained with a longer warmup than the clamp keeps its own.
    top = max(priors.MAX_WARMUP_RATIO, plan.ref.ratio)
    if ratio > top:
        plan.warnings.append(
            f"{p}warmup ratio {_fmt(ratio)} clamped to {_fmt(top)} (largest published: LANS 42.65%)"
        )
        return top
    return ratio


def _decay(plan: _Plan, req: RecommendationRequest, name: str) -> dict:
    ref = plan.ref
    own = priors.same_units(name, ref.optimizer)
    shape = req.decay or (ref.decay if own else None) or (plan.prior.decay if plan.prior else None) or "linear"
    out: dict = {"decay": shape}
    if shape == "polynomial":
        out["decay_power"] = req.decay_power or (ref.decay_power if own else None) or DEFAULT_DECAY_POWER
    if shape in ("step", "multistep"):
        ms = req.decay_milestones or (ref.decay_milestones if own else None)
        if ms is not None:
            out["decay_milestones"] = list(ms)
        factor = req.decay_factor or (ref.decay_factor if own else None)
        if factor is not None:
            out["decay_factor"] = factor
    return out


def _equal_area_const(plan: _Plan, decay: dict, warmup: int) -> float:
    """Constant steps that give back the area the cap took (LANS eq. 9), for the stage's decay shape:
    area ~ eta (W/2 + C + f D) with f the decay's area factor (1/2 linear or cosine, 1/(p+1) power p)."""
    T = plan.steps
    if decay["decay"] in ("linear", "cosine"):
        return priors.lans_equal_area_const_steps(plan.ideal_lr, plan.lr, T)
    f = 1 / (decay.get("decay_power", DEFAULT_DECAY_POWER) + 1)
    r = plan.ideal_lr / plan.lr
    return (r - 1) * (warmup / 2 + f * (T - warmup)) / (1 - f)


def _learned(plan: _Plan, ratio: float, evidence: EvidenceModel | None, p: str) -> float:
    """The study's runs that varied the warmup replace the policy's ratio (issue #11), unless the
    request fixed the warmup scale itself (learning.py owns the fit; the rule is its prior)."""
    if evidence is None or plan.req.warmup_scale is not None:
        return ratio
    learned = evidence.warmup_ratio_at(plan.batch)
    wf = evidence.warmup_fit
    if learned is None or wf is None:
        return ratio
    ids = ", ".join(map(str, wf.run_ids[:12]))
    if wf.flat:
        tried = f"F-test p = {wf.effect_p:.2g}" if wf.effect_p is not None else "no U"
        if learned >= ratio:
            plan.rationale.append(
                f"{p}evidence (runs {ids or '?'}): the warmups tried at batch sizes "
                f"{', '.join(map(str, wf.batch_sizes))} did not differ beyond the noise ({tried}); the rule's "
                f"{_fmt(ratio)} is no longer than the shortest tried ({_fmt(learned)} here), so it stands")
            return ratio
        plan.rationale.append(
            f"{p}evidence (runs {ids or '?'}): the warmups tried at batch sizes {', '.join(map(str, wf.batch_sizes))} "
            f"did not differ beyond the noise ({tried}), so the shortest tried was enough; grown as the "
            f"{wf.rule} rule grows it (w = {wf.exponent:.3f}), it is {_fmt(learned)} at {plan.batch}, where the rule gave "
            f"{_fmt(ratio)} (a longer warmup only delays the training)")
        return learned
    plan.rationale.append(
        f"{p}evidence (runs {ids or '?'}; warmup varied at batch sizes {', '.join(map(str, wf.batch_sizes))}): "
        f"warmup ratio ~ batch^w{'' if wf.rule != 'lars-epochs' else ' x (1 + B/B_w)'} with w = {wf.exponent:.3f} "
        f"+- {wf.exponent_sd:.3f} (prior {priors.warmup_power(wf.rule):g}, {wf.rule}; "
        f"data weight {wf.data_weight:.2f}): {_fmt(learned)} at {plan.batch}, the rule gave {_fmt(ratio)}"
    )
    return learned


def _plan_schedule(plan: _Plan, req: RecommendationRequest, name: str, n: int,
                   evidence: EvidenceModel | None = None) -> Stage:
    p, s, T = plan.prefix, plan.req, plan.steps
    ratio = plan.warmup_ratio
    warmup = math.floor(ratio * T + 1e-9)
    if plan.k > 1 and warmup == 0 and T > 1 and not plan.ramp:
        warmup = 1
    decay = _decay(plan, req, name)

    plateau = s.plateau_ratio if s.plateau_ratio is not None else req.plateau_ratio
    if plateau is None and decay["decay"] == "wsd":
        plateau = max(ratio, 1 - priors.WSD_DECAY_FRACTION)
        plan.rationale.append(f"{p}warmup-stable-decay: the LR holds until {_fmt(plateau)} of the stage, then "
                              f"decays linearly over the last {_fmt(1 - plateau)} (Hägele et al. 2024)")
    const, const_ratio = 0, 0.0
    if plan.ramp_next:
        const = T - warmup
        const_ratio = round(1 - ratio, 12)
        plan.rationale.append(f"{p}no decay: the next stage ramps the batch up and continues this schedule")
    elif plateau is not None:
        if plateau < ratio:
            raise RecipeError(
                f"stages[{plan.index}].plateau_ratio ({_fmt(plateau)}) is below the warmup ratio ({_fmt(ratio)})"
            )
        const = max(0, min(T - warmup, round(plateau * T) - warmup))
        const_ratio = round(plateau - ratio, 12)
        plan.rationale.append(
            f"{p}warmup + constant = {_fmt(plateau)} of the stage (LANS eq. 9 / Table 1): constant {const} steps"
        )
    elif plan.capped and decay["decay"] in ("step", "multistep"):
        plan.rationale.append(f"{p}step decay: no constant phase is added for the cap (the LR is already flat "
                              "until the first drop)")
    elif plan.capped:
        ideal_const = _equal_area_const(plan, decay, warmup)
        room = max(0, math.floor((1 - priors.MIN_DECAY_TAIL) * T + 1e-9) - warmup)
        const = min(round(ideal_const), room)
        const_ratio = const / T
        plan.rationale.append(
            f"{p}constant phase of {const} steps after warmup (LANS eq. 9) gives back area lost to the cap: "
            f"equal area needs {_fmt(ideal_const)} steps, limited to keep a {priors.MIN_DECAY_TAIL:.0%} decay tail"
        )
        if const < round(ideal_const):
            flat = StageShape(peak_lr=plan.lr, end_lr=0.0, warmup_steps=warmup, const_steps=const, steps=T, **decay)
            ideal = StageShape(peak_lr=plan.ideal_lr, end_lr=0.0, warmup_steps=warmup, const_steps=0, steps=T, **decay)
            ideal_area = stage_area(ideal)
            if ideal_area > 0:
                plan.warnings.append(
                    f"{p}the cap costs {(ideal_area - stage_area(flat)) / ideal_area:.1%} of the area under the "
                    "LR curve even with the constant phase"
                )
    stage = validated(
        Stage,
        batch_size=plan.batch,
        steps=T,
        peak_lr=plan.lr,
        warmup_steps=warmup,
        const_steps=const,
        decay_steps=T - warmup - const,
        warmup_ratio=round(ratio, 12),
        const_ratio=const_ratio,
        end_lr=min(req.end_lr, plan.lr),
        seq_len=s.seq_len,
        batch_tokens=plan.tokens,
        ideal_lr=plan.ideal_lr,
        lr_cap=plan.cap,
        examples_ratio=plan.examples_ratio,
        steps_ratio=plan.steps_ratio,
        **decay,
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
    decay = {"decay": stage.decay, "decay_power": stage.decay_power, "decay_milestones": stage.decay_milestones,
             "decay_factor": stage.decay_factor}
    ideal = StageShape(peak_lr=stage.ideal_lr, end_lr=min(stage.end_lr, stage.ideal_lr),
                       warmup_steps=stage.warmup_steps, const_steps=0, steps=stage.steps, **decay)
    flat = StageShape(peak_lr=stage.peak_lr, end_lr=stage.end_lr, warmup_steps=stage.warmup_steps, const_steps=0,
                      steps=stage.steps, **decay)
    # One stage each: stage_area is schedule_area's one term (fsum of one number is that number).
    ideal_area = stage_area(ideal)
    return ideal_area - stage_area(stage), ideal_area - stage_area(flat)


