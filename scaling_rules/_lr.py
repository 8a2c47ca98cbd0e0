"""The stage's peak LR: the reference moved along the regime curve (where the batch sits against the
critical batch), re-anchored on the new optimizer's prior, moved by the size or width law, replaced by
the study's evidence, then capped (see :mod:`.engine`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from . import optimizers, priors
from ._curve import regime_coordinate
from ._plan import _a, _default_rule, _fmt, _Plan, _ratio_text
from .evidence import BatchSummary
from .learning import EvidenceModel, ScalingFit
from .models import RecommendationRequest


def _apply_evidence(plan: _Plan, evidence: EvidenceModel, p: str) -> None:
    """Replace the rule's LR by what the study's runs say (issue #7): the fitted scaling curve, or
    else a re-anchoring on the best-measured nearby batch size."""
    target = plan.batch
    rule_lr = plan.ideal_lr
    # The curve bends where the rule does: at the plan's critical batch, when one is known.
    fit = evidence.fit_for(plan.noise)
    used = evidence.run_ids()
    ids = f"runs {', '.join(map(str, used[:12]))}{' ...' if len(used) > 12 else ''}" if used else "past runs"
    if fit is not None:
        if plan.noise is None:
            _bend_hint(plan, evidence, target, p)
        plan.ideal_lr = fit.optimum(target)
        plan.rationale.append(
            f"{p}evidence ({ids}; {fit.n_runs} completed at batch sizes "
            f"{', '.join(map(str, fit.batch_sizes))}): LR ~ batch^a with a = {fit.exponent:.3f} +- "
            f"{fit.exponent_sd:.3f} (prior {fit.prior_exponent:g}, the {evidence.rule} rule's; data weight "
            f"{fit.data_weight:.2f}){_bend_text(fit, evidence, target)}; best LR at "
            f"{target} is {_fmt(plan.ideal_lr)}, the rule gave {_fmt(rule_lr)} ({plan.ideal_lr / rule_lr - 1:+.1%})"
        )
        return
    anchor = evidence.nearest_measured_batch(target)
    best = evidence.best_run(anchor) if anchor is not None else None
    if best is None:
        return
    plan.ideal_lr = best.lr * regime_factor(target, best.batch_size, plan.noise, evidence.rule)
    plan.rationale.append(
        f"{p}evidence: re-anchored on run {best.run_id} (batch {best.batch_size}, LR {_fmt(best.lr)}, the "
        f"best measured near {target}) along the {evidence.rule} regime curve: {_fmt(plan.ideal_lr)}, the reference rule gave "
        f"{_fmt(rule_lr)} ({plan.ideal_lr / rule_lr - 1:+.1%})"
    )


def _bend_text(fit: ScalingFit, evidence: EvidenceModel, target: int) -> str:
    """Where the fitted curve stops growing as batch^a, in words, and what one power law through the same
    runs gives (nothing where no critical batch bent it)."""
    if fit.measured_bend is None:
        return ""
    line = evidence.fit
    return (f", bent flat at the critical batch: B_noise {_fmt(fit.measured_bend)} as measured, "
            f"{_fmt(fit.bend)} as the runs place it (the curve (B / (1 + B/B_noise))^a)"
            + ("" if line is None else f"; one power law through the same runs gives {_fmt(line.optimum(target))}"))


def _bend_hint(plan: _Plan, evidence: EvidenceModel, target: int, p: str) -> None:
    """Where the runs themselves show a bend but no critical batch is known: said, not used."""
    shown = evidence.shown_bend()
    if shown is None or target <= max(shown.batch_sizes):
        return
    plan.warnings.append(
        f"{p}evidence: the runs' best LRs rise more slowly at each larger batch (a bend near batch "
        f"{_fmt(shown.bend)}, F-test at 5%): bent there, the curve would give {_fmt(shown.optimum(target))} at "
        f"{target}; the power law, past the largest batch run ({max(shown.batch_sizes)}), may overshoot. A "
        "measured critical batch (reference.noise_scale or noise_trajectory, or the study's) bends the "
        "recipe's curve; \"explore\" at the target measures it")


def regime_factor(batch: float, ref_batch: float, noise: float | None, rule: str) -> float:
    """f(B) / f(B_ref) with f(B) = (1 + B_noise/B)^-e: e = 1 is McCandlish et al.'s eq. 2.6-2.7 for
    SGD-like optimizers (linear well below B_noise, flat beyond), e = 1/2 its Adam-family analogue (sqrt
    well below, flat beyond; Li et al. 2024 find the optimum even falls past B_noise). Continuous in
    every input; 1 at B = B_ref; with no B_noise the papers' pure linear or sqrt.

    A given B_noise places the bend only within x/÷3 (``priors.critical_batch_spread``), so ln f(B)/f(B_ref)
    is averaged over that spread: the mean a study's fit gives when its runs say nothing of the bend, so
    such runs leave the rule's answer where it is. The limits are unchanged; the average is smoother,
    within 7% of the exact-bend factor for e = 1/2 and 15% for e = 1 (6.9% and 14.2% at worst, B_noise =
    B_ref with B far beyond it)."""
    if batch == ref_batch:
        return 1.0
    if noise is None:
        r = batch / ref_batch
    else:
        # ln f(B)/f(B_ref) = e (h_N(B) - h_N(B_ref)), the fitted curve's own coordinate, averaged over N
        r = math.exp(math.fsum(w * float(regime_coordinate(batch, n) - regime_coordinate(ref_batch, n))
                               for n, w in priors.critical_batch_spread(noise)))
    e = optimizers.rule_exponent(rule)
    # math.sqrt, not r ** 0.5: the two differ in the last bit, and sqrt's bits are every recipe's.
    return math.sqrt(r) if e == 0.5 else r ** e


# Where a prior's own data grow otherwise than its family's default rule.
_PRIOR_LAW = {"lars": "sqrt from the TPU code's 16K setting (its own settings grow 25 -> 34 from 16K to 32K, "
                      "about sqrt)"}


def _regime_text(plan: _Plan, rule: str, source: str) -> str:
    law = source or ("linear (Goyal et al. 2017)" if rule == "linear" else "sqrt (LAMB section 4.3)")
    if plan.noise is None:
        return (f"{law}; regime assumed: well below the critical batch, because none is known (no "
                "reference.noise_scale, no study measurement, no target.tokens), so the papers' default holds")
    x = plan.batch_x / plan.noise
    where = ("well below" if x < 0.1 else "around" if x <= 10 else "beyond")
    return (f"{law} bent by the critical batch B_noise = {_fmt(plan.noise)} ({plan.noise_src.split(' (')[0]}): "
            f"ratio f(B)/f(B_ref) with f(B) = (1 + B_noise/B)^-{'1' if rule == 'linear' else '1/2'} (McCandlish "
            f"et al. 2018, eq. 2.6-2.7{'' if rule == 'linear' else ', Adam-family analogue'}), its log averaged "
            f"over B_noise x/÷{math.exp(priors.CRITICAL_BATCH_SD):.3g} (how far a given critical batch places the "
            "bend); B/B_noise = "
            f"{x:.3g}: {where} it ({'close to ' + rule if x < 0.1 else 'flat' if x > 10 else 'in between'})")


def _size_factor(req: RecommendationRequest, from_params: int, from_width: int | None, what: str,
                 plan: _Plan, p: str, name: str) -> float:
    """LR factor for moving from the model ``what`` was measured on to the request's model."""
    to, width = req.model.params, req.model.width
    if req.model.shared_weights and width is None:
        plan.warnings.append(f"{p}the model shares weights across layers: its parameter count undercounts its "
                             "width and compute, so a size law on parameters misleads; give model.width (and "
                             "reference.model_width) for a muP-style transfer")
    if width is not None and from_width is not None:
        if width == from_width:
            return 1.0
        if name in ("sgd", "lars"):
            plan.rationale.append(f"{p}width {from_width} -> {width}: muP keeps SGD's hidden-layer LR across "
                                  "width (Yang et al. 2022), so the LR is not moved")
            return 1.0
        factor = from_width / width
        plan.rationale.append(f"{p}width {from_width} -> {width}: LR x {factor:.4g}, muP's Adam rule (hidden "
                              "layers' LR ~ 1/width, Yang et al. 2022); exact for a muP-parameterised model, a "
                              "trend for a standard one")
        return factor
    if from_params == to:
        return 1.0
    if req.model.family != "transformer":
        plan.warnings.append(f"{p}{what} was measured on {from_params:,} parameters and this model has {to:,}: no "
                             f"published size law for {_a(req.model.family)} model, so the LR is not moved; try "
                             "\"explore\"")
        return 1.0
    a = priors.size_law_exponent()
    factor = (to / from_params) ** a
    plan.warnings.append(
        f"{p}{what} was measured on {from_params:,} parameters, this model has {to:,}: LR x {factor:.3g} by the "
        f"size law at a fixed batch (LR ~ N^{a:.3g}, published LLM families trained at one batch); a size law "
        "is a trend, not a tuned LR: try \"explore\""
    )
    lo, hi = priors.SIZE_LAW_RANGE
    if not (lo <= to <= hi and lo <= from_params <= hi):
        plan.warnings.append(f"{p}the size law is extrapolated outside its data ({lo:,} to {hi:,} parameters)")
    return factor


def _scaled_lr(plan: _Plan, req: RecommendationRequest, name: str, n: int) -> None:
    """The ideal LR before caps: the reference moved along the regime curve, or the new optimizer's prior."""
    p, ref, s = plan.prefix, plan.ref, plan.req
    family = req.model.family
    if s.lr is not None:
        plan.ideal_lr = s.lr
        plan.rationale.append(f"{p}peak LR {_fmt(s.lr)}, given explicitly")
        return
    if plan.law_lr is not None and name == "adamw" and family == "transformer":
        plan.ideal_lr = plan.law_lr
        plan.rationale.append(f"{p}peak LR {_fmt(plan.law_lr)} from DeepSeek LLM's lr_opt(C) (AdamW, the "
                              "optimizer its law was fitted with); the reference LR is not used")
        return
    prior = priors.prior_for(family, name)
    own = priors.same_units(name, ref.optimizer)  # the reference's LR is in the recipe optimizer's units
    if not own and prior is not None:
        plan.prior = prior
        lr = prior.lr * regime_factor(plan.batch_x, prior.batch, plan.noise, prior.rule)
        if family == "transformer":
            lr *= _size_factor(req, prior.params, None, f"the {name} prior", plan, p, name)
        elif not prior.params / 4 <= req.model.params <= prior.params * 4:
            plan.warnings.append(f"{p}the {name} prior comes from a {prior.params:,}-parameter {family} model; this model "
                                 f"has {req.model.params:,}: no size law for {_a(family)} model, try \"explore\"")
        plan.ideal_lr = lr
        plan.rationale.append(
            f"{p}LR re-anchored: the recipe uses {name}, whose LRs are not in {ref.optimizer}'s units, so the LR "
            f"comes from {name}'s prior for {_a(family)} model at batch {plan.batch}: {_fmt(lr)} ({prior.source}; "
            f"{_regime_text(plan, prior.rule, _PRIOR_LAW.get(name, ''))}); the reference LR {_fmt(ref.lr)} is not reused. Sweep around "
            "it with \"explore\""
        )
        if name == "lars":
            code_lr, code_warm = priors.lars_tpu_setting(plan.batch)
            plan.rationale.append(f"{p}the TPU reference code itself would use LR {_fmt(code_lr)} with {_fmt(code_warm)} "
                                  "warmup epochs at this batch (its settings are a step function of the batch)")
        lo, hi = prior.batch_range
        if not lo <= plan.batch <= hi:
            plan.warnings.append(f"{p}the {name} prior is used outside its data: batch {plan.batch} is outside "
                                 f"{lo}..{hi} ({prior.source.split(' (')[0]})")
        return
    rule = req.rule or _default_rule(name)
    base = ref.lr
    if ref.model_params is not None or (ref.model_width is not None and req.model.width is not None):
        base *= _size_factor(req, ref.model_params or req.model.params, ref.model_width, "the reference", plan, p,
                             name)
    elif req.model.shared_weights and req.model.width is None:
        _size_factor(req, req.model.params, None, "the reference", plan, p, name)
    if not own:
        plan.warnings.append(
            f"{p}no published {name} prior for {_a(family)} model: the {ref.optimizer} LR is reused in {name}'s units "
            "(they differ); sweep it with \"explore\""
        )
    factor = regime_factor(plan.batch_x, plan.ref_batch_x, plan.noise, rule)
    plan.ideal_lr = base * factor
    if plan.batch_x == plan.ref_batch_x:
        plan.rationale.append(f"{p}LR {_fmt(plan.ideal_lr)}: the target batch is the reference's, so the "
                              "reference's LR is kept")
        return
    plan.rationale.append(
        f"{p}LR: {_regime_text(plan, rule, '')}: {_fmt(base)} x {factor:.6g} (batch {_ratio_text(plan)}) = "
        f"{_fmt(plan.ideal_lr)}"
    )


def _prior_cap(req: RecommendationRequest, name: str, plan: _Plan) -> tuple[float, Callable[[], str]] | None:
    """The model-size (and, for AdamW, warmup- and batch-aware) cap prior, continuous in its inputs, and
    what gives its source's text (called only where the cap binds, see _plan_lr)."""
    prior = priors.prior_for(req.model.family, name)
    if prior is None or prior.cap is None:
        return None
    cap = prior.cap_at(req.model.params)
    assert cap is not None
    if name in ("adamw", "adam") and req.model.family == "transformer":
        size = cap / prior.cap
        cap = priors.adamw_table8_cap(plan.batch_x, plan.run_warmup_ratio) * size
        warmup, batch = plan.run_warmup_ratio, plan.batch
        return cap, lambda: f"{prior.cap_source}; at warmup ratio {_fmt(warmup)} and batch {batch}: {_fmt(cap)}"
    return cap, lambda: prior.cap_source


def _plan_lr(plan: _Plan, req: RecommendationRequest, name: str, history: Sequence[BatchSummary],
             evidence: EvidenceModel | None, n: int) -> None:
    p, ref, s = plan.prefix, plan.ref, plan.req
    _scaled_lr(plan, req, name, n)
    if s.lr is None and evidence is not None:
        _apply_evidence(plan, evidence, p)

    # (cap, why): the why of a cap that does not bind is never shown, so the prior's (on every recipe
    # that has one) is a callable, formatted only for the binding cap.
    caps: list[tuple[float, str | Callable[[], str]]] = []
    explicit = s.lr_cap if s.lr_cap is not None else req.lr_cap
    if explicit is not None:
        caps.append((explicit, f"the LR cap {_fmt(explicit)} given in the request"))
        if explicit < ref.lr and plan.batch <= plan.ref_batch and priors.same_units(name, ref.optimizer):
            plan.warnings.append(f"{p}lr_cap {_fmt(explicit)} is below the reference LR {_fmt(ref.lr)}, which trained "
                                 f"stably at batch {plan.ref_batch} >= {plan.batch}: check the cap")
    diverged = [h for h in history if h.min_diverged_lr is not None and h.batch_size <= plan.batch] if history else []
    if diverged:
        worst = min(diverged, key=lambda h: h.min_diverged_lr)  # type: ignore[arg-type, return-value]
        assert worst.min_diverged_lr is not None
        cap = priors.DIVERGENCE_MARGIN * worst.min_diverged_lr
        plan.divergence_caps.append(cap)
        # The engine kept the rows in the recipe's units (and those that record none, mixing every optimizer's)
        units = "" if worst.units is None else f" in {name}'s LR units ({optimizers.units_of(name)})"
        caps.append((cap, f"study history{units}: LR {_fmt(worst.min_diverged_lr)} diverged at batch "
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
    found = _prior_cap(req, name, plan)
    prior_cap, cap_source = found if found is not None else (None, None)
    if s.lr is not None:
        boundary = min(plan.divergence_caps + ([prior_cap] if prior_cap is not None else []), default=None)
        if boundary is not None and s.lr > boundary:
            plan.warnings.append(f"{p}the explicit LR {_fmt(s.lr)} is above the known divergence boundary "
                                 f"{_fmt(boundary)} for batch {plan.batch}: it is kept as given")
    if explicit is None and s.lr is None:
        if prior_cap is None:
            plan.rationale.append(f"{p}no published LR cap for {name} on {_a(req.model.family)} model: "
                                  "none applied (divergence evidence from runs still caps it)")
        else:
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
            caps.append((prior_cap, lambda value=prior_cap, source=cap_source: (
                f"the model-size prior for {name} at {req.model.params:,} parameters ({_fmt(value)}; {source()}, "
                "GPT-3 size trend)")))
            lo, hi = priors.SIZE_LAW_RANGE
            if req.model.family == "transformer" and not lo <= req.model.params <= hi and plan.ideal_lr > prior_cap / 4:
                plan.warnings.append(
                    f"{p}the LR cap prior is extrapolated outside its data ({req.model.params:,} parameters; the size "
                    f"trend was fitted on {lo:,} to {hi:,}): treat the cap as a guess (family \"other\" has none)"
                )
    plan.lr = plan.ideal_lr
    if caps:
        cap, why = caps[0] if len(caps) == 1 else min(caps, key=lambda c: c[0])
        plan.cap = cap
        if plan.ideal_lr > cap:
            plan.lr, plan.capped = cap, True
            if not isinstance(why, str):
                why = why()
            plan.rationale.append(f"{p}LR capped at {_fmt(cap)} (LANS section 3.3, LR <= ~1/L): {why}")
            plan.warnings.append(f"{p}LR capped: the scaled LR {_fmt(plan.ideal_lr)} exceeds {_fmt(cap)}")


