"""LR-over-steps plots of a recipe (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

import io
from typing import Literal

import numpy as np

from .models import Recipe
from .schedule import lr_curve, stage_boundaries

MAX_POINTS = 4000  # a 1M-step schedule is piecewise linear: a few thousand points draw it exactly


def _sample_steps(recipe: Recipe) -> np.ndarray:
    """Every phase boundary plus an even grid, so corners are exact at any length."""
    marks = []
    for start, s in zip(stage_boundaries(recipe), recipe.stages, strict=False):
        drops = []
        if s.decay == "step":
            from .schedule import _milestone_steps

            drops = [m for m in _milestone_steps(s)] + [m - 1 for m in _milestone_steps(s)]
        for local in (0, s.warmup_steps - 1, s.warmup_steps + s.const_steps - 1, s.steps - 1, *drops):
            if 0 <= local < s.steps:
                marks.append(start + local)
    grid = np.linspace(0, recipe.total_steps - 1, num=min(recipe.total_steps, MAX_POINTS)).astype(np.int64)
    return np.unique(np.concatenate([grid, np.asarray(marks, dtype=np.int64)]))


def render_schedule(recipe: Recipe, fmt: Literal["png", "svg", "pdf"] = "png", *, title: str | None = None) -> bytes:
    """The recipe's LR schedule as PNG or SVG bytes: stages shaded, warmup/constant/decay marked."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    steps = _sample_steps(recipe)
    lrs = lr_curve(recipe, steps)
    fig = Figure(figsize=(8, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(steps + 1, lrs, color="tab:blue", lw=1.6, label=f"{recipe.optimizer.name.upper()} LR")
    colors = {"warmup": "tab:orange", "constant": "tab:green", "decay": "tab:purple"}
    labelled: set[str] = set()
    for i, (start, s) in enumerate(zip(stage_boundaries(recipe), recipe.stages, strict=False)):
        phases = [("warmup", 0, s.warmup_steps), ("constant", s.warmup_steps, s.warmup_steps + s.const_steps),
                  ("decay", s.warmup_steps + s.const_steps, s.steps)]
        for name, a, b in phases:
            if b > a:
                ax.axvspan(start + a, start + b, color=colors[name], alpha=0.12,
                           label=name if name not in labelled else None)
                labelled.add(name)
        if len(recipe.stages) > 1:
            ax.axvline(start, color="black", lw=0.8, ls="--")
            ax.text(start + s.steps / 2, s.peak_lr * 1.04, f"stage {i + 1}\nbatch {s.batch_size}",
                    ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_ylim(0, max(s.peak_lr for s in recipe.stages) * 1.25)
    ax.set_xlim(0, recipe.total_steps)
    ax.set_title(title or f"{recipe.optimizer.name.upper()} schedule, {recipe.total_steps:,} steps")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    return buf.getvalue()
