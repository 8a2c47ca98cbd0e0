"""A stage being planned: its batches in sequences and tokens, its steps, where it sits against the
critical batch, and what that predicts (see :mod:`.engine`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import optimizers, priors
from ._critical import Trajectory, ramp_batches
from .models import DEFAULT_MAX_OVERHEAD, RecommendationRequest, Reference, StageRequest
from .priors import Prior
from .recipe import validated

__all__ = ["RecipeError", "auto_batch_size", "examples_ratio"]


class RecipeError(ValueError):
    """A request that is well-formed but cannot be turned into a recipe; names the field."""


@dataclass(slots=True)  # slots: each step reads and sets the plan's fields dozens of times per recipe
class _Plan:
    """One stage being worked out, with the notes that explain it."""

    index: int
    req: StageRequest
    ref: Reference
    prefix: str = ""  # "stage i: " before the stage's notes where there are several stages (see _prefix)
    batch: int = 0  # sequences
    tokens: int | None = None
    seq_len: int | None = None
    ref_batch: int = 0
    # The batches in sequences before rounding (a batch typed in tokens need not be a whole number of
    # sequences): the ratio k is theirs, so a recipe is the same whichever unit was typed.
    batch_x: float = 0.0
    ref_batch_x: float = 0.0
    k: float = 1.0  # batch ratio target / reference (tokens and sequences agree where seq_len does)
    k_unit: str = "sequences"
    noise: float | None = None  # critical batch B_noise, in sequences
    noise_src: str = ""
    warmup_ratio: float = 0.0  # decided before the LR (the AdamW cap depends on it)
    run_warmup_ratio: float = 0.0  # the warmup the stage trains on: its own, or a ramp's first stage's
    ramp: bool = False  # continues the previous stage's schedule (a batch ramp at the same seq_len)
    ramp_next: bool = False  # the next stage continues this one's schedule (one over the ramp's examples)
    switch_at: float | None = None  # batch (sequences) where the recipe left the reference's optimizer
    ref_steps: float | None = None  # the reference steps this stage scales from (a share of them)
    law_lr: float | None = None  # a compute-optimal law's LR (batch_size "auto" with a budget)
    span: tuple[float, float] | None = None  # the reference examples a ramp stage covers (trajectory units)
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


def _a(family: str) -> str:
    """The family with its article, for rationale text ("a cnn", "an unlisted-family")."""
    return "an unlisted-family" if family == "other" else f"a {family}"


# A number in the rationale (6 significant digits). The bound ``str.format`` is called in C: a recipe
# formats a dozen numbers or more, and a Python-level wrapper per number showed in the engine's profile.
_fmt = "{:.6g}".format


def _default_rule(optimizer: str) -> str:
    # The optimizer table's rule. LARS (momentum SGD with a per-layer trust ratio) is linear as SimCLR,
    # BYOL and MAE's linear probe scale it (base x B/256); the TPU reference's 25 -> 34 -> 41 from 16K to
    # 64K is the flattening past the critical batch that the regime curve gives once B_noise is known.
    return optimizers.info(optimizer).lr_rule


def examples_ratio(batch: float, ref_batch: float, noise_scale: float) -> float:
    """E(B)/E(B_ref) at the same loss: (1 + B/B_noise)/(1 + B_ref/B_noise) (McCandlish eq. 2.11)."""
    return (1 + batch / noise_scale) / (1 + ref_batch / noise_scale)


def auto_batch_size(noise_scale: float, lo: int | None = None, hi: int | None = None,
                    max_overhead: float = DEFAULT_MAX_OVERHEAD) -> int:
    """The critical batch of Zhang et al. 2024: the batch whose examples overhead E(B)/E_min - 1 =
    B/B_noise is ``max_overhead`` (B = max_overhead x B_noise, rounded), within the device limits.
    max_overhead 1 is B = B_noise, where steps and examples are both 2x their minimum."""
    b = min(max(round(max_overhead * noise_scale), 1), 2**30)
    if hi is not None:
        b = min(b, hi)
    if lo is not None:
        b = max(b, lo)
    return int(b)


def auto_from_budget(req: RecommendationRequest) -> tuple[int, float, list[str], list[str]]:
    """(batch in sequences, LR, notes, warnings) from DeepSeek LLM's compute-optimal laws."""
    t, ref = req.target, req.reference
    assert t is not None and ref is not None
    seq_len = t.seq_len or ref.seq_len
    if seq_len is None:
        raise RecipeError('target.batch_size "auto" with a token or compute budget needs a seq_len '
                          "(target.seq_len or reference.seq_len): the laws give the batch in tokens")
    if t.compute is not None:
        c, how = t.compute, "target.compute"
    else:
        assert t.tokens is not None
        c, how = 6.0 * req.model.params * t.tokens, f"6 N D = 6 x {req.model.params:,} x {t.tokens:.4g} tokens"
    b_tokens, lr = priors.deepseek_optimum(c)
    batch = max(1, round(b_tokens / seq_len))
    if t.max_batch_size is not None:
        batch = min(batch, t.max_batch_size)
    if t.min_batch_size is not None:
        batch = max(batch, t.min_batch_size)
    notes = [f"batch size {batch} (auto): DeepSeek LLM 2024's compute-optimal B_opt = 0.2920 C^0.3271 = "
             f"{b_tokens:.4g} tokens at C = {c:.4g} FLOPs ({how}), / seq_len {seq_len}; its LR law "
             f"lr_opt = 0.3118 C^-0.1250 = {lr:.4g} (AdamW, betas (0.9, 0.95), wd 0.1)"]
    warns = []
    lo, hi = priors.DEEPSEEK_COMPUTE_RANGE
    if not lo <= c <= priors.DEEPSEEK_CHECKED_UP_TO:
        warns.append(f"compute {c:.3g} FLOPs is outside DeepSeek's fit ({lo:g}..{hi:g}, checked at their "
                     f"7B/67B budgets up to ~{priors.DEEPSEEK_CHECKED_UP_TO:g}): the batch and LR laws are "
                     "extrapolated")
    elif c > hi:
        notes.append(f"compute above DeepSeek's fit ({hi:g}) but within the budgets it was checked at "
                     "(their 7B and 67B models, predicted within 10% of the batch and LR they used)")
    return batch, lr, notes, warns


