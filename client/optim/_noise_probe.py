"""B_simple at the current parameters alone, from independent micro-batches (not free: one backward
pass each): what a caller averages along the run where the streaming estimate, a ratio of means, reads
near the harmonic mean of the local values (README, "Critical batch")."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from ._grad_norms import _sq_norm

__all__ = ["NoiseProbe", "probe_noise_scale"]


class NoiseProbe(NamedTuple):
    """B_simple at one point: ``value`` = ``trace_sigma / grad_sq`` (None while |G|^2 <= 0, the
    signal not resolved by ``batches`` x ``batch_size`` examples)."""

    value: float | None
    trace_sigma: float
    grad_sq: float
    batches: int
    batch_size: int


class _LossOf(torch.nn.Module):
    """``loss_fn(model, batch)`` as a module, so :func:`torch.func.functional_call` can swap its parameters."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def probe_noise_scale(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
                      batches: Iterable[Any], batch_size: int) -> NoiseProbe:
    """B_simple = tr(Sigma) / |G|^2 at ``model``'s current parameters, from independent micro-batches.

    ``loss_fn(model, batch)`` returns the mean loss over one micro-batch of ``batch_size`` examples;
    ``batches`` yields k >= 2 of them, drawn independently. From their gradients g_1..g_k, the
    unbiased U-statistics |G|^2 ~ sum_{i != j} g_i.g_j / (k (k - 1)) and
    tr(Sigma) ~ batch_size (mean |g_i|^2 - |G|^2). |G|^2 is resolved once k x batch_size is well above
    B_noise. The gradients are taken with respect to detached aliases of the parameters (no copy):
    ``.grad`` is left as it is and tensor hooks (:meth:`GradientNoiseScale.attach_accumulation`)
    do not see them. Keeps one float64 running sum of the gradients (2x the parameters' fp32 memory).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    wrapper = _LossOf(model, loss_fn)
    aliases = {n: p.detach().requires_grad_() for n, p in wrapper.named_parameters() if p.requires_grad}
    if not aliases:
        raise ValueError("probe_noise_scale: the model has no parameters that require grad")
    params = list(aliases.values())
    total: list[torch.Tensor] | None = None
    diag: torch.Tensor | None = None  # on the gradients' device: no host sync per micro-batch
    k = 0
    for batch in batches:
        loss = torch.func.functional_call(wrapper, aliases, (batch,), strict=False)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar tensor (the mean loss over the batch), got {loss!r}")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        sq = sum(_sq_norm(g).to(grads[0].device) for g in grads)
        diag = sq if diag is None else diag + sq
        if total is None:
            total = [g.detach().to(torch.float64) for g in grads]
        else:
            for t, g in zip(total, grads, strict=True):
                t.add_(g.to(torch.float64))
        k += 1
    if k < 2 or total is None or diag is None:
        raise ValueError(f"probe_noise_scale needs at least 2 micro-batches, got {k}")
    sum_sq = sum(float(t.square().sum()) for t in total)
    grad_sq = (sum_sq - float(diag)) / (k * (k - 1))
    trace = batch_size * (float(diag) / k - grad_sq)
    value = max(trace, 0.0) / grad_sq if grad_sq > 0 and math.isfinite(grad_sq) else None
    return NoiseProbe(value, trace, grad_sq, k, batch_size)
