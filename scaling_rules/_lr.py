"""The stage's peak LR: the reference scaled by the rule, re-anchored on the new optimizer's prior,
moved by the size law, replaced by the study's evidence, then capped (engine rules 1, 3, 6, 9)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from . import priors
from ._plan import _default_rule, _fmt, _Plan, _prefix, _ratio_text
from .evidence import BatchSummary
from .learning import EvidenceModel
from .models import RecommendationRequest


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
    elif evidence is not None:
        # One road for divergence: the per-batch summaries cover every run of the study (and its
        # family); the runs behind the fit are the newest 2,000. Only without summaries do the runs cap.
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


