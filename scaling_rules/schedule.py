"""The LR at any step of a recipe: LANS eq. 8 (warmup + decay) and eq. 9 (warmup + const + decay).

This is the only implementation of the schedule. The torch scheduler (`RecipeLR`), the plots and
the area arithmetic all call it, so they cannot drift apart.

Step convention: ``step`` is the 0-based index of the optimizer step about to run (the number of
steps already taken). The paper's ``t`` runs 1..T, so ``t = local_step + 1``:

* warmup, ``t <= T_w``:         eta * t / T_w       (the first step is eta / T_w, never 0)
* constant, ``t <= T_w + T_c``:  eta
* decay, otherwise:             end + (eta - end) * (T - t) / (T - T_w - T_c)   (0 at t = T)

Warmup-stable-decay ("wsd") is this with a long constant phase and a linear decay; "multistep" is the
step decay with DeepSeek LLM's defaults.

With this convention the sum over a stage is exactly ``eta * (T + T_c) / 2`` for a linear decay to
0, the closed form behind LANS's 5.28 and 1.91 (see :func:`schedule_area`).
A stage that changes the sequence length re-warms from zero (LAMB section 4.1, mixed-batch
training); the stages of a batch ramp carry one schedule over the run's examples piecewise (see the engine's
``_ramp``), with no warmup after the first.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .models import Recipe, Stage

__all__ = ["StageShape", "lr_at", "lr_curve", "schedule_area", "stage_area", "stage_boundaries", "stage_lr"]


# Goyal et al. 2017: x0.1 at epochs 30, 60 and 80 of 90.
DEFAULT_MILESTONES = (30 / 90, 60 / 90, 80 / 90)
DEFAULT_DECAY_FACTOR = 0.1
# DeepSeek LLM 2024: 31.6% of the peak after 80% of the tokens, 10% after 90%.
MULTISTEP_MILESTONES = (0.8, 0.9)
MULTISTEP_FACTOR = 10**-0.5
_STEPPED = ("step", "multistep")
# The LARS TPU reference decays with power 2 (tf.train.polynomial_decay(..., power=2.0)).
DEFAULT_DECAY_POWER = 2.0


def _milestone_steps(stage: Stage | StageShape) -> list[int]:
    """Stage-local step counts t (1-based) after which each drop of a step decay applies."""
    ms = stage.decay_milestones or (MULTISTEP_MILESTONES if stage.decay == "multistep" else DEFAULT_MILESTONES)
    return [math.floor(m * stage.steps + 1e-9) for m in ms]


def _decay_frac(stage: Stage, frac: float) -> float:
    """The decay shape at ``frac`` (1 at the start of the decay, 0 at its end), as a fraction of the peak."""
    if stage.decay == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * frac))
    if stage.decay == "polynomial":
        return frac ** (stage.decay_power or DEFAULT_DECAY_POWER)
    return frac


def _factor(stage: Stage | StageShape) -> float:
    return stage.decay_factor or (MULTISTEP_FACTOR if stage.decay == "multistep" else DEFAULT_DECAY_FACTOR)


def stage_lr(stage: Stage, local_step: int) -> float:
    """LR of the ``local_step``-th (0-based) step of one stage."""
    t = local_step + 1
    eta = stage.peak_lr
    if t <= 0:
        return 0.0
    if t > stage.steps:
        return stage.end_lr
    if stage.warmup_steps and t <= stage.warmup_steps:
        return eta * t / stage.warmup_steps
    plateau_end = stage.warmup_steps + stage.const_steps
    if t <= plateau_end:
        return eta
    if stage.decay in _STEPPED:
        factor = _factor(stage)
        drops = sum(1 for m in _milestone_steps(stage) if t > m)
        return max(stage.end_lr, eta * factor**drops)
    frac = (stage.steps - t) / (stage.steps - plateau_end)  # 1 -> 0 across the decay
    return stage.end_lr + (eta - stage.end_lr) * _decay_frac(stage, frac)


def stage_boundaries(recipe: Recipe) -> list[int]:
    """Global step at which each stage starts."""
    starts, acc = [], 0
    for s in recipe.stages:
        starts.append(acc)
        acc += s.steps
    return starts


def lr_at(recipe: Recipe, step: int) -> float:
    """LR for global optimizer step ``step`` (0-based). Past the end: the last stage's end LR."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    starts = stage_boundaries(recipe)
    i = bisect_right(starts, step) - 1
    return stage_lr(recipe.stages[i], step - starts[i])


