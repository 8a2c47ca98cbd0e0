"""Attaching the gradient-noise-scale estimator to a model for :meth:`Job.measure_noise` (torch parts
imported only here, when asked)."""

from __future__ import annotations

from typing import Any

from ._dist import BatchPlan


def attach_noise(model: Any, plan: BatchPlan, *, ema: float, grad_scale: float | None) -> Any:
    """A :class:`~largebatch.client.optim.GradientNoiseScale` reading ``model``'s gradients.

    Under DDP with several ranks, a communication hook compares each rank's local gradient (the
    ``per_device x accumulation`` examples it saw) with the all-reduced one; in one process, tensor
    hooks read every micro-batch's gradient, which needs ``accumulation >= 2``.
    """
    from .optim import GradientNoiseScale

    noise = GradientNoiseScale(ema=ema)
    if hasattr(model, "register_comm_hook") and plan.world_size > 1:
        noise.attach_ddp(model, plan.per_device * plan.accumulation)
        return noise
    if plan.accumulation < 2:
        raise ValueError(
            f"measuring the noise scale in one process needs gradient accumulation: the plan trains "
            f"{plan.per_device} examples per step in one micro-batch, so there is no smaller batch to compare "
            "with; pass a per_device_batch_size below the batch to batch_plan() (or train under DDP)")
    params = model.parameters() if hasattr(model, "parameters") else model
    noise.attach_accumulation(params, plan.per_device,
                              grad_scale=float(plan.accumulation if grad_scale is None else grad_scale))
    return noise
