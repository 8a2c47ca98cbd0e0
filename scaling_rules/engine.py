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
from dataclasses import dataclass, field

from . import priors
from .evidence import BatchSummary
from .learning import EvidenceModel, RunEvidence
from .models import (
    OptimizerConfig,
    Recipe,
    RecommendationRequest,
    Reference,
    Stage,
    StageRequest,
)
from .priors import Prior
from .schedule import DEFAULT_DECAY_POWER, schedule_area

__all__ = ["RecipeError", "area_gaps", "auto_batch_size", "examples_ratio", "recommend"]


class RecipeError(ValueError):
    """A request that is well-formed but cannot be turned into a recipe; names the field."""


@dataclass
class _Plan:
    """One stage being worked out, with the notes that explain it."""

    index: int
    req: StageRequest
    ref: Reference
    batch: int = 0  # sequences
    tokens: int | None = None
    seq_len: int | None = None
    ref_batch: int = 0
    k: float = 1.0  # batch ratio target / reference, in tokens or sequences (k_unit)
    k_unit: str = "sequences"
    steps: int = 0
    ideal_lr: float = 0.0
    lr: float = 0.0
    cap: float | None = None
    capped: bool = False
    prior: Prior | None = None  # set when the LR was re-anchored on the recipe optimizer's prior
    divergence_caps: list[float] = field(default_factory=list)
    examples_ratio: float | None = None
    steps_ratio: float | None = None
    rationale: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _default_rule(optimizer: str) -> str:
    # SGD: linear (Goyal et al.). Adam family: sqrt (LAMB section 4.3). LARS: sqrt too, the TPU
    # reference's 25 -> 34 -> 41 from 16K to 64K grows by x1.36 and x1.21 per doubling, not x2.
    return "linear" if optimizer == "sgd" else "sqrt"


def examples_ratio(batch: float, ref_batch: float, noise_scale: float) -> float:
    """E(B)/E(B_ref) at the same loss: (1 + B/B_noise)/(1 + B_ref/B_noise) (McCandlish eq. 2.11)."""
    return (1 + batch / noise_scale) / (1 + ref_batch / noise_scale)


def auto_batch_size(noise_scale: float, lo: int | None = None, hi: int | None = None) -> int:
    """The power of two nearest B_noise (where steps and examples are both 2x their minimum),
    within the device limits."""
    b = min(2 ** round(math.log2(max(noise_scale, 1.0))), 2**30)
    if hi is not None:
        b = min(b, hi)
    if lo is not None:
        b = max(b, lo)
    return int(b)


def _stage_requests(req: RecommendationRequest) -> list[StageRequest]:
    if req.stages is not None:
        return list(req.stages)
    assert req.target is not None  # enforced by the model validator
    t = req.target
    batch = t.batch_size
    if batch == "auto":
        ref = req.reference
        assert ref is not None
        if ref.noise_scale is None:
            raise RecipeError('target.batch_size "auto" needs reference.noise_scale (a measured gradient noise scale)')
        batch = auto_batch_size(ref.noise_scale, t.min_batch_size, t.max_batch_size)
    return [StageRequest(batch_size=batch, batch_tokens=t.batch_tokens, seq_len=t.seq_len, steps=t.steps)]


def _prefix(plan: _Plan, n_stages: int) -> str:
    return f"stage {plan.index + 1}: " if n_stages > 1 else ""


