"""Store records -> wire models, and the service-side sanity checks of recipes."""

from __future__ import annotations

import math
from typing import Any

from largebatch.scaling_rules.models import MAX_COUNT, MAX_LR, MAX_STAGES, Recipe
from largebatch.scaling_rules.optimizers import HYPERPARAMETER_BOUNDS
from largebatch.scaling_rules.wire import Run, Study
from largebatch.service.errors import ApiError
from largebatch.service.storage.base import RunRecord, StudyRecord

__all__ = ["MAX_BIGINT", "MAX_INT", "check_recipe", "to_run", "to_study"]

# Batch sizes and step counts are stored in 32-bit integer columns; nobody trains beyond these.
MAX_INT = MAX_COUNT
MAX_BIGINT = 2**63 - 1  # parameter counts, ids


def _finite_or_none(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def to_study(r: StudyRecord) -> Study:
    return Study(name=r.name, namespace=r.namespace, model_family=r.model_family, model_params=r.model_params,
                 metric=r.metric, direction=r.direction, created_at=r.created_at, n_runs=r.n_runs)


def to_run(r: RunRecord) -> Run:
    data: dict[str, Any] = r.model_dump(exclude={"client_key"})
    # JSON has no NaN: a NaN last loss (the reason the run diverged) is shown as null; `reason` says it.
    for key in ("metric", "last_loss"):
        data[key] = _finite_or_none(data[key])
    return Run.model_validate(data)


def check_recipe(recipe: Recipe, loc: list[str | int], *, computed: bool = False) -> Recipe:
    """422 for a recipe nobody can train with (posted by a client, or computed from extreme numbers)."""

    def bad(where: list[str | int], msg: str) -> ApiError:
        if computed:  # the fault is in the request's numbers, not in a field of the caller's recipe
            where_s = ".".join(str(w) for w in where)
            return ApiError("validation_error", [{"loc": loc, "msg": f"the request leads to a recipe whose "
                                                  f"{where_s} is out of range: {msg}", "type": "value_error"}])
        return ApiError("validation_error", [{"loc": [*loc, *where], "msg": msg, "type": "value_error"}])

    if not recipe.stages:
        raise bad(["stages"], "a recipe needs at least one stage")
    if len(recipe.stages) > MAX_STAGES:
        raise bad(["stages"], f"a recipe has at most {MAX_STAGES} stages")
    if not (math.isfinite(recipe.optimizer.lr) and 0 < recipe.optimizer.lr <= MAX_LR):
        raise bad(["optimizer", "lr"], f"must be a number in (0, {MAX_LR:g}]")
    opt = recipe.optimizer
    # The request's own bounds (models.Reference), so a posted recipe is no more absurd than a computed one.
    for name, bounds in HYPERPARAMETER_BOUNDS.items():
        v = getattr(opt, name)
        if name == "betas":
            if v is not None and not all(bounds.holds(b) for b in v):
                raise bad(["optimizer", name], f"each must be in {bounds}")
        elif v is not None and not bounds.holds(v):
            raise bad(["optimizer", name], f"must be a number in {bounds}")
    if not 0 < recipe.total_steps <= MAX_INT:
        raise bad(["total_steps"], f"must be in 1..{MAX_INT}")
    for i, s in enumerate(recipe.stages):
        if not 0 < s.batch_size <= MAX_INT:
            raise bad(["stages", i, "batch_size"], f"must be in 1..{MAX_INT}")
        if not 0 < s.steps <= MAX_INT or min(s.warmup_steps, s.const_steps, s.decay_steps) < 0:
            raise bad(["stages", i, "steps"], f"steps must be in 1..{MAX_INT}, phases >= 0")
        if not (math.isfinite(s.peak_lr) and 0 < s.peak_lr <= MAX_LR):
            raise bad(["stages", i, "peak_lr"], f"must be a number in (0, {MAX_LR:g}]")
        m = s.decay_milestones
        if m is not None and (len(m) > 16 or any(not (math.isfinite(x) and 0 < x < 1) for x in m) or m != sorted(m)):
            raise bad(["stages", i, "decay_milestones"], "at most 16 increasing fractions in (0, 1)")
        if s.decay_power is not None and not (math.isfinite(s.decay_power) and 0 < s.decay_power <= 100):
            raise bad(["stages", i, "decay_power"], "must be a number in (0, 100]")
        if s.decay_factor is not None and not (math.isfinite(s.decay_factor) and 0 < s.decay_factor < 1):
            raise bad(["stages", i, "decay_factor"], "must be a number in (0, 1)")
        for name in ("warmup_ratio", "const_ratio", "end_lr", "ideal_lr", "lr_cap"):
            v = getattr(s, name)
            hi = 1.0 if name.endswith("_ratio") else MAX_LR
            if v is not None and not (math.isfinite(v) and 0 <= v <= hi):
                raise bad(["stages", i, name], f"must be a number in [0, {hi:g}]")
    return recipe
