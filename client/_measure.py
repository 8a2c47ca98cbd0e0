"""Attaching the gradient-noise-scale estimator to a model for :meth:`Job.measure_noise` (torch parts
imported only here, when asked)."""

from __future__ import annotations

from typing import Any

from ._dist import BatchPlan


def attach_noise(model: Any, plan: BatchPlan, *, ema: float | None, grad_scale: float | None,
                 memory_examples: float | None = None) -> Any:
    """A :class:`~largebatch.client.optim.GradientNoiseScale` reading ``model``'s gradients.

    Under DDP with several ranks, a communication hook on the ``DistributedDataParallel`` wrapper
    compares each rank's local gradient (the ``per_device x accumulation`` examples it saw) with the
    all-reduced one; given the module it wraps (all an HF or Lightning callback holds), tensor hooks
    read each rank's micro-batches and the all-reduced ``.grad`` is the global batch. In one process,
    tensor hooks read every micro-batch's gradient, which needs ``accumulation >= 2``. Either way a
    step with another number of backward passes than the plan's is warned about and not measured.
    """
    from .optim import GradientNoiseScale

    noise = GradientNoiseScale(ema=ema, memory_examples=memory_examples)
    scale = float(plan.accumulation if grad_scale is None else grad_scale)
    params = model.parameters() if hasattr(model, "parameters") else model
    if plan.world_size > 1:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != plan.world_size:
            raise ValueError(f"the plan trains on {plan.world_size} ranks but this process has no process group "
                             "of that size: call measure_noise once torch.distributed is initialised")
        if hasattr(model, "register_comm_hook"):
            noise.attach_ddp(model, plan.per_device * plan.accumulation)
        else:
            noise.attach_accumulation(params, plan.per_device, grad_scale=scale, micro_batches=plan.accumulation,
                                      process_group=dist.group.WORLD)
        return noise
    if plan.accumulation < 2:
        raise ValueError(
            f"measuring the noise scale in one process needs gradient accumulation: the plan trains "
            f"{plan.per_device} examples per step in one micro-batch, so there is no smaller batch to compare "
            "with; pass a per_device_batch_size below the batch to batch_plan() (or train under DDP)")
    noise.attach_accumulation(params, plan.per_device, grad_scale=scale, micro_batches=plan.accumulation)
    return noise
