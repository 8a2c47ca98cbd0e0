"""The recipe engine: a reference setup + a target batch -> a large-batch recipe, with reasons.

One continuous model of large-batch training, evaluated (constants and their sources live in
:mod:`.priors`). Within one optimizer the peak LR, the warmup in samples and the decay are
continuous in the target batch, the model size and the token budget; the same batch typed in
sequences or in tokens gives the same recipe; a target equal to the reference returns the
reference. Every step below leaves a line in the rationale.

1. Batches (:mod:`._plan`). The batch ratio k is counted in tokens where both batches' tokens are
   known and in sequences otherwise, whichever unit was typed.
2. Critical batch (:mod:`._plan`, :mod:`._critical`). B_noise comes from ``reference.noise_scale``,
   ``reference.noise_trajectory`` (B_noise along the reference run), the study's measurement
   (``noise_scale=``), or a prior from ``target.tokens`` (Step Law's B_opt, scaled by a constant fitted
   on the corpus). It gives the examples and steps ratio (McCandlish et al. 2018, eq. 2.11), the "same-loss" budget, batch "auto", and a warning
   past it saying what the extra examples cost, under every budget. A trajectory is integrated: the
   examples at batch B are the reference's examples x weighted by (1 + B/B_noise(x))/(1 +
   B_ref/B_noise(x)), which is the constant formula at B_eq, B_eq + B_ref being the harmonic mean of
   B_noise(x) + B_ref (:mod:`._critical`). Batch "auto" is the critical batch of Zhang et al. 2024:
   B = ``target.max_overhead`` x B_noise (default 0.2: 20% more examples than the minimum; 1.0 is
   B = B_noise, where examples and steps are both 2x their minimum). Batch "ramp" is a batch-size
   warmup: from ``target.min_batch_size`` (else the reference's batch) the batch doubles where
   max_overhead x the trajectory's lower bound (``noise_scale_low``, else ``noise_scale``) passes twice
   the batch, up to ``target.max_batch_size``; one stage per batch, each covering its share of the
   reference run, the LR moved with the batch by step 5's regime rule and continued (step 7), not
   re-warmed: one LR schedule over the run's examples, carried piecewise by the stages. Without a
   measured trajectory, ``target.tokens`` gives a growing prior: Step Law's B_opt at the tokens seen
   so far, stated as a prior.
3. Optimizer (:mod:`._choice`): advice with evidence. A user-fixed optimizer is kept. Otherwise the
   reference's optimizer is kept until the target passes both the batch where the papers show that
   family failing (AdamW 16K: LAMB Table 8; LARS on attention 16K: Table 2; SGD beyond 8K: Goyal
   et al.; LAMB beyond 32K, 64K mixed) and the reference's own batch; a switch names the
   alternative and the counter-evidence (Nado et al. 2021). LAMB becomes LANS where the LR cap binds.
   The study's runs teach within the recipe's LR units only (:meth:`.EvidenceModel.in_units_of`: a
   study that switched AdamW to LAMB holds LRs ~10x apart); where another optimizer's sweep beat this
   one's at a batch both swept, a warning names it, and the optimizer is kept.
4. Warmup (:mod:`._phases`), per family in the literature's units: constant samples for AdamW and
   constant epochs for SGD; for LARS, epochs x (1 + B/B_w) / (1 + B_ref/B_w), about constant well
   below B_w and growing past it as the LARS reference codes do (B_w fitted on the corpus,
   ``priors.LARS_WARMUP_BATCH``); LAMB/LANS's linear-epoch rule (Tables 4, 5; LANS Table 1) up to
   96K and constant beyond. A switch follows the reference family's rule up to the switch and the new
   one's beyond, so the warmup in samples does not jump. A reference without warmup gets its
   family's default (5 of Goyal's 90 epochs; BERT's 1%; LAMB's 1/320), stated.
5. LR (:mod:`._lr`): the reference moved along f(B)/f(B_ref), f(B) = (1 + B_noise/B)^-e, e = 1 for
   SGD/LARS (McCandlish eq. 2.6-2.7) and 1/2 for the Adam family: linear or sqrt well below the
   critical batch, flat beyond it, its log averaged over the x/÷3 a given B_noise places the bend
   within (the prior a study's fit starts from); with no B_noise the papers' linear/sqrt, the regime assumed
   stated. Where the optimizer's LR units change, the LR is re-anchored on the new optimizer's prior
   (LARS: the TPU code's first row, its step function reported beside). Model size moves the LR by
   N^SIZE_EXPONENT at a fixed batch, or by muP's 1/width where widths are given; batch "auto" with a
   budget uses DeepSeek LLM's compute-optimal batch and LR. A study's runs replace the rule by the curve
   they fit (:mod:`.learning`), whose exponent's prior is the rule's e (1 or 1/2), so runs that say
   nothing of the exponent (one batch size) leave the rule's scaling as it was.
6. Caps (:mod:`._lr`): the layer-wise cap 1/L (LANS section 3.3) and the AdamW cap of LAMB Table 8,
   which depends on the warmup (3e-4 diverged with 10% warmup and trained with 20%) and fades in
   below 16K; the divergences the study saw. A binding cap adds LANS eq. 9's constant phase.
7. Schedules (:mod:`._phases`, :mod:`.schedule`): linear, cosine, polynomial, step, multistep
   (DeepSeek) and warmup-stable-decay. A stage that changes the sequence length re-warms (LAMB
   section 4.1); a batch ramp at the same length is one schedule over the run's examples (:mod:`._ramp`,
   GPT-3's batch ramp): warmup over its first examples, the decay over the rest of the run, whatever
   stage it falls in, each stage's LR that shape times its own peak, so the LR moves with the batch.
8. Weight decay (:mod:`._weight_decay`): passed through, saying how AdamW's timescale
   tau = B/(lr x wd) moved; ``weight_decay_rule: "timescale"`` keeps it fixed (Wang & Aitchison 2024).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from . import optimizers, priors
from ._choice import choose_optimizer
from ._critical import prior_trajectory
from ._lr import _plan_lr
from ._phases import _plan_schedule, area_gaps, warmup_ratio
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
    auto_from_budget,
    examples_ratio,
    noise_of,
)
from ._ramp import head_warmup, ramp_stages
from ._weight_decay import weight_decay
from .evidence import BatchSummary
from .learning import EvidenceModel, RunEvidence
from .models import OptimizerConfig, Recipe, RecommendationRequest
from .recipe import validated

__all__ = ["RecipeError", "area_gaps", "auto_batch_size", "examples_ratio", "recommend"]


def _optimizer_config(name: str, lr: float, req: RecommendationRequest, plan: _Plan,
                      notes: list[str], warns: list[str]) -> OptimizerConfig:
    ref = plan.ref
    about, ref_about = optimizers.info(name), optimizers.info(ref.optimizer)  # the optimizer table
    # Adam's betas and eps carry over between optimizers that both have them, whatever their LR units
    own = priors.same_units(name, ref.optimizer) or (about.betas and ref_about.betas)
    if about.betas:
        betas = ref.betas if (own and ref.betas is not None) else (0.9, 0.999)
        eps = ref.eps if (own and ref.eps is not None) else about.default_eps
        if own and (ref.betas is not None or ref.eps is not None):
            notes.append(f"betas {betas} and eps {eps:g}: the reference's, passed through")
        if req.adam_hparams == "sde":
            betas, eps = _sde(plan, betas, eps, notes, warns)
        return validated(
            OptimizerConfig,
            name=name, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay(0.01, name, req, plan, notes),
            exclude_from_weight_decay=["bias", "LayerNorm", "layer_norm", "norm"],
        )
    momentum = ref.momentum if (ref.momentum is not None and ref_about.momentum) else 0.9
    if about.trust_coefficient:
        return validated(
            OptimizerConfig,
            name=name, lr=lr, betas=None, eps=about.default_eps, weight_decay=weight_decay(5e-5, name, req, plan, notes),
            momentum=momentum, trust_coefficient=0.001, exclude_from_weight_decay=["bias", "bn", "BatchNorm", "norm"],
        )
    return validated(
        OptimizerConfig,
        name=name, lr=lr, betas=None, eps=about.default_eps, weight_decay=weight_decay(1e-4, name, req, plan, notes),
        momentum=momentum, exclude_from_weight_decay=["bias", "bn", "BatchNorm", "norm"],
    )


def _history_in_units(history: Sequence[BatchSummary], name: str, unnamed: str,
                      notes: list[str]) -> Sequence[BatchSummary]:
    """The summaries whose LRs are in ``name``'s units (those that record no units are all kept: the
    caller falls back on the runs where they may mix units). A divergence in other units is no boundary
    here: a LAMB LR is several times an AdamW one."""
    units = optimizers.units_of(name)
    mine: list[BatchSummary] = []
    others: set[str] = set()  # the units of the divergences left out
    for h in history:
        theirs = None if h.units is None else optimizers.summary_units(h.units, unnamed)
        if theirs is None or theirs == units:
            mine.append(h)
        elif h.min_diverged_lr is not None:
            others.add(theirs)
    if others:
        notes.append(f"the study's divergences in other LR units ({', '.join(sorted(others))}) do not cap {name}'s "
                     "LR: the per-batch summaries keep each LR units apart, and only those in "
                     f"{name}'s ({units}) bound it")
    return mine


def _ramp_on_the_prior(req: RecommendationRequest) -> bool:
    """Batch "ramp" with no measured trajectory but a token budget: the prior read along the run."""
    t, ref = req.target, req.reference
    return (t is not None and t.batch_size == "ramp" and ref is not None and ref.noise_trajectory is None
            and ref.noise_scale is None and t.tokens is not None and ref.seq_len is not None
            and ref.steps is not None)


def _ramp_text(req: RecommendationRequest, plans: list[_Plan]) -> str:
    t = req.target
    assert t is not None
    batches = " -> ".join(str(p.req.batch_size) for p in plans)
    return (f"batch ramp {batches}: from {plans[0].req.batch_size} (target.min_batch_size, else the reference's batch), the "
            f"batch doubles where the critical batch's lower bound, max_overhead {_fmt(t.overhead)} x B_noise_low "
            "along reference.noise_trajectory, passes twice the batch"
            f"{f', up to target.max_batch_size {t.max_batch_size}' if t.max_batch_size else ''}; each stage keeps "
            "its share of the reference run's examples (progress read at the same loss), the LR moves with the batch "
            "by the regime rule (about sqrt x per doubling for the Adam family, the regime curve for SGD/LARS) "
            "and is not warmed up again: the LR schedule is one schedule over the run's examples, not the stages'"
            + ("" if len(plans) > 1 else ": here it never passes twice the starting batch, so the ramp is one "
               "stage (a smaller min_batch_size or a larger max_overhead ramps)"))


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
        history: what past runs of this study taught, per batch size and LR units (may be empty).
        evidence: the past runs themselves (or a fitted :class:`EvidenceModel`): the LR-vs-batch
            curve is fitted on them and replaces the rule's LR (issue #7).
        direction: whether the study's metric is minimised or maximised.
        noise_scale: a gradient noise scale measured in the study (used when the request's
            reference gives none).

    Raises:
        pydantic.ValidationError: a malformed request (names the field).
        RecipeError: a request that is valid but contradicts itself (names the field).
    """
    # The model's pydantic-core validator directly: what model_validate calls, less its Python layer.
    req = request if isinstance(request, RecommendationRequest) else \
        RecommendationRequest.__pydantic_validator__.validate_python(request)
    if req.target is not None and req.target.batch_size == "auto" and req.reference is not None \
            and req.reference.noise_scale is None and req.reference.noise_trajectory is None \
            and noise_scale is not None:
        req = req.model_copy(update={"reference": req.reference.model_copy(update={"noise_scale": noise_scale})})
    prior_ramp = _ramp_on_the_prior(req)
    if prior_ramp:
        ref = req.reference
        assert ref is not None and req.target is not None and req.target.tokens is not None
        req = req.model_copy(update={"reference": ref.model_copy(
            update={"noise_trajectory": prior_trajectory(ref, req.target.tokens)})})
    stage_reqs = _stage_requests(req)
    if isinstance(evidence, EvidenceModel):
        evidence_model: EvidenceModel | None = evidence
    else:
        evidence_model = EvidenceModel.from_runs(evidence, direction=direction) if evidence else None  # type: ignore[arg-type]
    plans: list[_Plan] = []
    done = 0.0  # the share of the top-level reference run before this stage
    n = len(stage_reqs)
    for i, s in enumerate(stage_reqs):
        ref = s.reference or req.reference
        assert ref is not None
        span = (done, done + s.share) if (s.share is not None and s.reference is None) else None
        done += s.share or 0.0
        plans.append(_Plan(index=i, req=s, ref=ref, span=span, prefix=_prefix(i, n)))
    rationale: list[str] = []
    warnings: list[str] = []
    if req.target is not None and req.target.batch_size == "ramp":
        rationale.append(_ramp_text(req, plans))
        if prior_ramp:
            rationale.append("the ramp follows a prior, not a measurement: no reference.noise_trajectory, so "
                             "B_noise after a fraction f of the run is the token-budget prior at f x target.tokens "
                             "(Step Law's B_opt, Li et al. 2025, scaled); measure the trajectory to replace it")
    if req.target is not None and req.target.batch_size == "auto":
        t = req.target
        bn = noise_of(req.reference)  # type: ignore[arg-type]
        if bn is None:
            _, law_lr, law_notes, law_warns = auto_from_budget(req)
            plans[0].law_lr = law_lr
            rationale += law_notes
            warnings += law_warns
        else:
            limits = f" within the limits {t.min_batch_size or 1}..{t.max_batch_size or 'none'}" \
                if (t.min_batch_size or t.max_batch_size) else ""
            b = plans[0].req.batch_size
            what = "B_noise" if req.reference.noise_trajectory is None else "B_eq, the trajectory's constant"  # type: ignore[union-attr]
            rationale.append(
                f"batch size {b} (auto): the critical batch of Zhang et al. 2024, max_overhead {_fmt(t.overhead)} x "
                f"{what} {_fmt(bn)}{limits}: the examples overhead E(B)/E_min - 1 = B/B_noise accepted is "
                f"{t.overhead:.3g} ({'target.max_overhead' if t.max_overhead is not None else 'the default'}); at "
                f"batch {b} examples are {1 + b / bn:.3g}x and steps {1 + bn / b:.3g}x their minimum (McCandlish et "
                "al. 2018, eq. 2.11): a larger batch saves steps at more examples, a smaller one the reverse")

    for plan in plans:
        _resolve_batches(plan, n)
        _plan_noise(plan, req, n, noise_scale)
        _plan_steps(plan, req, n)
        p = plan.prefix
        if plan.k < 1:
            plan.warnings.append(f"{p}the target batch is smaller than the reference's (ratio {_fmt(plan.k)}): this "
                                 "scales down, and the papers' rules were measured scaling up")
        if plan.steps < 10:
            plan.warnings.append(f"{p}the stage has only {plan.steps} step(s): too short for a warmup and a decay "
                                 "to mean anything; check the steps or the budget")
    for prev, plan in itertools.pairwise(plans):
        # A batch ramp: the same sequence length, a larger batch, the same reference.
        if plan.seq_len == prev.seq_len and plan.batch_x > prev.batch_x and plan.req.reference is None:
            plan.ramp = prev.ramp_next = True
    name, notes, warns = choose_optimizer(req, plans)
    unnamed = priors.canonical(plans[0].ref.optimizer)
    history = _history_in_units(history, name, unnamed, notes)
    if evidence_model is not None:
        if req.optimizer is None:
            warns += evidence_model.better_elsewhere(name, unnamed)
        mine = evidence_model.in_units_of(name, unnamed, req.rule)
        if len(mine.runs) != len(evidence_model.runs) and any(h.units is None and h.min_diverged_lr is not None for h in history):
            # Summaries that do not record their units keep one smallest diverged LR over every optimizer: in a
            # study of two LR units it may be another optimizer's. The runs in this one's units cap instead.
            history = [h for h in history if h.units is not None]
            notes.append(f"the study holds runs of optimizers with other LR units: its divergences cap {name}'s LR "
                         f"from the {len(mine.runs)} runs in {name}'s units, not from the per-batch summaries")
        evidence_model = mine
    for i, plan in enumerate(plans):
        if plan.ramp_next and not plan.ramp:
            head_warmup(plan, plans, req, name, n, evidence_model)
        else:
            plan.warmup_ratio = warmup_ratio(plan, req, name, n, evidence_model)
            # A ramp stage is not warmed up again: it trains on the warmup its run had (LAMB Table 8's cap).
            plan.run_warmup_ratio = plans[i - 1].run_warmup_ratio if plan.ramp else plan.warmup_ratio
        _plan_lr(plan, req, name, history, evidence_model, n)
    if name == "lamb" and req.optimizer is None and any([p.capped for p in plans]):
        name = "lans"
        notes = [n_ for n_ in notes if not n_.startswith("optimizer lamb")]
        notes.append("optimizer lans: the LR cap binds; LANS (Nesterov + per-block normalised gradients) trained "
                     "BERT-Large at 96K/33K with a capped LR and a constant phase (LANS Table 1); same LR units "
                     "and warmup as LAMB, so nothing else changes")
    rationale += notes
    stages = []
    for plan in plans:
        if plan.ramp_next and not plan.ramp:
            stages += ramp_stages(plan, plans, req, name)
        elif not plan.ramp:
            stages.append(_plan_schedule(plan, req, name, n, evidence_model))
        rationale += plan.rationale
        warnings += plan.warnings
    warnings += warns
    if req.rule == "linear" and optimizers.info(name).betas:
        warnings.append("linear LR scaling with an adaptive optimizer: the LAMB paper found sqrt scaling right")
    if n > 1:
        rationale.append("stages that change the sequence length re-warm from zero (LAMB section 4.1, mixed-batch "
                         "training); a batch ramp at the same length continues the schedule")
    if evidence_model is not None:
        warnings += [f"evidence conflict: {c}" for c in evidence_model.conflicts]
    total = sum([s.steps for s in stages])
    opt_notes: list[str] = []
    config = _optimizer_config(name, stages[0].peak_lr, req, plans[0], opt_notes, warnings)
    rationale += opt_notes
    return validated(
        Recipe,
        optimizer=config,
        stages=stages,
        total_steps=total,
        rationale=rationale,
        warnings=warnings,
    )