def _resolve_batches(plan: _Plan, n: int) -> None:
    """Sequences and tokens of the stage and of its reference, and the batch ratio k."""
    p, ref, s = _prefix(plan, n), plan.ref, plan.req
    where = f"stages[{plan.index}]" if n > 1 else "target"
    plan.seq_len = s.seq_len or ref.seq_len
    if s.batch_tokens is not None:
        if plan.seq_len is None:
            raise RecipeError(f"{where}.batch_tokens needs a seq_len ({where}.seq_len or reference.seq_len) "
                              "to give the recipe's batch in sequences")
        plan.batch = max(1, round(s.batch_tokens / plan.seq_len))
        plan.tokens = s.batch_tokens
    else:
        assert s.batch_size is not None and not isinstance(s.batch_size, str)
        plan.batch = s.batch_size
        plan.tokens = s.batch_size * plan.seq_len if plan.seq_len else None
    ref_tokens = ref.tokens
    if ref.batch_size is None:
        if plan.tokens is None:
            raise RecipeError("reference.batch_tokens needs reference.seq_len (or a target batch in tokens) "
                              "to compare it with a batch in sequences")
        plan.ref_batch = max(1, round(ref.batch_tokens / plan.seq_len)) if plan.seq_len else 1  # type: ignore[operator]
    else:
        plan.ref_batch = ref.batch_size
    in_tokens = s.batch_tokens is not None or ref.batch_tokens is not None
    same_len = ref.seq_len is not None and ref.seq_len == plan.seq_len
    if plan.tokens is not None and ref_tokens is not None and (in_tokens or same_len):
        plan.k, plan.k_unit = plan.tokens / ref_tokens, "tokens"
    else:
        plan.k, plan.k_unit = plan.batch / plan.ref_batch, "sequences"
        if ref.seq_len is not None and plan.seq_len is not None and ref.seq_len != plan.seq_len:
            plan.rationale.append(f"{p}seq_len {ref.seq_len} -> {plan.seq_len}: batches given in sequences are "
                                  "compared in sequences (BERT's phase 2 keeps its own reference)")


def _plan_steps(plan: _Plan, req: RecommendationRequest, n: int) -> None:
    p, ref, s = _prefix(plan, n), plan.ref, plan.req
    if s.steps is not None:
        plan.steps = s.steps
        plan.rationale.append(f"{p}steps: {s.steps}, given explicitly")
        return
    if ref.steps is None:
        where = f"stages[{plan.index}].steps" if n > 1 else "target.steps"
        raise RecipeError(f"reference.steps is required unless {where} is given")
    ref_steps: float = ref.steps
    # A share splits the top-level reference's steps between stages (BERT: 90% seq 128, 10% seq 512).
    if s.share is not None and s.reference is None:
        ref_steps = s.share * ref.steps
    if req.budget == "same-steps":
        plan.steps = max(1, math.ceil(ref_steps - 1e-9))
        plan.rationale.append(f"{p}steps: {plan.steps}, the reference's step count (budget same-steps)")
        return
    if req.budget == "same-loss":
        if plan.examples_ratio is None:
            raise RecipeError('budget "same-loss" needs reference.noise_scale (a measured gradient noise scale)')
        exact = ref_steps / plan.k * plan.examples_ratio
        plan.steps = max(1, math.ceil(exact - 1e-9))
        plan.rationale.append(
            f"{p}steps: {_fmt(ref_steps)} / {_fmt(plan.k)} x {plan.examples_ratio:.3g} (predicted examples ratio) = "
            f"{plan.steps} (budget same-loss: the examples the target batch needs to reach the reference's loss)"
        )
        return
    # same-epochs: the same number of examples, so steps shrink by k (LAMB Table 4: 1M -> 15625).
    exact = ref_steps / plan.k
    plan.steps = max(1, math.ceil(exact - 1e-9))
    unit = " tokens" if plan.k_unit == "tokens" else ""
    plan.rationale.append(
        f"{p}steps: {_fmt(ref_steps)} x {_ratio_text(plan, inverse=True)} = {plan.steps} "
        f"(same number of examples{unit}; budget same-epochs)"
    )


def _ratio_text(plan: _Plan, *, inverse: bool = False) -> str:
    if plan.k_unit == "tokens":
        ref_tokens = plan.ref.tokens
        a, b = plan.tokens, ref_tokens
    else:
        a, b = plan.batch, plan.ref_batch
    return f"{b}/{a}" if inverse else f"{a}/{b}"