def _stage_requests(req: RecommendationRequest) -> list[StageRequest]:
    if req.stages is not None:
        return list(req.stages)
    assert req.target is not None  # enforced by the model validator
    t = req.target
    batch = t.batch_size
    if batch == "ramp":
        return _ramp_requests(req)
    if batch == "auto":
        ref = req.reference
        assert ref is not None
        bn = noise_of(ref)
        if bn is not None:
            batch = auto_batch_size(bn, t.min_batch_size, t.max_batch_size, t.overhead)
        elif t.compute is not None or t.tokens is not None:
            batch = auto_from_budget(req)[0]
        else:
            raise RecipeError('target.batch_size "auto" needs reference.noise_scale or reference.noise_trajectory '
                              "(a measured gradient noise scale) or a budget (target.tokens or target.compute)")
    return [validated(StageRequest, batch_size=batch, batch_tokens=t.batch_tokens, seq_len=t.seq_len, steps=t.steps)]


def noise_of(ref: Reference) -> float | None:
    """The reference's B_noise as one number, in its batch units: its noise_scale, or the trajectory's
    constant with the same examples cost over the whole run (:mod:`._critical`)."""
    traj = Trajectory.of(ref)
    if traj is not None:
        return traj.equivalent(float(ref.batch_size))  # type: ignore[arg-type]
    return ref.noise_scale


