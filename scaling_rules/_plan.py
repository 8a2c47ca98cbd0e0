"""A stage being planned: its batches in sequences and tokens, its steps, and what a measured
noise scale predicts (engine rules 5, 8 and 10; see :mod:`.engine`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .models import RecommendationRequest, Reference, StageRequest
from .priors import Prior

__all__ = ["RecipeError", "auto_batch_size", "examples_ratio"]


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