def _plan_noise(plan: _Plan, n: int, noise_scale: float | None) -> None:
    p = _prefix(plan, n)
    bn = plan.ref.noise_scale or noise_scale
    if bn is None:
        return
    src = "reference.noise_scale" if plan.ref.noise_scale else "the study's measured noise scale"
    ratio = examples_ratio(plan.batch, plan.ref_batch, bn)
    plan.examples_ratio = ratio
    plan.steps_ratio = ratio * plan.ref_batch / plan.batch
    plan.rationale.append(
        f"{p}critical batch (McCandlish et al. 2018, eq. 2.11) from {src} B_noise = {_fmt(bn)}: reaching the "
        f"reference's loss at batch {plan.batch} takes {ratio:.3g}x the examples and {plan.steps_ratio:.3g}x the "
        f"steps of batch {plan.ref_batch} (examples ratio (1 + {plan.batch}/{_fmt(bn)})/(1 + {plan.ref_batch}/{_fmt(bn)}))"
    )
    if plan.batch > 2 * bn:
        plan.warnings.append(
            f"{p}target batch {plan.batch} is {plan.batch / bn:.3g}x the critical batch (B_noise {_fmt(bn)}): beyond it a "
            f"larger batch buys little speed; the same loss needs {ratio:.3g}x the examples (budget \"same-loss\" "
            f"plans for that, batch_size \"auto\" picks a batch near B_noise)"
        )


def _apply_evidence(plan: _Plan, evidence: EvidenceModel, p: str) -> None:
    """Replace the rule's LR by what the study's runs say (issue #7): the fitted scaling curve, or
    else a re-anchoring on the best-measured nearby batch size."""
    target = plan.batch
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


def _size_factor(req: RecommendationRequest, from_params: int, rule: str, what: str, plan: _Plan, p: str) -> float:
    """LR factor for moving from a model of ``from_params`` to the request's model (transformers)."""
    to = req.model.params
    if from_params == to:
        return 1.0
    if req.model.family != "transformer":
        plan.warnings.append(f"{p}{what} was measured on {from_params:,} parameters and this model has {to:,}: no "
                             f"published size law for a {req.model.family} model, so the LR is not moved; try "
                             "\"explore\"")
        return 1.0
    a = priors.size_law_exponent(rule)
    factor = (to / from_params) ** a
    plan.warnings.append(
        f"{p}{what} was measured on {from_params:,} parameters, this model has {to:,}: LR x {factor:.3g} by the "
        f"GPT-3 Table 2.1 size law (LR ~ N^{priors.SIZE_EXPONENT} along GPT-3's batch path, N^{a:.3g} at a fixed "
        "batch); a size law is a trend, not a tuned LR: try \"explore\""
    )
    lo, hi = priors.SIZE_LAW_RANGE
    if not (lo <= to <= hi and lo <= from_params <= hi):
        plan.warnings.append(f"{p}the size law is extrapolated outside its data (GPT-3: {lo:,} to {hi:,} parameters)")
    return factor


def _scaled_lr(plan: _Plan, req: RecommendationRequest, name: str, n: int) -> None:
    """The ideal LR before caps: the reference scaled by the rule, or the new optimizer's prior."""
    p, ref, s = _prefix(plan, n), plan.ref, plan.req
    family = req.model.family
    if s.lr is not None:
        plan.ideal_lr = s.lr
        plan.rationale.append(f"{p}peak LR {_fmt(s.lr)}, given explicitly")
        return
    prior = priors.prior_for(family, name)
    if not priors.same_units(name, ref.optimizer) and prior is not None:
        plan.prior = prior
        lr = prior.lr_at(plan.batch)
        if family == "transformer":
            lr *= _size_factor(req, prior.params, prior.rule, f"the {name} prior", plan, p)
        elif not prior.params / 4 <= req.model.params <= prior.params * 4:
            plan.warnings.append(f"{p}the {name} prior comes from a {prior.params:,}-parameter {family}; this model "
                                 f"has {req.model.params:,}: no size law for a {family}, try \"explore\"")
        plan.ideal_lr = lr
        plan.rationale.append(
            f"{p}LR re-anchored: the recipe uses {name}, whose LRs are not in {ref.optimizer}'s units, so the LR "
            f"comes from {name}'s prior for a {family} at batch {plan.batch}: {_fmt(lr)} ({prior.source}); "
            f"the reference LR {_fmt(ref.lr)} is not reused. Sweep around it with \"explore\""
        )
        lo, hi = prior.batch_range
        if not lo <= plan.batch <= hi:
            plan.warnings.append(f"{p}the {name} prior is used outside its data: batch {plan.batch} is outside "
                                 f"{lo}..{hi} ({prior.source.split(' (')[0]})")
        return
    rule = req.rule or _default_rule(name)
    base = ref.lr
    if ref.model_params is not None:
        base *= _size_factor(req, ref.model_params, rule, "the reference", plan, p)
    if not priors.same_units(name, ref.optimizer):
        plan.warnings.append(
            f"{p}no published {name} prior for a {family} model: the {ref.optimizer} LR is reused in {name}'s units "
            "(they differ); sweep it with \"explore\""
        )
    k = plan.k
    if rule == "sqrt":
        plan.ideal_lr = base * math.sqrt(k)
        plan.rationale.append(
            f"{p}LR: sqrt scaling (LAMB section 4.3): {_fmt(base)} x sqrt({_ratio_text(plan)}) = {_fmt(plan.ideal_lr)}"
        )
    else:
        plan.ideal_lr = base * k
        plan.rationale.append(
            f"{p}LR: linear scaling (Goyal et al. 2017): {_fmt(base)} x {_ratio_text(plan)} = {_fmt(plan.ideal_lr)}"
        )


