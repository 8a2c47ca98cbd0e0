"""Checks made right before each optimizer step, so that a job never trains something other than
what it was configured for, silently:

* at the first step, the optimizer still holds the model's parameters: a wrapper that replaces them
  (FSDP2's ``fully_shard``, FSDP, anything that swaps ``nn.Parameter`` objects) applied after
  ``autoconfigure`` leaves the optimizer updating tensors the model no longer uses;
* at every step, the LR scheduler was stepped once per optimizer step since the first one: HF
  Accelerate's ``AcceleratedScheduler`` (``accelerator.prepare(..., job.scheduler)``) steps it once
  per process, which runs the recipe's schedule N times too fast on N ranks.

Both raise :class:`~largebatch.client.errors.JobError` naming what to do, before the step is taken.
"""

from __future__ import annotations

import weakref
from typing import Any

from . import errors

__all__ = ["guard_steps"]


def _check_parameters(optimizer: Any, model: Any) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    current = {id(p) for p in model.parameters()}
    stale = len(held - current)
    if stale:
        raise errors.JobError(
            f"the job's optimizer holds {stale} of {len(held)} parameter(s) the model no longer has: a wrapper that "
            "replaces parameters (FSDP2's fully_shard, FSDP, ...) was applied after autoconfigure. Wrap first, then "
            "configure: fully_shard(model) (on every submodule you shard), then client.autoconfigure(model, ...)")


def guard_steps(optimizer: Any, scheduler: Any, model: Any) -> Any:
    """Register the checks on ``optimizer`` (a step pre-hook); returns its handle (None when the
    optimizer takes no hooks)."""
    if not hasattr(optimizer, "register_step_pre_hook"):
        return None
    model_ref = weakref.ref(model) if model is not None and hasattr(model, "parameters") else None
    taken = [0]  # optimizer steps so far
    first: list[int] = []  # the scheduler's count at the first step (a resumed scheduler starts above 0)

    def check(*_: Any) -> None:  # a pre-hook that returns something would replace the step's arguments
        n = taken[0]
        last = getattr(scheduler, "last_epoch", None)
        if n == 0:
            model = model_ref() if model_ref is not None else None
            if model is not None:
                _check_parameters(optimizer, model)
            if isinstance(last, int):
                first.append(last)
        elif isinstance(last, int) and first and last - first[0] > n:
            raise errors.JobError(
                f"the job's LR scheduler was stepped {last - first[0]} times in {n} optimizer steps: the recipe's "
                "schedule would run too fast. HF Accelerate's prepare() wraps it in an AcceleratedScheduler that "
                "steps once per process: leave job.scheduler out of accelerator.prepare() and call "
                "job.scheduler.step() after each optimizer step (or build the Accelerator with "
                "step_scheduler_with_optimizer=False)")
        taken[0] = n + 1

    return optimizer.register_step_pre_hook(check)