def _ramp_requests(req: RecommendationRequest) -> list[StageRequest]:
    """A batch ramp along the reference's critical batch: one stage per batch (:func:`ramp_batches`)."""
    t, ref = req.target, req.reference
    assert t is not None and ref is not None and ref.batch_size is not None
    traj = Trajectory.of(ref)
    if traj is None:
        raise RecipeError('target.batch_size "ramp" needs reference.noise_trajectory (B_noise along the run), or '
                          "target.tokens with reference.seq_len and reference.steps (a prior read along the run)")
    if t.steps is not None:
        raise RecipeError('target.steps: batch "ramp" plans each stage\'s steps from the budget; leave it out')
    if t.batch_tokens is not None or (t.seq_len is not None and t.seq_len != ref.seq_len):
        raise RecipeError('target.seq_len: batch "ramp" keeps the reference\'s sequence length')
    if ref.steps is None:
        raise RecipeError('target.batch_size "ramp" needs reference.steps (the run the trajectory was read on)')
    start = t.min_batch_size or ref.batch_size
    top = t.max_batch_size or 2**30
    out = []
    for batch, lo, hi in ramp_batches(traj, start, top, t.overhead):
        share = (hi - lo) / traj.end
        out.append(StageRequest(batch_size=max(1, round(batch)), share=share, seq_len=t.seq_len))
    return out


def _prefix(index: int, n_stages: int) -> str:
    """What starts a stage's notes: set once on each plan (``plan.prefix``), read by every step."""
    return f"stage {index + 1}: " if n_stages > 1 else ""


def _resolve_batches(plan: _Plan, n: int) -> None:
    """Sequences and tokens of the stage and of its reference, and the batch ratio k."""
    p, ref, s = plan.prefix, plan.ref, plan.req
    plan.seq_len = s.seq_len or ref.seq_len
    if s.batch_tokens is not None:
        if plan.seq_len is None:
            where = f"stages[{plan.index}]" if n > 1 else "target"
            raise RecipeError(f"{where}.batch_tokens needs a seq_len ({where}.seq_len or reference.seq_len) "
                              "to give the recipe's batch in sequences")
        plan.batch_x = s.batch_tokens / plan.seq_len
        plan.batch = max(1, round(plan.batch_x))
        plan.tokens = s.batch_tokens
    else:
        assert s.batch_size is not None and not isinstance(s.batch_size, str)
        plan.batch = s.batch_size
        plan.batch_x = float(s.batch_size)
        plan.tokens = s.batch_size * plan.seq_len if plan.seq_len else None
    if ref.batch_size is None:
        if plan.seq_len is None:
            raise RecipeError("reference.batch_tokens needs reference.seq_len (or a target batch in tokens) "
                              "to compare it with a batch in sequences")
        plan.ref_batch = max(1, round(ref.batch_tokens / plan.seq_len))  # type: ignore[operator]
    else:
        plan.ref_batch = ref.batch_size
    # One unit whatever was typed: tokens where both batches' tokens are known, else sequences. The
    # reference batch is kept in the target's sequences, so k, the regime and the warmup agree.
    if ref.tokens is not None and plan.tokens is not None:
        plan.ref_batch_x = ref.tokens / plan.seq_len  # type: ignore[operator]
        plan.k_unit = "tokens"
    else:
        plan.ref_batch_x = float(ref.batch_size) if ref.batch_size is not None else float(plan.ref_batch)
        plan.k_unit = "sequences"
    plan.k = plan.batch_x / plan.ref_batch_x
    if ref.seq_len is not None and plan.seq_len is not None and ref.seq_len != plan.seq_len:
        plan.rationale.append(f"{p}seq_len {ref.seq_len} -> {plan.seq_len}: the batch ratio is counted in tokens "
                              "(the gradient noise is per token), whichever unit was typed")
    elif plan.seq_len != ref.seq_len and ref.tokens is None:
        plan.rationale.append(f"{p}seq_len {ref.seq_len} -> {plan.seq_len}: the reference's tokens are unknown, so "
                              "the batch ratio is counted in sequences")