def _plan_lr(plan: _Plan, req: RecommendationRequest, name: str, history: Sequence[BatchSummary],
             evidence: EvidenceModel | None, n: int) -> None:
    p, ref, s = _prefix(plan, n), plan.ref, plan.req
    _scaled_lr(plan, req, name, n)
    if s.lr is None and evidence is not None:
        _apply_evidence(plan, evidence, p)

    caps: list[tuple[float, str]] = []
    explicit = s.lr_cap if s.lr_cap is not None else req.lr_cap
    if explicit is not None:
        caps.append((explicit, f"the LR cap {_fmt(explicit)} given in the request"))
        if explicit < ref.lr and plan.batch <= plan.ref_batch and priors.same_units(name, ref.optimizer):
            plan.warnings.append(f"{p}lr_cap {_fmt(explicit)} is below the reference LR {_fmt(ref.lr)}, which trained "
                                 f"stably at batch {plan.ref_batch} >= {plan.batch}: check the cap")
    diverged = [h for h in history if h.min_diverged_lr is not None and h.batch_size <= plan.batch]
    if diverged:
        worst = min(diverged, key=lambda h: h.min_diverged_lr)  # type: ignore[arg-type, return-value]
        assert worst.min_diverged_lr is not None
        cap = priors.DIVERGENCE_MARGIN * worst.min_diverged_lr
        plan.divergence_caps.append(cap)
        caps.append((cap, f"study history: LR {_fmt(worst.min_diverged_lr)} diverged at batch "
                          f"{worst.batch_size} (<= {plan.batch}), so the cap is "
                          f"{priors.DIVERGENCE_MARGIN} x that = {_fmt(cap)}"))
    if evidence is not None:
        worst_run = evidence.min_diverged_at_or_below(plan.batch)
        if worst_run is not None:
            cap = priors.DIVERGENCE_MARGIN * worst_run.lr
            plan.divergence_caps.append(cap)
            caps.append((cap, f"evidence: run {worst_run.run_id} diverged at LR {_fmt(worst_run.lr)}, batch "
                              f"{worst_run.batch_size} (<= {plan.batch}), so the cap is "
                              f"{priors.DIVERGENCE_MARGIN} x that = {_fmt(cap)}"))
    prior = priors.prior_for(req.model.family, name)
    prior_cap = prior.cap_at(req.model.params) if prior is not None and plan.batch >= prior.cap_min_batch else None
    if s.lr is not None:
        boundary = min(plan.divergence_caps + ([prior_cap] if prior_cap is not None else []), default=None)
        if boundary is not None and s.lr > boundary:
            plan.warnings.append(f"{p}the explicit LR {_fmt(s.lr)} is above the known divergence boundary "
                                 f"{_fmt(boundary)} for batch {plan.batch}: it is kept as given")
    if explicit is None and s.lr is None:
        if prior_cap is None:
            plan.rationale.append(f"{p}no published LR cap for {name} on a {req.model.family} model"
                                  f"{' at this batch' if prior is not None and prior.cap is not None else ''}: "
                                  "none applied (divergence evidence from runs still caps it)")
        else:
            assert prior is not None
            stable = evidence.max_stable_at_or_below(plan.batch) if evidence is not None else None
            if stable is not None and stable > prior_cap:
                plan.rationale.append(f"{p}the model-size cap prior {_fmt(prior_cap)} is raised to {_fmt(stable)}, "
                                      "an LR that trained stably in this study")
                prior_cap = stable
            if prior_cap < ref.lr and priors.same_units(name, ref.optimizer):
                plan.warnings.append(
                    f"{p}the model-size LR cap prior {_fmt(prior_cap)} is below the reference LR {_fmt(ref.lr)}, "
                    "which trained stably: the cap is raised to the reference LR"
                )
                prior_cap = ref.lr
            caps.append((prior_cap, f"the model-size prior for {name} at {req.model.params:,} parameters "
                                    f"({_fmt(prior_cap)}; {prior.cap_source}, GPT-3 size trend)"))
            lo, hi = priors.SIZE_LAW_RANGE
            if req.model.family == "transformer" and not lo <= req.model.params <= hi and plan.ideal_lr > prior_cap / 4:
                plan.warnings.append(
                    f"{p}the LR cap prior is extrapolated outside its data ({req.model.params:,} parameters; the size "
                    f"trend was fitted on {lo:,} to {hi:,}): treat the cap as a guess (family \"other\" has none)"
                )
    plan.lr = plan.ideal_lr
    if caps:
        cap, why = min(caps, key=lambda c: c[0])
        plan.cap = cap
        if plan.ideal_lr > cap:
            plan.lr, plan.capped = cap, True
            plan.rationale.append(f"{p}LR capped at {_fmt(cap)} (LANS section 3.3, LR <= ~1/L): {why}")
            plan.warnings.append(f"{p}LR capped: the scaled LR {_fmt(plan.ideal_lr)} exceeds {_fmt(cap)}")


