r"""LANS: Zheng et al., "Accelerated Large Batch Optimization of BERT Pretraining in 54 minutes", 2020.

Algorithm 2 of the paper, per parameter tensor ``x`` (a "block") with gradient ``g`` at step ``t``:

.. math::
    \tilde g = g / \lVert g\rVert \\
    m_t = \beta_1 m_{t-1} + (1-\beta_1)\tilde g, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2)\tilde g^2 \\
    \hat m = m_t/(1-\beta_1^t), \qquad \hat v = v_t/(1-\beta_2^t) \\
    r = \hat m/(\sqrt{\hat v}+\epsilon) + \lambda x, \qquad c = \tilde g/(\sqrt{\hat v}+\epsilon) + \lambda x \\
    x \leftarrow x - \eta\,\phi(\lVert x\rVert)\Big[\frac{\beta_1}{\lVert r\rVert} r
        + \frac{1-\beta_1}{\lVert c\rVert} c\Big]

A block whose gradient is all zeros gets :math:`\tilde g = 0` (the paper divides by 0; the official
kernel adds eps to the norm instead, which changes every block). Each of the two trust ratios is 1 when
one of its norms is 0. There is no gradient clipping: the per-block normalisation replaces it.
``eps`` is added outside the square root, as in the official kernel (``szhengac/apex@lans``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._core import (
    DEFAULT_CHUNK_NUMEL,
    DEFAULT_NONFINITE,
    LOW_PRECISION,
    LayerwiseOptimizer,
    NormReducer,
    Prologue,
    RowsReducer,
    Scratch,
    check_betas,
    check_bool,
    check_common_options,
    check_lr,
    check_nonfinite,
    check_nonnegative,
    chunk_indices,
    compute_dtype,
    fused_kernel_ok,
    fused_layout_ok,
    fused_subgroups,
    fused_takes,
    group_by_device_dtype,
    increment_steps,
    is_dtensor,
    local,
    pick_path,
    run_group,
    run_prologue,
    sq_norm,
    sq_norms,
    steps_for_bias_correction,
    trust_ratios,
    where_ok,
)

__all__ = ["LANS", "lans"]


class LANS(LayerwiseOptimizer):
    r"""LANS (Algorithm 2 of Zheng et al. 2020).

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`; :math:`\beta_1` also weighs the two directions.
        eps: added to :math:`\sqrt{\hat v}`.
        weight_decay: :math:`\lambda`, inside both directions.
        bias_correction: divide the moments by :math:`1-\beta^t`.
        layer_adaptation: apply the two trust ratios (``False``: both are 1).
        phi_bounds: ``(lower, upper)`` clamp of :math:`\lVert x\rVert`, or ``None`` (identity).
        nonfinite, foreach, fused, capturable: as in :class:`LAMB` (default ``nonfinite="skip"``).

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` (fp32 for bf16/fp16 parameters).
    """

    _state_keys = ("exp_avg", "exp_avg_sq")
    _owner = "LANS"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        *,
        bias_correction: bool = True,
        layer_adaptation: bool = True,
        phi_bounds: tuple[float, float] | None = None,
        nonfinite: str = DEFAULT_NONFINITE,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps, weight_decay=weight_decay,
            bias_correction=bias_correction, layer_adaptation=layer_adaptation, phi_bounds=phi_bounds,
            nonfinite=nonfinite, foreach=foreach, fused=fused, capturable=capturable,
        )
        self.chunk_numel: int | None = DEFAULT_CHUNK_NUMEL
        self._torch_fused_adam = True
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonnegative("epsilon", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_bool("bias_correction", group["bias_correction"])
        check_common_options(group)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    states: list[dict[str, Any]], prologue: Prologue, gi: int, path: str) -> None:
        beta1, beta2 = group["betas"]
        run_group(
            _multi_tensor_lans, _single_tensor_lans, _fused_lans, params, grads, [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
            g_sq=prologue.g_sq[gi], ok=prologue.ok, path=path, lr=group["lr"], beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"], bias_correction=group["bias_correction"],
            adapt=group["layer_adaptation"], phi_bounds=group["phi_bounds"], scratch=self._scratch,
            chunk_numel=self.chunk_numel, torch_fused_adam=self._torch_fused_adam,
            cache=self.fused_cache() if path == "fused" else None,
        )


def lans(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    fused: bool | None = None,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool = True,
    layer_adaptation: bool = True,
    phi_bounds: tuple[float, float] | None = None,
    nonfinite: str = DEFAULT_NONFINITE,
) -> Tensor | None:
    """Functional LANS over one group of tensors (see :class:`LANS`); returns ``ok`` like :func:`lamb`."""
    check_nonfinite(nonfinite)
    path = pick_path(foreach, fused, params)
    cache = None
    if path == "fused":
        from ._fused import FusedCache

        cache = FusedCache()
    prologue = run_prologue("lans", [list(params)], [list(grads)], max_grad_norm=[None], nonfinite=nonfinite)
    run_group(
        _multi_tensor_lans, _single_tensor_lans, _fused_lans, params, grads, exp_avgs, exp_avg_sqs, state_steps,
        g_sq=prologue.g_sq[0], ok=prologue.ok, path=path, lr=lr, beta1=beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, bias_correction=bias_correction, adapt=layer_adaptation,
        phi_bounds=phi_bounds, scratch=Scratch(), chunk_numel=DEFAULT_CHUNK_NUMEL, torch_fused_adam=True,
        cache=cache,
    )
    return prologue.ok


def _normaliser(g_sq: Tensor) -> Tensor:
    """||g||, or 1 for an all-zero (or non-finite, then skipped) block: dividing leaves it as it is."""
    norm = g_sq.sqrt()
    return torch.where(norm > 0, norm, torch.ones_like(norm))


def _single_tensor_lans(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor], *, g_sq: Tensor, ok: Tensor | None,
    lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction: bool,
    adapt: bool, phi_bounds: tuple[float, float] | None,
) -> None:
    """The reference: Algorithm 2 written out per tensor."""
    for i, param in enumerate(params):
        p = local(param)
        m, v, step = local(exp_avgs[i]), local(exp_avg_sqs[i]), state_steps[i]
        low = p.dtype in LOW_PRECISION
        x = p.float() if low else p
        g = local(grads[i]).to(x.dtype)
        if ok is not None:
            g = torch.where(ok, g, torch.zeros_like(g))
        g_hat = g / _normaliser(g_sq[i]).to(x.dtype)

        if ok is None:
            step += 1
            b1, b2 = beta1, beta2
        else:
            step += ok.to(step.dtype)
            b1 = where_ok(ok, beta1, x.dtype)
            b2 = where_ok(ok, beta2, x.dtype)
        m.mul_(b1).add_(g_hat, alpha=1 - beta1)
        v.mul_(b2).addcmul_(g_hat, g_hat, value=1 - beta2)

        if bias_correction:
            t = steps_for_bias_correction(step)
            m_hat = m / (1 - beta1**t).to(x.dtype)
            v_hat = v / (1 - beta2**t).to(x.dtype)
        else:
            m_hat, v_hat = m, v
        denom = v_hat.sqrt() + eps
        r = m_hat / denom
        c = g_hat / denom
        if weight_decay != 0:
            r = r + weight_decay * x
            c = c + weight_decay * x

        scale_r = -lr * beta1 * torch.ones((), dtype=torch.float64, device=x.device)
        scale_c = -lr * (1 - beta1) * torch.ones((), dtype=torch.float64, device=x.device)
        if adapt:
            sq = NormReducer([param] * 3)(torch.stack([sq_norm(x), sq_norm(r), sq_norm(c)]))
            scale_r = scale_r * trust_ratios(sq[0], sq[1], phi_bounds)
            scale_c = scale_c * trust_ratios(sq[0], sq[2], phi_bounds)
        if ok is not None:
            scale_r = scale_r * ok
            scale_c = scale_c * ok
        x.add_(r * scale_r.to(x.dtype) + c * scale_c.to(x.dtype))
        if low:
            p.copy_(x)


def _multi_tensor_lans(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor], *, g_sq: Tensor, ok: Tensor | None,
    torch_fused_adam: bool, lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
    bias_correction: bool, adapt: bool, phi_bounds: tuple[float, float] | None, scratch: Scratch,
    chunk_numel: int | None,
) -> None:
    """Same math over chunks of tensors: ``g̃`` and ``c`` share one scratch buffer, ``r`` another."""
    if not params:
        return
    for (device, dtype), idx in group_by_device_dtype(len(params), params).items():
        cdt = compute_dtype(dtype)
        low = dtype in LOW_PRECISION
        use_fused = torch_fused_adam and fused_kernel_ok(device)
        if use_fused:
            # the kernel walks memory linearly: a parameter whose gradient or state is laid out
            # differently (or that is not dense) takes the reference path
            slow = [i for i in idx if not fused_layout_ok(
                local(params[i]), local(grads[i]), local(exp_avgs[i]), local(exp_avg_sqs[i]))]
            if slow:
                _single_tensor_lans(
                    [params[i] for i in slow], [grads[i] for i in slow], [exp_avgs[i] for i in slow],
                    [exp_avg_sqs[i] for i in slow], [state_steps[i] for i in slow],
                    g_sq=torch.stack([g_sq[i] for i in slow]), ok=ok, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                    weight_decay=weight_decay, bias_correction=bias_correction, adapt=adapt, phi_bounds=phi_bounds,
                )
                slow_set = set(slow)
                idx = [i for i in idx if i not in slow_set]
                if not idx:
                    continue
        p_loc = [local(params[i]) for i in idx]
        xs = [p.float() for p in p_loc] if low else p_loc
        gs = [local(grads[i]) for i in idx]
        if any(g.dtype != cdt for g in gs):
            gs = [g.to(cdt) for g in gs]
        ms = [local(exp_avgs[i]) for i in idx]
        vs = [local(exp_avg_sqs[i]) for i in idx]
        steps = [state_steps[i] for i in idx]
        norms = _normaliser(torch.stack([g_sq[i] for i in idx]).to(device)).to(cdt)
        found_inf = None if ok is None else (~ok).to(device=device, dtype=torch.float32)
        ok_dev = None if ok is None else ok.to(device)
        if ok_dev is None:
            torch._foreach_add_(steps, 1.0)
        else:
            torch._foreach_add_(steps, [ok_dev.to(torch.float32)] * len(steps))  # (the Tensor overload calls .item())
        # sharded tensors: one chunk, so that their norms take one collective
        limit = None if any(is_dtensor(params[i]) for i in idx) else chunk_numel

        for chunk in chunk_indices([x.numel() for x in xs], limit):
            cx = [xs[k] for k in chunk]
            cm = [ms[k] for k in chunk]
            cv = [vs[k] for k in chunk]
            cs = [steps[k] for k in chunk]
            # g̃ = g / ||g|| into scratch slot 1 (it becomes c below)
            gh = scratch.views(cx, slot=1)
            for k, out in zip(chunk, gh, strict=True):  # (the _foreach out= variants copy on CPU)
                torch.div(gs[k], norms[k], out=out)
            if ok_dev is not None:
                for out in gh:
                    out.masked_fill_(~ok_dev, 0.0)
            if bias_correction:
                t = steps_for_bias_correction(torch.stack(cs))
                bc1 = (1 - beta1**t).to(cdt)
                sqrt_bc2 = (1 - beta2**t).sqrt().to(cdt)
            else:
                bc1 = sqrt_bc2 = torch.ones(len(chunk), dtype=cdt, device=device)

            if use_fused:
                rs = scratch.views(cx, slot=0)
                if weight_decay != 0:
                    for x, r in zip(cx, rs, strict=True):
                        torch.mul(x, weight_decay, out=r)
                else:
                    torch._foreach_zero_(rs)
                if bias_correction:
                    kernel_steps = cs
                else:  # the kernel always divides by 1 - beta**step; beta**inf == 0 makes that 1
                    kernel_steps = [torch.full((), float("inf"), dtype=torch.float32, device=device)] * len(cs)
                torch._fused_adam_(
                    rs, gh, cm, cv, [], kernel_steps, lr=-1.0, beta1=beta1, beta2=beta2, weight_decay=0.0,
                    eps=eps, amsgrad=False, maximize=False, found_inf=found_inf,
                )
                denom = scratch.views(cx, slot=2)
                for v, d in zip(cv, denom, strict=True):
                    torch.sqrt(v, out=d)
                torch._foreach_div_(denom, list(sqrt_bc2.unbind()))
                torch._foreach_add_(denom, eps)
            else:
                if ok_dev is None:
                    b1: float | Tensor = beta1
                    b2: float | Tensor = beta2
                else:
                    b1 = where_ok(ok_dev, beta1, cdt)
                    b2 = where_ok(ok_dev, beta2, cdt)
                torch._foreach_mul_(cm, b1)
                torch._foreach_add_(cm, gh, alpha=1 - beta1)
                torch._foreach_mul_(cv, b2)
                torch._foreach_addcmul_(cv, gh, gh, value=1 - beta2)
                denom = torch._foreach_div(cv, list((sqrt_bc2 * sqrt_bc2).unbind()))
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, eps)
                rs = torch._foreach_div(cm, list(bc1.unbind()))
                torch._foreach_div_(rs, denom)
                if weight_decay != 0:
                    torch._foreach_add_(rs, cx, alpha=weight_decay)
            cs_ = gh  # c = g̃ / denom + λx, in place of g̃
            torch._foreach_div_(cs_, denom)
            if weight_decay != 0:
                torch._foreach_add_(cs_, cx, alpha=weight_decay)

            scale_r = torch.full((len(chunk),), -beta1, dtype=torch.float64, device=device) * lr
            scale_c = torch.full((len(chunk),), -(1 - beta1), dtype=torch.float64, device=device) * lr
            if adapt:
                n = len(chunk)
                sq = NormReducer([params[idx[k]] for k in chunk] * 3)(
                    torch.cat([sq_norms(cx), sq_norms(rs), sq_norms(cs_)]))
                scale_r = scale_r * trust_ratios(sq[:n], sq[n : 2 * n], phi_bounds)
                scale_c = scale_c * trust_ratios(sq[:n], sq[2 * n :], phi_bounds)
            if ok_dev is not None:
                scale_r = scale_r * ok_dev
                scale_c = scale_c * ok_dev
            torch._foreach_addcmul_(cx, rs, list(scale_r.to(cdt).unbind()))
            torch._foreach_addcmul_(cx, cs_, list(scale_c.to(cdt).unbind()))
        if low:
            torch._foreach_copy_(p_loc, xs)


def _fused_lans(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor], *, g_sq: Tensor, ok: Tensor | None, lr: float | Tensor, beta1: float,
    beta2: float, eps: float, weight_decay: float, bias_correction: bool, adapt: bool,
    phi_bounds: tuple[float, float] | None, cache: Any,
) -> None:
    """Same math by the Triton kernels of :mod:`._fused`: two launches per (device, dtypes)."""
    from ._fused import lans_fused

    if not params:
        return
    for (device, _), idx in fused_subgroups(params, grads).items():
        slow = [i for i in idx if not fused_takes(device, local(params[i]), local(grads[i]), local(exp_avgs[i]),
                                                   local(exp_avg_sqs[i]))]
        if slow:  # the kernels walk memory linearly: other layouts (and dtypes they lack) take the reference
            _single_tensor_lans(
                [params[i] for i in slow], [grads[i] for i in slow], [exp_avgs[i] for i in slow],
                [exp_avg_sqs[i] for i in slow], [state_steps[i] for i in slow],
                g_sq=torch.stack([g_sq[i] for i in slow]), ok=ok, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, bias_correction=bias_correction, adapt=adapt, phi_bounds=phi_bounds,
            )
            idx = [i for i in idx if i not in set(slow)]
            if not idx:
                continue
        steps = [state_steps[i] for i in idx]
        ok_dev = None if ok is None else ok.to(device)
        increment_steps(steps, ok_dev)
        t = steps_for_bias_correction(torch.stack(steps))
        g_norm = _normaliser(torch.stack([g_sq[i] for i in idx]).to(device))
        members = [params[i] for i in idx]
        reduce = RowsReducer(members) if any(is_dtensor(m) for m in members) else None
        lans_fused(
            [local(params[i]) for i in idx], [local(grads[i]) for i in idx], [local(exp_avgs[i]) for i in idx],
            [local(exp_avg_sqs[i]) for i in idx], g_norm=g_norm, bc1=1 - beta1**t, bc2=1 - beta2**t, ok=ok_dev,
            beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
            adapt=adapt, phi_bounds=phi_bounds, cache=cache, reduce=reduce, lr=lr,
        )


