"""The step *prologue*, run once per ``step()`` over every parameter group: full-tensor squared norms
of the gradients (reduced across shards for DTensor parameters), the non-finite gradient check, and
the global gradient-norm clip factor.

The default ``nonfinite="skip"`` decides on the device whether a step is applied; the opt-in
``nonfinite="raise"`` reads that decision on the host, which synchronises.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._tensors import NormReducer, is_dense, local, sq_norm, sq_norms


class NonFiniteGradientError(FloatingPointError):
    """A gradient contains NaN or Inf; raised by ``step()`` before any state or parameter changes."""



@dataclass
class Prologue:
    """What every group's update needs from the whole-optimizer pass at the start of ``step()``."""

    g_sq: list[Tensor]  # per group: full ||g||^2 of each parameter with a gradient (1-D float64)
    ok: Tensor | None  # 0-d bool: the step is applied (skip mode only; None in raise mode)
    clip: list[Tensor | None]  # per group: divide gradients by this (global norm clipping), or None


def _first_device(groups: list[list[Tensor]]) -> torch.device | None:
    for tensors in groups:
        for t in tensors:
            return local(t).device
    return None


def run_prologue(
    owner: str,
    params: list[list[Tensor]],
    grads: list[list[Tensor]],
    *,
    max_grad_norm: list[float | None],
    nonfinite: str,
    names: list[list[str]] | None = None,
    norms: Callable[[list[Tensor]], Tensor] | None = None,
) -> Prologue:
    """Full-tensor gradient norms, the non-finite check and the clip factors.

    The local squared norms go through one reduction per (mesh, sharded dims), so under FSDP2 all ranks
    agree on the norms, on the clip factor and on whether the step is skipped. (Parameter norms are
    taken later, chunk by chunk, while the parameters are in cache.)
    """
    flat_g = [g for gs in grads for g in gs]
    device = _first_device(params)
    if device is None:
        return Prologue([torch.zeros(0, dtype=torch.float64) for _ in params], None, [None for _ in params])

    norm_fn = norms or sq_norms
    locals_ = [local(g) for g in flat_g]
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, g in enumerate(locals_):
        by_device[g.device].append(i)
    if len(by_device) == 1:
        g_local = norm_fn(locals_)
    else:  # gather the per-device norms on the first device, in order
        values: list[Tensor] = [torch.zeros((), dtype=torch.float64, device=device)] * len(locals_)
        for idx in by_device.values():
            for i, value in zip(idx, norm_fn([locals_[i] for i in idx]).to(device).unbind(), strict=True):
                values[i] = value
        g_local = torch.stack(values)
    g_full = NormReducer(flat_g)(g_local)
    total = g_full.sum()
    finite = torch.isfinite(total)
    ok: Tensor | None = None
    if nonfinite == "raise":
        # The opt-in debugging mode: an exception needs a Python bool, so this synchronises.
        if not bool(finite):
            raise NonFiniteGradientError(_nonfinite_message(owner, params, g_full, names))
    else:
        ok = finite

    clip: list[Tensor | None] = []
    global_norm = total.sqrt()
    for max_norm in max_grad_norm:
        if max_norm is None:
            clip.append(None)
        else:
            factor = torch.clamp(global_norm / max_norm, min=1.0)
            if ok is not None:
                factor = torch.where(ok, factor, torch.ones_like(factor))
            clip.append(factor)

    def regroup(flat: Tensor) -> list[Tensor]:
        out, start = [], 0
        for ps in params:
            out.append(flat[start : start + len(ps)])
            start += len(ps)
        return out

    return Prologue(regroup(g_full), ok, clip)


def _nonfinite_message(owner: str, params: list[list[Tensor]], g_sq: Tensor,
                       names: list[list[str]] | None) -> str:
    bad: list[str] = []
    finite = torch.isfinite(g_sq).tolist()
    k = 0
    for gi, ps in enumerate(params):
        for pi, p in enumerate(ps):
            if not finite[k]:
                label = names[gi][pi] if names and names[gi] and names[gi][pi] else f"group {gi}, parameter {pi}"
                bad.append(f"{label} {tuple(p.shape)}")
            k += 1
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return (
        f"{owner}.step(): non-finite gradient (NaN or Inf) in {shown}; no parameter or optimizer state "
        "was changed. Fix the loss, or use the default nonfinite='skip' to skip such steps on the device."
    )



def fused_sq_norms(tensors: list[Tensor], cache: Any) -> Tensor:
    """:func:`sq_norms` by the fused path's Triton kernel (tensors with a gap in memory: torch)."""
    from ._fused import sumsq_fused

    dense = [i for i, t in enumerate(tensors) if is_dense(t)]
    if len(dense) == len(tensors):
        return sumsq_fused(tensors, cache)
    values: list[Tensor] = [torch.zeros((), dtype=torch.float64, device=tensors[0].device)] * len(tensors)
    if dense:
        for i, value in zip(dense, sumsq_fused([tensors[i] for i in dense], cache).unbind(), strict=True):
            values[i] = value
    for i, t in enumerate(tensors):
        if not is_dense(t):
            values[i] = sq_norm(t)
    return torch.stack(values)