def _warmup_ratio(plan: _Plan, req: RecommendationRequest, name: str, n: int) -> float:
    """The stage's warmup ratio by the recipe optimizer's policy, before the clamp."""
    p, ref, s, T = _prefix(plan, n), plan.ref, plan.req, plan.steps
    prior = plan.prior
    if prior is not None and s.warmup_scale is None:
        epochs = prior.warmup_epochs_at(plan.batch)
        ratio = epochs / prior.epochs
        plan.rationale.append(f"{p}warmup from the {name} prior: {_fmt(epochs)} of {_fmt(prior.epochs)} "
                              f"{'epochs' if prior.epochs != 1 else 'of the run'} at batch {plan.batch} "
                              f"({'linear-epoch' if prior.warmup == 'linear-epoch' else prior.warmup}) = ratio "
                              f"{_fmt(ratio)}")
        return ratio
    ref_ratio = ref.ratio
    if ref_ratio == 0 and not (ref.warmup_steps is not None and ref.warmup_steps > 0):
        ref_ratio = priors.DEFAULT_REFERENCE_WARMUP_RATIO
        plan.warnings.append(
            f"{p}the reference has no warmup; large batches need one: assuming 1/320 (LAMB's 512 reference)"
        )
    if s.warmup_scale is not None:
        ratio = ref_ratio * s.warmup_scale
        plan.rationale.append(f"{p}warmup ratio {_fmt(ref_ratio)} x {_fmt(s.warmup_scale)} (given scale) = {_fmt(ratio)}")
        return ratio
    k = plan.k
    if ref.warmup_ratio is None and ref.steps is None and ref.warmup_steps:
        # No reference length: warmup in steps is what carries over.
        steps = ref.warmup_steps if name not in ("sgd",) else ref.warmup_steps / k
        ratio = steps / T
        plan.rationale.append(f"{p}warmup: {_fmt(steps)} steps ({'the reference warmup steps, linear-epoch' if name != 'sgd' else 'constant-epoch: the reference warmup examples'}) = ratio {_fmt(ratio)}")
        return ratio
    if name == "sgd":
        # Goyal et al.: 5 epochs at every batch size, so the warmup examples stay fixed.
        ref_warm_steps = ref_ratio * (ref.steps or T * k)
        ratio = ref_warm_steps / k / T
        plan.rationale.append(f"{p}constant-epoch warmup (Goyal et al. 2017: 5 epochs at every batch size): "
                              f"{_fmt(ref_warm_steps)} reference steps x {_ratio_text(plan, inverse=True)} = "
                              f"ratio {_fmt(ratio)}")
        return ratio
    if name == "lars":
        lars = priors.prior_for("cnn", "lars")
        assert lars is not None
        grow = lars.warmup_epochs_at(plan.batch) / lars.warmup_epochs_at(plan.ref_batch)
        ratio = ref_ratio * grow
        plan.rationale.append(f"{p}LARS warmup epochs follow the TPU reference table (5 to 16K, 12 at 32K, 16 at "
                              f"64K): ratio {_fmt(ref_ratio)} x {_fmt(grow)} = {_fmt(ratio)}")
        return ratio
    ratio = ref_ratio * k
    plan.rationale.append(
        f"{p}linear-epoch warmup (LAMB Tables 4, 5): ratio {_fmt(ref_ratio)} x {_fmt(k)} = {_fmt(ratio)}"
    )
    return ratio