def _plan_steps(plan: _Plan, req: RecommendationRequest, n: int) -> None:
    p, ref, s = plan.prefix, plan.ref, plan.req
    if ref.steps is not None:
        plan.ref_steps = s.share * ref.steps if (s.share is not None and s.reference is None) else ref.steps
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
            raise RecipeError('budget "same-loss" needs reference.noise_scale or reference.noise_trajectory (a '
                              "measured gradient noise scale)")
        exact = ref_steps / plan.k * plan.examples_ratio
        plan.steps = max(1, math.ceil(exact - 1e-9))
        plan.rationale.append(
            f"{p}steps: {_fmt(ref_steps)} / {_fmt(plan.k)} x {plan.examples_ratio:.3g} (predicted examples ratio) = "
            f"{plan.steps} (budget same-loss: the examples the target batch needs to reach the reference's loss)"
        )
        return
    # same-epochs: the same number of examples, so steps shrink by k (LAMB Table 4: 1M -> 15625).
    exact = ref_steps / plan.k if plan.batch_x != plan.ref_batch_x else ref_steps
    plan.steps = max(1, math.ceil(exact - 1e-9))
    unit = "tokens" if plan.k_unit == "tokens" else "examples"
    plan.rationale.append(
        f"{p}steps: {_fmt(ref_steps)} x {_ratio_text(plan, inverse=True)} = {plan.steps} "
        f"(same number of {unit}; budget same-epochs)"
    )


def _plan_trajectory(plan: _Plan, traj: Trajectory, p: str) -> None:
    """B_eq over the stage's share of the reference run (all of it for one stage), in the target's units."""
    lo, hi = (0.0, traj.end) if plan.span is None else (plan.span[0] * traj.end, plan.span[1] * traj.end)
    ref_units = float(plan.ref.batch_size or plan.ref_batch)
    plan.noise = traj.equivalent(ref_units, lo, hi) * plan.ref_batch_x / ref_units
    where = "" if plan.span is None else f", over the reference's examples {lo:.4g}..{hi:.4g}"
    plan.noise_src = f"reference.noise_trajectory ({traj.summary()}{where})"


def _ratio_text(plan: _Plan, *, inverse: bool = False) -> str:
    if plan.k_unit == "tokens":
        a, b = plan.tokens, plan.ref.tokens
    else:
        a, b = _fmt(plan.batch_x), _fmt(plan.ref_batch_x)
    return f"{b}/{a}" if inverse else f"{a}/{b}"


