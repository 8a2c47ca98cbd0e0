"""A batch ramp's LR schedule: one schedule over the run's examples, carried piecewise by its stages.

GPT-3 ramps its batch with the LR schedule kept in tokens over the whole run (warmup, then cosine
decay to the end), whatever the batch does (Brown et al. 2020, appendix B). Here the stages of a ramp
train examples [e0_i, e1_i] of the run's E; the run's shape g(e) is the warmup over its first W
examples, the plateau the request asks for, then the recipe's decay from 1 to 0 over the rest, and
stage i's LR at examples e is end + (peak_i - end) g(e), peak_i being the stage's LR at its batch (the
regime rule), so the LR still moves with the batch at each doubling. A stage built on its own steps
instead squeezed the whole decay into the last stage, however short (8 x 5 steps after 1,335 flat).

A stage's fields carry its piece with :mod:`.schedule` unchanged: a linear (or wsd) decay exactly, its
peak_lr and end_lr being the run's LR where the stage's decay segment starts and ends; a step decay
exactly, the run's milestones mapped onto the stage's steps and the drops before it folded into its
peak; a cosine or power decay exactly where the stage carries all of it (cosine) or its end
(power), and elsewhere by the straight segment between its end values, said in the rationale.
"""

from __future__ import annotations

import dataclasses
import math

from . import priors
from ._phases import _decay, warmup_ratio
from ._plan import RecipeError, _fmt, _Plan
from .learning import EvidenceModel
from .models import RecommendationRequest, Stage
from .recipe import validated
from .schedule import DEFAULT_DECAY_FACTOR, DEFAULT_MILESTONES, MULTISTEP_FACTOR, MULTISTEP_MILESTONES

__all__ = ["chain", "head_warmup", "ramp_stages"]


def chain(plans: list[_Plan], head: _Plan) -> list[_Plan]:
    """The ramp that starts at ``head``: it and the stages that continue it."""
    out = [head]
    for plan in plans[head.index + 1:]:
        if not plan.ramp:
            break
        out.append(plan)
    return out


def _examples(stages: list[_Plan]) -> list[float]:
    """Cumulative examples at each stage boundary, in the plan's batch unit (e0 of each, then E)."""
    edges = [0.0]
    for p in stages:
        edges.append(edges[-1] + p.steps * p.batch_x)
    return edges


def _warmup_steps(head: _Plan, run: float) -> int:
    """The warmup in the head's steps of the run-level ratio, as a fixed batch would floor it."""
    whole = run / head.batch_x
    w = math.floor(head.warmup_ratio * whole + 1e-9)
    if head.k > 1 and w == 0 and whole > 1:
        w = 1
    return min(w, head.steps)


def head_warmup(head: _Plan, plans: list[_Plan], req: RecommendationRequest, name: str, n: int,
                evidence: EvidenceModel | None) -> None:
    """The first stage's warmup ratio against the whole run at its batch, not its own steps: a ramp
    warms up once, as long as a fixed batch would over the same examples, and every stage trains on it."""
    stages = chain(plans, head)
    run = _examples(stages)[-1]
    refs = [p.ref_steps for p in stages]
    # The head seen as a fixed batch over the whole ramp: the run's length at its batch need not be whole
    # steps, and the reference steps are the ramp's, not the head's share.
    whole = None if None in refs else math.fsum(refs)  # type: ignore[arg-type]
    view = dataclasses.replace(head, steps=run / head.batch_x, ref_steps=whole)  # type: ignore[arg-type]
    head.warmup_ratio = warmup_ratio(view, req, name, n, evidence)
    head.run_warmup_ratio = _warmup_steps(head, run) * head.batch_x / run


def _stepped(decay: dict) -> tuple[list[float], float]:
    multi = decay["decay"] == "multistep"
    ms = decay.get("decay_milestones") or (MULTISTEP_MILESTONES if multi else DEFAULT_MILESTONES)
    return list(ms), decay.get("decay_factor") or (MULTISTEP_FACTOR if multi else DEFAULT_DECAY_FACTOR)


def _shape(kind: str, u: float, power: float | None) -> float:
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * u))
    if kind == "polynomial":
        return u ** (power or 2.0)
    return u


def _decay_start(stages: list[_Plan], edges: list[float], warm: int, start: float) -> list[int]:
    """Steps of each stage before the run's decay (warmup included): the decay starts at ``start``
    examples, rounded to the step of the stage it falls in, as a fixed batch rounds its plateau."""
    before = []
    for i, p in enumerate(stages):
        w = warm if i == 0 else 0
        if edges[i + 1] <= start:
            before.append(p.steps)
        elif edges[i] >= start:
            before.append(w)
        else:
            before.append(max(w, min(p.steps, round((start - edges[i]) / p.batch_x))))
    return before