def _decay(plan: _Plan, req: RecommendationRequest, name: str) -> dict:
    ref = plan.ref
    own = priors.same_units(name, ref.optimizer)
    shape = req.decay or (ref.decay if own else None) or (plan.prior.decay if plan.prior else None) or "linear"
    out: dict = {"decay": shape}
    if shape == "polynomial":
        out["decay_power"] = req.decay_power or (ref.decay_power if own else None) or DEFAULT_DECAY_POWER
    if shape == "step":
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


def _plan_schedule(plan: _Plan, req: RecommendationRequest, name: str, n: int) -> Stage:
    p, s, T = _prefix(plan, n), plan.req, plan.steps
    ratio = _warmup_ratio(plan, req, name, n)
    if ratio > priors.MAX_WARMUP_RATIO:
        plan.warnings.append(
            f"{p}warmup ratio {_fmt(ratio)} clamped to {priors.MAX_WARMUP_RATIO} (largest published: LANS 42.65%)"
        )
        ratio = priors.MAX_WARMUP_RATIO
    warmup = math.floor(ratio * T + 1e-9)
    if plan.k > 1 and warmup == 0 and T > 1:
        warmup = 1
    decay = _decay(plan, req, name)

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
    elif plan.capped and decay["decay"] == "step":
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
            flat = Stage(batch_size=plan.batch, steps=T, peak_lr=plan.lr, warmup_steps=warmup, const_steps=const,
                         decay_steps=T - warmup - const, warmup_ratio=0, const_ratio=0, **decay)
            ideal = flat.model_copy(update={"peak_lr": plan.ideal_lr, "const_steps": 0,
                                            "decay_steps": T - warmup})
            ideal_area = schedule_area(ideal)
            if ideal_area > 0:
                plan.warnings.append(
                    f"{p}the cap costs {(ideal_area - schedule_area(flat)) / ideal_area:.1%} of the area under the "
                    "LR curve even with the constant phase"
                )
    stage = Stage(
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
    ideal = stage.model_copy(update={"peak_lr": stage.ideal_lr, "const_steps": 0,
                                     "decay_steps": stage.steps - stage.warmup_steps,
                                     "end_lr": min(stage.end_lr, stage.ideal_lr)})
    flat = stage.model_copy(update={"const_steps": 0, "decay_steps": stage.steps - stage.warmup_steps})
    ideal_area = schedule_area(ideal)
    return ideal_area - schedule_area(stage), ideal_area - schedule_area(flat)


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
        stages.append(_plan_schedule(plan, req, name, n))
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