def _plan_noise(plan: _Plan, req: RecommendationRequest, n: int, noise_scale: float | None) -> None:
    """The critical batch: the reference's measured B_noise, the study's, or a prior from the token
    budget; and what the examples cost at the target batch (McCandlish et al. 2018, eq. 2.11)."""
    p = plan.prefix
    tokens = req.target.tokens if req.target is not None else None
    traj = Trajectory.of(plan.ref)
    if traj is not None:
        _plan_trajectory(plan, traj, p)
    elif plan.ref.noise_scale is not None:
        # In the reference's sequences; the plan counts in the target's.
        plan.noise = plan.ref.noise_scale * plan.ref_batch_x / (plan.ref.batch_size or plan.ref_batch)
        plan.noise_src = "reference.noise_scale"
    elif noise_scale is not None:
        plan.noise, plan.noise_src = noise_scale, "the study's measured noise scale"
    elif tokens is not None and plan.seq_len:
        b = priors.critical_batch_prior_tokens(tokens)
        plan.noise = b / plan.seq_len
        plan.noise_src = (f"a prior from the token budget ({tokens:.4g} tokens: {priors.CRITICAL_BATCH_SCALE:.3g} x Step "
                          f"Law's B_opt = 0.58 D^0.571 (Li et al. 2025) = {b:.4g} tokens, the scale fitted on "
                          "published LLM recipes whose LR barely moved with their batch)")
        lo, hi = priors.STEP_LAW_TOKENS_RANGE
        if not lo <= tokens <= hi:
            plan.warnings.append(f"{p}the token budget {tokens:.3g} is outside Step Law's fits ({lo:g}..{hi:g} "
                                 "tokens): the critical-batch prior is extrapolated")
    bn = plan.noise
    if bn is None:
        return
    if plan.noise_src.startswith("a prior from the token budget"):
        # Fitted to how published LLM LRs move with the batch: it bends the LR, and predicts no examples
        # cost (those recipes reached their loss with the examples they planned).
        if plan.batch_x > bn:
            plan.warnings.append(
                f"{p}target batch {plan.batch} is {plan.batch_x / bn:.3g}x the LR-regime batch of the token-budget "
                f"prior ({_fmt(bn)} sequences): the LR stops growing with the batch there. That prior is fitted to "
                "how published LLM LRs move with the batch, not to example counts, so it predicts no examples cost: "
                "measure the noise scale (measure_noise) to know what the extra examples cost")
        return
    ratio = examples_ratio(plan.batch_x, plan.ref_batch_x, bn)
    plan.examples_ratio = ratio
    plan.steps_ratio = ratio * plan.ref_batch_x / plan.batch_x
    if traj is None:
        plan.rationale.append(
            f"{p}critical batch (McCandlish et al. 2018, eq. 2.11) from {plan.noise_src}: B_noise = {_fmt(bn)} "
            f"sequences; reaching the reference's loss at batch {plan.batch} takes {ratio:.3g}x the examples and "
            f"{plan.steps_ratio:.3g}x the steps of batch {plan.ref_batch} (examples ratio (1 + B/B_noise)/(1 + "
            "B_ref/B_noise))"
        )
    else:
        last = traj.noise[-1] * plan.ref_batch_x / (plan.ref.batch_size or plan.ref_batch)
        plan.rationale.append(
            f"{p}critical batch along the run (McCandlish et al. 2018, eq. 2.11 per unit of progress) from "
            f"{plan.noise_src}: the examples at batch B for the reference's examples x are integral (1 + "
            "B/B_noise(x))/(1 + B_ref/B_noise(x)) dx, the constant-B_noise ratio at B_eq + B_ref = the harmonic "
            f"mean of B_noise(x) + B_ref: B_eq = {_fmt(bn)} sequences; reaching the reference's loss at batch "
            f"{plan.batch} takes {ratio:.3g}x the examples and {plan.steps_ratio:.3g}x the steps of batch "
            f"{plan.ref_batch}, where one constant at the run's last B_noise ({_fmt(last)}) would predict "
            f"{examples_ratio(plan.batch_x, plan.ref_batch_x, last):.3g}x the examples: the early, small critical "
            "batch is where a larger batch pays"
        )
    if plan.batch_x > bn:
        if req.budget == "same-epochs":
            cost = ("the default budget same-epochs keeps the reference's examples, so expect a worse loss than "
                    "the reference's")
        elif req.budget == "same-loss":
            cost = "budget same-loss plans for that"
        else:
            cost = (f"budget same-steps trains {plan.k:.3g}x the examples, "
                    f"{'enough' if plan.k >= ratio else 'not enough'} for that")
        plan.warnings.append(
            f"{p}target batch {plan.batch} is {plan.batch_x / bn:.3g}x the critical batch (B_noise {_fmt(bn)}, "
            f"{plan.noise_src.split(' (')[0]}): past it the LR stops growing with the batch and the same loss "
            f"needs {ratio:.3g}x the examples of the reference ({ratio * plan.ref_batch_x / plan.batch_x:.3g}x "
            f"the steps): {cost}; batch_size \"auto\" picks a batch near B_noise"
        )