def ramp_stages(head: _Plan, plans: list[_Plan], req: RecommendationRequest, name: str) -> list[Stage]:
    """The stages of the ramp starting at ``head``, each with its piece of the run's schedule."""
    stages = chain(plans, head)
    edges = _examples(stages)
    run = edges[-1]
    decay = _decay(head, req, name)
    kind = decay["decay"]
    ratio = head.warmup_ratio
    warm = _warmup_steps(head, run)
    warm_examples = warm * head.batch_x
    p0 = head.prefix
    plateau = req.plateau_ratio if req.plateau_ratio is not None else head.req.plateau_ratio
    if plateau is None and kind == "wsd":
        plateau = max(ratio, 1 - priors.WSD_DECAY_FRACTION)
    if plateau is not None and plateau < ratio:
        raise RecipeError(f"stages[{head.index}].plateau_ratio ({_fmt(plateau)}) is below the warmup ratio "
                          f"({_fmt(ratio)})")
    start = max(warm_examples, plateau * run) if plateau is not None else warm_examples
    before = _decay_start(stages, edges, warm, start)
    first = next((i for i, p in enumerate(stages) if before[i] < p.steps), None)
    decay_at = run if first is None else edges[first] + before[first] * stages[first].batch_x
    capped = warm == head.steps and warm < math.floor(ratio * run / head.batch_x + 1e-9)
    head.rationale.append(
        f"{p0}the ramp's LR schedule is one schedule over the run's {run:.6g} examples, carried piecewise by its "
        "stages (GPT-3's batch ramp: the schedule is in tokens over the run, whatever the batch): each stage's LR "
        "is end + (its peak at its batch - end) x the run's shape, so the LR moves with the batch at each "
        f"doubling and nowhere else; warmup {warm} steps ({warm_examples:.6g} examples, ratio {_fmt(ratio)} of "
        f"the run at batch {head.batch})"
        + (f"; the batch doubles before that warmup ends ({_fmt(ratio * run / head.batch_x)} steps), so the "
           f"warmup ends with stage {head.index + 1}" if capped else "")
        + (f"; the LR holds until {_fmt(plateau)} of the run" if plateau is not None else "")
        + (f"; the {kind} decay runs from example {decay_at:.6g} ({decay_at / run:.3g} of the run) to the end, "
           f"carried by stages {first + head.index + 1}..{stages[-1].index + 1}" if first is not None else
           "; no decay (the plateau covers the run)"))
    out = []
    for i, plan in enumerate(stages):
        w = warm if i == 0 else 0
        out.append(_stage(plan, req, decay, w, before[i], edges[i], i == len(stages) - 1, run, decay_at))
    return out


def _stage(plan: _Plan, req: RecommendationRequest, decay: dict, warm: int, before: int, e0: float,
           last: bool, run: float, decay_at: float) -> Stage:
    T, b, peak = plan.steps, plan.batch_x, plan.lr
    end = min(req.end_lr, peak)
    kind = decay["decay"]
    shape = dict(decay)
    top, bottom, const, note = peak, end, before - warm, ""
    if before < T:
        span = run - decay_at

        def u(e: float) -> float:
            return max(0.0, (run - e) / span)
        u0, u1 = u(e0 + before * b), 0.0 if last else u(e0 + T * b)
        if kind in ("step", "multistep"):
            top, shape, const = _steps_into(plan, decay, before, warm, e0, run)
            bottom = min(end, top)
        else:
            exact = kind in ("linear", "wsd") or (u1 == 0.0 and (kind == "polynomial" or u0 == 1.0))
            power = decay.get("decay_power")
            top = end + (peak - end) * _shape(kind, u0, power)
            bottom = end + (peak - end) * _shape(kind, u1, power)
            if not exact:
                shape = {"decay": "linear"}
                note = (f"; the run's {kind} decay from {u0:.3g} to {u1:.3g} of its span is approximated by its "
                        "straight segment between these end values (a stage's own curve spans a whole decay)")
    lrs = f"LR {_fmt(top)} -> {_fmt(bottom)}" if T > warm + const else f"LR {_fmt(top)} after the warmup"
    plan.rationale.append(
        f"{plan.prefix}examples {e0:.6g}..{e0 + T * b:.6g} of the run: warmup {warm}, constant {const}, decay "
        f"{T - warm - const} steps, {lrs} (its peak {_fmt(peak)} at batch {plan.batch})" + note)
    if plan.capped:
        plan.rationale.append(f"{plan.prefix}the cap binds here: no constant phase is added for it (LANS eq. 9's is "
                              "a fixed batch's; the ramp keeps the run's schedule)")
    return validated(
        Stage,
        batch_size=plan.batch, steps=T, peak_lr=top, warmup_steps=warm, const_steps=const,
        decay_steps=T - warm - const, warmup_ratio=round(warm / T, 12), const_ratio=round(const / T, 12),
        end_lr=bottom, seq_len=plan.req.seq_len, batch_tokens=plan.tokens, ideal_lr=plan.ideal_lr,
        lr_cap=plan.cap, examples_ratio=plan.examples_ratio, steps_ratio=plan.steps_ratio, **shape,
    )


def _steps_into(plan: _Plan, decay: dict, before: int, warm: int, e0: float, run: float) -> tuple[float, dict, int]:
    """(peak, decay fields, constant steps) of a step decay's piece: the run's milestones (fractions of its
    examples) as the stage's steps after which each drop applies, those at or before its decay folded into
    the peak where the stage starts in the decay, or applied at its first decay step where it does not."""
    ms, factor = _stepped(decay)
    T, b = plan.steps, plan.batch_x
    folded, local = 0, []
    for m in ms:
        at = math.floor((m * run - e0) / b + 1e-9)  # as schedule.py floors m x steps for a fixed batch
        if at >= T:
            continue
        if at <= 0 and before == 0:
            folded += 1
        else:
            local.append(max(at, before))
    peak = plan.lr * factor**folded
    if not local:
        return peak, {**decay, "decay_milestones": None}, T - warm  # no drop inside: flat at its level
    return peak, {**decay, "decay_milestones": [a / T for a in local]}, before - warm
