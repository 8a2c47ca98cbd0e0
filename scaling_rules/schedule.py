"""The LR at any step of a recipe: LANS eq. 8 (warmup + decay) and eq. 9 (warmup + const + decay).

This is the only implementation of the schedule. The torch scheduler (`RecipeLR`), the plots and
the area arithmetic all call it, so they cannot drift apart.

Step convention: ``step`` is the 0-based index of the optimizer step about to run (the number of
steps already taken). The paper's ``t`` runs 1..T, so ``t = local_step + 1``:

* warmup, ``t <= T_w``:         eta * t / T_w       (the first step is eta / T_w, never 0)
* constant, ``t <= T_w + T_c``:  eta
* decay, otherwise:             end + (eta - end) * (T - t) / (T - T_w - T_c)   (0 at t = T)

With this convention the sum over a stage is exactly ``eta * (T + T_c) / 2`` for a linear decay to
0, the closed form behind LANS's 5.28 and 1.91 (see :func:`schedule_area`).
Each stage re-warms from zero (LAMB section 4.1, mixed-batch training).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

import numpy as np

from .models import Recipe, Stage

__all__ = ["lr_at", "lr_curve", "schedule_area", "stage_boundaries", "stage_lr"]


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
    frac = (stage.steps - t) / (stage.steps - plateau_end)  # 1 -> 0 across the decay
    if stage.decay == "cosine":
        frac = 0.5 * (1.0 - math.cos(math.pi * frac))
    return stage.end_lr + (eta - stage.end_lr) * frac


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
        frac = (total - t[dec]) / (total - plateau_end)
        if stage.decay == "cosine":
            frac = 0.5 * (1.0 - np.cos(np.pi * frac))
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


def schedule_area(recipe_or_stage: Recipe | Stage) -> float:
    """Sum of the LR over every step: the "area under the LR curve" of LANS section 3.3."""
    if isinstance(recipe_or_stage, Stage):
        recipe_or_stage = Recipe.model_construct(
            optimizer=None, stages=[recipe_or_stage], total_steps=recipe_or_stage.steps
        )
    return float(math.fsum(lr_curve(recipe_or_stage)))