def _stage_curve(stage: Stage, local: np.ndarray) -> np.ndarray:
    t = local.astype(np.float64) + 1.0
    eta, end = stage.peak_lr, stage.end_lr
    wu, plateau_end, total = stage.warmup_steps, stage.warmup_steps + stage.const_steps, stage.steps
    out = np.full(t.shape, eta, dtype=np.float64)
    if wu:
        warm = t <= wu
        out[warm] = eta * t[warm] / wu
    dec = (t > plateau_end) & (t <= total)
    if total > plateau_end:
        if stage.decay in _STEPPED:
            factor = _factor(stage)
            drops = np.zeros(t.shape)
            for m in _milestone_steps(stage):
                drops += t > m
            out[dec] = np.maximum(end, eta * factor ** drops[dec])
        else:
            frac = (total - t[dec]) / (total - plateau_end)
            if stage.decay == "cosine":
                frac = 0.5 * (1.0 - np.cos(np.pi * frac))
            elif stage.decay == "polynomial":
                frac = frac ** (stage.decay_power or DEFAULT_DECAY_POWER)
            out[dec] = end + (eta - end) * frac
    out[t > total] = end
    return out


def lr_curve(recipe: Recipe, steps: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Vectorised :func:`lr_at`: the LR at each of ``steps`` (default: every step of the recipe).

    Plotting a 1M-step schedule takes milliseconds.
    """
    steps_arr = np.arange(recipe.total_steps) if steps is None else np.asarray(steps, dtype=np.int64)
    if steps_arr.size and steps_arr.min() < 0:
        raise ValueError("steps must be >= 0")
    starts = np.asarray(stage_boundaries(recipe))
    idx = np.searchsorted(starts, steps_arr, side="right") - 1
    out = np.empty(steps_arr.shape, dtype=np.float64)
    for i, stage in enumerate(recipe.stages):
        sel = idx == i
        if sel.any():
            out[sel] = _stage_curve(stage, steps_arr[sel] - starts[i])
    return out


# Below this many decay steps a power decay is summed term by term (exact); above, by Euler-Maclaurin.
_EXACT_SUM_LIMIT = 4096


def _power_sum(d: int, p: float) -> float:
    """sum_{j=0}^{d-1} (j/d)^p: the decay part of the area, O(1) for any d."""
    if p == 1:
        return (d - 1) / 2
    if d <= _EXACT_SUM_LIMIT:
        return math.fsum((j / d) ** p for j in range(d))
    # Euler-Maclaurin on f(x) = (x/d)^p over [0, d], minus f(d) since j stops at d - 1.
    # (f(0) - f(d)) / 2 = -1/2, and (f'(d) - f'(0)) / 12 = p / (12 d) for p >= 1; for p < 1 the
    # dropped zeta(-p) term is below 1e-4 of the sum at these d.
    return d / (p + 1) - 0.5 + p / (12 * d)


@dataclass(slots=True)
class StageShape:
    """The fields of a :class:`Stage` that :func:`stage_area` reads. The engine's what-if schedules
    (the uncapped LR, no constant phase) are these rather than copies of the pydantic Stage: a copy
    cost more than the area itself, several times per capped recipe. Not frozen: a frozen dataclass
    sets each field through object.__setattr__, which made one of these cost twice an area."""

    peak_lr: float
    end_lr: float
    warmup_steps: int
    const_steps: int
    steps: int
    decay: str = "linear"
    decay_power: float | None = None
    decay_milestones: list[float] | None = None
    decay_factor: float | None = None


def stage_area(stage: Stage | StageShape) -> float:
    """Sum of one stage's LR over its steps, in closed form (O(1), whatever the step count).

    Warmup t = 1..W gives eta (W + 1) / 2; the plateau eta C; a linear (or cosine) decay over D steps
    end D + (eta - end) (D - 1) / 2, since sum_{j<D} j/D = (D - 1)/2 and the cosine terms cancel.
    """
    eta, end = stage.peak_lr, stage.end_lr
    w, c = stage.warmup_steps, stage.const_steps
    d = stage.steps - w - c
    area = eta * (w + 1) / 2 if w else 0.0
    area += eta * c
    if d <= 0:
        return area
    if stage.decay in _STEPPED:
        factor = _factor(stage)
        lo = w + c  # decay covers t in (lo, steps]
        bounds = [lo] + [min(max(m, lo), stage.steps) for m in _milestone_steps(stage)] + [stage.steps]
        for i in range(len(bounds) - 1):
            n = bounds[i + 1] - bounds[i]
            if n > 0:
                area += n * max(end, eta * factor**i)
        return area
    if stage.decay == "polynomial":
        shape = _power_sum(d, stage.decay_power or DEFAULT_DECAY_POWER)
    else:
        shape = (d - 1) / 2
    return area + end * d + (eta - end) * shape


def schedule_area(recipe_or_stage: Recipe | Stage | StageShape) -> float:
    """Sum of the LR over every step: the "area under the LR curve" of LANS section 3.3 (closed form)."""
    stages = [recipe_or_stage] if isinstance(recipe_or_stage, Stage | StageShape) else recipe_or_stage.stages
    return math.fsum(stage_area(s) for s in stages)
