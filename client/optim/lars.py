r"""LARS as Algorithm 1 of You et al. 2020 (the LAMB paper), for the CNN recipes.

Per parameter tensor ``x`` with gradient ``g``:

.. math::
    m_t = \beta m_{t-1} + (1-\beta)(g_t + \lambda x_t) \\
    x \leftarrow x - \eta\,\frac{c\,\phi(\lVert x\rVert)}{\lVert m_t\rVert + \epsilon}\,m_t

``c`` is ``trust_coefficient`` (1 in the paper, where φ absorbs it; 0.001 in the original LARS recipes),
``eps`` is 0 by default (the paper's update has none), and the ratio is 1 when either norm is 0. Note the
``(1-β)`` dampening of the paper's momentum, which ``torch.optim.SGD`` does not apply by default.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._core import (
    DEFAULT_NONFINITE,
    LOW_PRECISION,
    LayerwiseOptimizer,
    NormReducer,
    Prologue,
    check_common_options,
    check_lr,
    check_nonfinite,
    check_nonnegative,
    compute_dtype,
    group_by_device_dtype,
    local,
    pick_path,
    run_group,
    run_prologue,
    sq_norm,
    sq_norms,
    trust_ratios,
    where_ok,
)

__all__ = ["LARS", "lars"]


class LARS(LayerwiseOptimizer):
    r"""LARS (Algorithm 1 of You et al. 2020).

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta`.
        momentum: :math:`\beta`, with ``(1-β)`` dampening as in the paper.
        weight_decay: :math:`\lambda`, added to the gradient before the momentum.
        trust_coefficient: multiplies the trust ratio.
        eps: added to :math:`\lVert m\rVert` in the trust ratio.
        layer_adaptation: apply the trust ratio (``False``: plain momentum step).
        phi_bounds: ``(lower, upper)`` clamp of :math:`\lVert x\rVert`, or ``None``.
        nonfinite, foreach, capturable: as in :class:`LAMB` (default ``nonfinite="skip"``; LARS has no
            fused kernel).

    State per parameter: ``step`` and ``momentum_buffer`` (fp32 for bf16/fp16 parameters).
    """

    _state_keys = ("momentum_buffer",)
    _owner = "LARS"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        trust_coefficient: float = 1.0,
        eps: float = 0.0,
        layer_adaptation: bool = True,
        phi_bounds: tuple[float, float] | None = None,
        nonfinite: str = DEFAULT_NONFINITE,
        foreach: bool | None = None,
        capturable: bool = False,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps,
            layer_adaptation=layer_adaptation, phi_bounds=phi_bounds, nonfinite=nonfinite, foreach=foreach,
            capturable=capturable,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        momentum = group["momentum"]
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        check_nonnegative("weight_decay", group["weight_decay"])
        coefficient = group["trust_coefficient"]
        if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float)) or not coefficient > 0:
            raise ValueError(f"Invalid trust_coefficient value: {coefficient}")
        check_nonnegative("epsilon", group["eps"])
        check_common_options(group)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    states: list[dict[str, Any]], prologue: Prologue, gi: int, path: str) -> None:
        run_group(
            _multi_tensor_lars, _single_tensor_lars, None, params, grads, [s["momentum_buffer"] for s in states],
            [s["step"] for s in states], ok=prologue.ok, path=path,
            lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
            trust_coefficient=group["trust_coefficient"], eps=group["eps"], adapt=group["layer_adaptation"],
            phi_bounds=group["phi_bounds"],
        )


def lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float = 1.0,
    eps: float = 0.0,
    layer_adaptation: bool = True,
    phi_bounds: tuple[float, float] | None = None,
    nonfinite: str = DEFAULT_NONFINITE,
) -> Tensor | None:
    """Functional LARS over one group of tensors (see :class:`LARS`); returns ``ok`` like :func:`lamb`."""
    check_nonfinite(nonfinite)
    prologue = run_prologue("lars", [list(params)], [list(grads)], max_grad_norm=[None], nonfinite=nonfinite)
    run_group(
        _multi_tensor_lars, _single_tensor_lars, None, params, grads, momentum_buffers, state_steps,
        ok=prologue.ok, path=pick_path(foreach, False, params), lr=lr, momentum=momentum, weight_decay=weight_decay,
        trust_coefficient=trust_coefficient, eps=eps, adapt=layer_adaptation, phi_bounds=phi_bounds,
    )
    return prologue.ok


def _single_tensor_lars(
    params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], state_steps: list[Tensor], *,
    ok: Tensor | None, lr: float | Tensor, momentum: float, weight_decay: float,
    trust_coefficient: float, eps: float, adapt: bool, phi_bounds: tuple[float, float] | None,
) -> None:
    """The reference: Algorithm 1 written out per tensor."""
    for i, param in enumerate(params):
        p = local(param)
        m, step = local(bufs[i]), state_steps[i]
        low = p.dtype in LOW_PRECISION
        x = p.float() if low else p
        g = local(grads[i]).to(x.dtype)
        if ok is not None:
            g = torch.where(ok, g, torch.zeros_like(g))
        d = g + weight_decay * x if weight_decay != 0 else g
        if ok is None:
            step += 1
            m.mul_(momentum).add_(d, alpha=1 - momentum)
        else:
            step += ok.to(step.dtype)
            m.mul_(where_ok(ok, momentum, x.dtype)).add_(d * (ok.to(x.dtype) * (1 - momentum)))

        scale = -lr * torch.ones((), dtype=torch.float64, device=x.device)
        if adapt:
            sq = NormReducer([param, param])(torch.stack([sq_norm(x), sq_norm(m)]))
            scale = scale * trust_ratios(sq[0], sq[1], phi_bounds, trust_coefficient, eps)
        if ok is not None:
            scale = scale * ok
        x.add_(m * scale.to(x.dtype))
        if low:
            p.copy_(x)


def _multi_tensor_lars(
    params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], state_steps: list[Tensor], *,
    ok: Tensor | None, lr: float | Tensor, momentum: float, weight_decay: float,
    trust_coefficient: float, eps: float, adapt: bool, phi_bounds: tuple[float, float] | None,
) -> None:
    """Same math with ``torch._foreach_*`` (LARS has one moment; no scratch buffer is needed)."""
    if not params:
        return
    for (device, dtype), idx in group_by_device_dtype(len(params), params).items():
        cdt = compute_dtype(dtype)
        low = dtype in LOW_PRECISION
        p_loc = [local(params[i]) for i in idx]
        xs = [p.float() for p in p_loc] if low else p_loc
        gs = [local(grads[i]) for i in idx]
        if any(g.dtype != cdt for g in gs):
            gs = [g.to(cdt) for g in gs]
        ms = [local(bufs[i]) for i in idx]
        steps = [state_steps[i] for i in idx]
        ok_dev = None if ok is None else ok.to(device)
        if ok_dev is not None:
            gs = [torch.where(ok_dev, g, torch.zeros_like(g)) for g in gs]
        ds = torch._foreach_add(gs, xs, alpha=weight_decay) if weight_decay != 0 else gs
        if ok_dev is None:
            torch._foreach_add_(steps, 1.0)
            torch._foreach_mul_(ms, momentum)
            torch._foreach_add_(ms, ds, alpha=1 - momentum)
        else:
            torch._foreach_add_(steps, [ok_dev.to(torch.float32)] * len(steps))  # (the Tensor overload calls .item())
            torch._foreach_mul_(ms, where_ok(ok_dev, momentum, cdt))
            torch._foreach_addcmul_(ms, ds, [ok_dev.to(cdt) * (1 - momentum)] * len(ds))

        scale = torch.full((len(idx),), -1.0, dtype=torch.float64, device=device) * lr
        if adapt:
            n = len(idx)
            sq = NormReducer([params[i] for i in idx] * 2)(torch.cat([sq_norms(xs), sq_norms(ms)]))
            scale = scale * trust_ratios(sq[:n], sq[n:], phi_bounds, trust_coefficient, eps)
        if ok_dev is not None:
            scale = scale * ok_dev
        torch._foreach_addcmul_(xs, ms, list(scale.to(cdt).unbind()))
        if low:
            torch._foreach_copy_(p_loc, xs)
