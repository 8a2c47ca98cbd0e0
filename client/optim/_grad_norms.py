"""Squared gradient norms without a gradient copy, plain or weighted by a diagonal preconditioner: what
:class:`~largebatch.client.optim.GradientNoiseScale` and
:func:`~largebatch.client.optim.probe_noise_scale` read."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["adam_preconditioner", "grad_sq_norm"]


def grad_sq_norm(params: Iterable[torch.Tensor], *, scale: float = 1.0,
                 weights: Callable[[torch.Tensor], torch.Tensor | None] | None = None) -> torch.Tensor | None:
    """``scale^2 * sum |p.grad|^2`` over ``params`` as a 0-dim float64 tensor, without a gradient copy.

    With ``weights`` (parameter -> tensor of its shape, or None when not available), the P-weighted
    ``scale^2 * sum_i P_i grad_i^2``; None if a parameter with a gradient has no weights.
    DTensor (FSDP2) gradients count their local shards, summed over the mesh, so the result is the
    norm of the full gradient on every rank.
    """
    total: torch.Tensor | None = None
    sharded_groups = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        if hasattr(g, "to_local") and hasattr(g, "device_mesh"):
            sharded_groups.append(g.device_mesh.get_group())
            g = g.to_local()
        if g.numel() == 0:
            continue
        if weights is None:
            sq = _sq_norm(g)
        else:
            w = weights(p)
            if w is None:
                return None
            sq = _weighted_sq_norm(g, _local(w))
        total = sq if total is None else total + sq.to(total.device)
    if total is None:
        total = torch.zeros((), dtype=torch.float64)
    if sharded_groups:
        import torch.distributed as dist

        # One scalar per step; every DTensor of a model shares one mesh in practice.
        dist.all_reduce(total, group=sharded_groups[0])
    return total * (scale * scale)


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    # float32 accumulation for half-precision gradients; float64 gradients keep their precision
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(t, dtype=dtype).double() ** 2


def _weighted_sq_norm(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum w * g^2`` (float32 accumulation for half precision, as :func:`_sq_norm`)."""
    dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    return (g.to(dtype).square() * w.to(dtype)).sum().double()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "device_mesh") else t


def adam_preconditioner(optimizer: Any) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """Per-parameter weights ``P = 1 / (sqrt(v_hat) + eps)`` from an Adam-style optimizer's state.

    ``v_hat`` is the bias-corrected ``exp_avg_sq`` (``state["step"]``, the group's ``betas`` and
    ``eps``), read before the optimizer steps: P then does not depend on the gradients it weighs.
    Coordinates whose ``exp_avg_sq`` is still 0 (never had a gradient, e.g. the embedding row of a
    token not yet seen) get weight 0, not ``1/eps``: Adam has no scale for them yet, and one
    first gradient weighted by 1e8 would swamp the estimate. Returns None for a parameter with no
    state yet (before the first step): that step is not measured.
    """
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not hasattr(optimizer, "state"):
        raise ValueError(f"preconditioner must be an optimizer with param_groups and state, got {optimizer!r}")
    for i, group in enumerate(groups):
        if "betas" not in group or "eps" not in group:
            raise ValueError(f"preconditioner: param group {i} of {type(optimizer).__name__} has no 'betas'/'eps' "
                             "(an Adam-style optimizer is needed; pass a callable for other preconditioners)")

    group_of: dict[int, dict] = {}

    def weights(p: torch.Tensor) -> torch.Tensor | None:
        if id(p) not in group_of:  # (re)built when a parameter is new to it: param groups can be added
            group_of.clear()
            group_of.update({id(q): g for g in optimizer.param_groups for q in g["params"]})
        group = group_of.get(id(p))
        state = optimizer.state.get(p)
        if group is None or not state or "exp_avg_sq" not in state or "step" not in state:
            return None
        v, step = _local(state["exp_avg_sq"]), state["step"]
        # a tensor step (capturable/fused Adam) stays on the device: no host sync per parameter
        step = step.to(v.device, torch.float32) if isinstance(step, torch.Tensor) else float(step)
        v_hat = v.float() / (1.0 - group["betas"][1] ** step)
        return torch.where(v > 0, 1.0 / (v_hat.sqrt() + group["eps"]), torch.zeros_like(v_hat))

    return weights
