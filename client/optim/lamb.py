r"""LAMB: You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020.

Algorithm 2 of the paper, per parameter tensor ``x`` (a "layer") with gradient ``g`` at step ``t``:

.. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
    \hat m = m_t / (1-\beta_1^t), \qquad \hat v = v_t / (1-\beta_2^t) \\
    r = \hat m / (\sqrt{\hat v} + \epsilon), \qquad u = r + \lambda x \\
    x \leftarrow x - \eta\,\frac{\phi(\lVert x\rVert)}{\lVert u\rVert}\,u

with :math:`\phi(z) = \min(\max(z, \gamma_l), \gamma_u)` when ``phi_bounds=(γl, γu)`` and the identity
otherwise, and a trust ratio of 1 when either norm is 0. ``eps`` is added outside the square root (the
ICLR paper, TF-Addons, optax and apex's kernel; one extraction of the arXiv text prints it inside).

Named options, each off by default, reproduce the variants people actually run:

* ``max_grad_norm``: divide all gradients by ``max(1, global_norm / max_grad_norm)`` first, the global
  norm taken over every gradient of the optimizer (apex ``FusedLAMB``'s default of 1.0);
* ``skip_adaptation_without_decay``: no trust ratio for groups with ``weight_decay == 0`` (apex's
  ``use_nvlamb=False`` default, timm's ``always_adapt=False``);
* ``bias_correction=False``: use ``m_t`` and ``v_t`` directly;
* per group, ``weight_decay=0`` and ``layer_adaptation=False`` exclude a group from weight decay and
  from the trust ratio, separately.

:meth:`LAMB.from_apex_defaults` builds the apex ``FusedLAMB`` default configuration.
"""

from __future__ import annotations

import math
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

__all__ = ["LAMB", "lamb"]


class LAMB(LayerwiseOptimizer):
    r"""LAMB (Algorithm 2 of You et al. 2020), exactly, with apex's variants as named options.

    Args:
        params: parameters or parameter groups (see :func:`param_groups_for`).
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: added to :math:`\sqrt{\hat v}`.
        weight_decay: :math:`\lambda`, decoupled: inside the update whose norm is taken.
        bias_correction: divide the moments by :math:`1-\beta^t`.
        layer_adaptation: apply the trust ratio (``False`` for a group: a plain AdamW-like step).
        phi_bounds: ``(lower, upper)`` clamp of :math:`\lVert x\rVert` (the paper's φ), or ``None``.
        max_grad_norm: global gradient-norm clipping before the moments (apex), or ``None``.
        skip_adaptation_without_decay: no trust ratio where ``weight_decay == 0`` (apex, timm).
        nonfinite: ``"skip"`` (default): a step with a NaN/Inf gradient leaves parameters and state
            untouched, decided on the device without a host sync (torch's ``GradScaler`` convention), and
            is counted in :attr:`skip_counter` (a device tensor; :attr:`skipped_steps` reads it as an
            int); ``"raise"``: raise :class:`NonFiniteGradientError` before anything changes, a
            debugging mode that synchronises with the device on every step.
        foreach: ``False``: the single-tensor reference loop; ``None``/``True``: a multi-tensor path.
        fused: the fused multi-tensor kernels (two passes over all tensors): Triton on CUDA (see
            ``_fused``), C on CPU (see ``_cpu_fused``; compiled on first use, fp32/fp64). ``None``: on
            CUDA when Triton is importable, else the ``torch._foreach_*`` path (on CPU ``fused=True`` is
            opt-in, as for torch's AdamW); ``True``: required (an error where no kernel can run);
            ``False``: never.
        capturable: keep ``lr`` as a float64 tensor on the parameters' device (step counters always
            are), so that ``step()`` can be captured in a CUDA graph and LR schedulers still work.

    State per parameter: ``step`` (0-d float32 tensor on the parameter's device), ``exp_avg`` and
    ``exp_avg_sq`` (fp32 for bf16/fp16 parameters). ``p.grad`` is never modified.
    """

    _state_keys = ("exp_avg", "exp_avg_sq")
    _owner = "LAMB"

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
        max_grad_norm: float | None = None,
        skip_adaptation_without_decay: bool = False,
        nonfinite: str = DEFAULT_NONFINITE,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps, weight_decay=weight_decay,
            bias_correction=bias_correction, layer_adaptation=layer_adaptation, phi_bounds=phi_bounds,
            max_grad_norm=max_grad_norm, skip_adaptation_without_decay=skip_adaptation_without_decay,
            nonfinite=nonfinite, foreach=foreach, fused=fused, capturable=capturable,
        )
        self.chunk_numel: int | None = DEFAULT_CHUNK_NUMEL
        # the foreach path's moment update by torch's fused Adam kernel (a test switches it off)
        self._torch_fused_adam = True
        super().__init__(params, defaults)

    @classmethod
    def from_apex_defaults(cls, params: Any, lr: float = 1e-3, **overrides: Any) -> LAMB:
        """NVIDIA apex ``FusedLAMB()`` with its defaults: eps 1e-6, weight decay 0.01, global gradient
        clipping at 1.0, and no trust ratio for groups without weight decay (``use_nvlamb=False``)."""
        kwargs: dict[str, Any] = dict(betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                                      max_grad_norm=1.0, skip_adaptation_without_decay=True)
        kwargs.update(overrides)
        return cls(params, lr, **kwargs)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonnegative("epsilon", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_bool("bias_correction", group["bias_correction"])
        if group["max_grad_norm"] is not None:
            value = group["max_grad_norm"]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"Invalid max_grad_norm value: {value} (expected None or a number > 0)")
        check_bool("skip_adaptation_without_decay", group["skip_adaptation_without_decay"])
        check_common_options(group)

    @staticmethod
    def _adapts(group: dict[str, Any]) -> bool:
        return group["layer_adaptation"] and not (group["skip_adaptation_without_decay"] and group["weight_decay"] == 0)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    states: list[dict[str, Any]], prologue: Prologue, gi: int, path: str) -> None:
        beta1, beta2 = group["betas"]
        run_group(
            _multi_tensor_lamb, _single_tensor_lamb, _fused_lamb, params, grads, [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
            clip=prologue.clip[gi], ok=prologue.ok, path=path, lr=group["lr"], beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"], bias_correction=group["bias_correction"],
            adapt=self._adapts(group), phi_bounds=group["phi_bounds"], scratch=self._scratch,
            chunk_numel=self.chunk_numel, torch_fused_adam=self._torch_fused_adam,
            cache=self.fused_cache() if path == "fused" else None,
        )


def lamb(
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
    max_grad_norm: float | None = None,
    skip_adaptation_without_decay: bool = False,
    nonfinite: str = DEFAULT_NONFINITE,
) -> Tensor | None:
    """Functional LAMB over one group of tensors (see :class:`LAMB`); updates everything in place.

    ``state_steps`` are 0-d float32 tensors, incremented here. Returns, with ``nonfinite="skip"``, a
    0-d bool tensor telling whether the step was applied, else ``None``.
    """
    check_nonfinite(nonfinite)
    adapt = layer_adaptation and not (skip_adaptation_without_decay and weight_decay == 0)
    path = pick_path(foreach, fused, params)
    cache = None
    if path == "fused":
        from ._fused import FusedCache

        cache = FusedCache()
    prologue = run_prologue("lamb", [list(params)], [list(grads)], max_grad_norm=[max_grad_norm],
                            nonfinite=nonfinite)
    run_group(
        _multi_tensor_lamb, _single_tensor_lamb, _fused_lamb, params, grads, exp_avgs, exp_avg_sqs, state_steps,
        clip=prologue.clip[0], ok=prologue.ok, path=path, lr=lr, beta1=beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, bias_correction=bias_correction, adapt=adapt, phi_bounds=phi_bounds,
        scratch=Scratch(), chunk_numel=DEFAULT_CHUNK_NUMEL, torch_fused_adam=True, cache=cache,
    )
    return prologue.ok


def _single_tensor_lamb(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor], *, clip: Tensor | None, ok: Tensor | None,
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
        if ok is not None:  # nonfinite="skip": a skipped step must leave everything untouched
            g = torch.where(ok, g, torch.zeros_like(g))
        if clip is not None:
            g = g / clip.to(g.dtype)

        if ok is None:
            step += 1
            b1, b2 = beta1, beta2
        else:
            step += ok.to(step.dtype)
            b1 = where_ok(ok, beta1, x.dtype)
            b2 = where_ok(ok, beta2, x.dtype)
        m.mul_(b1).add_(g, alpha=1 - beta1)
        v.mul_(b2).addcmul_(g, g, value=1 - beta2)

        if bias_correction:
            t = steps_for_bias_correction(step)
            m_hat = m / (1 - beta1**t).to(x.dtype)
            v_hat = v / (1 - beta2**t).to(x.dtype)
        else:
            m_hat, v_hat = m, v
        update = m_hat / (v_hat.sqrt() + eps)
        if weight_decay != 0:
            update = update + weight_decay * x

        scale = -lr * torch.ones((), dtype=torch.float64, device=x.device)
        if adapt:
            sq = NormReducer([param, param])(torch.stack([sq_norm(x), sq_norm(update)]))
            scale = scale * trust_ratios(sq[0], sq[1], phi_bounds)
        if ok is not None:
            scale = scale * ok
        x.add_(update * scale.to(x.dtype))
        if low:
            p.copy_(x)


def _multi_tensor_lamb(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor], *, clip: Tensor | None, ok: Tensor | None,
    torch_fused_adam: bool, lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
    bias_correction: bool, adapt: bool, phi_bounds: tuple[float, float] | None, scratch: Scratch,
    chunk_numel: int | None,
) -> None:
    """Same math with ``torch._foreach_*`` over chunks of tensors, the moments by torch's fused Adam.

    Per chunk: ``u = λx`` into a scratch buffer; the fused Adam kernel with ``lr = -1`` adds
    ``m̂/(√v̂+ε)`` to it while updating ``m`` and ``v`` (one pass over g, m, v, u); the norms of ``x``
    and ``u``; then ``x += -η·τ·u`` in one ``addcmul``. A chunk is small enough to stay in cache
    between passes. Without torch's fused Adam kernel (an unsupported device, or while
    ``torch.compile`` traces) the moments and ``u`` are computed with ``torch._foreach_*`` ops.
    """
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
                _single_tensor_lamb(
                    [params[i] for i in slow], [grads[i] for i in slow], [exp_avgs[i] for i in slow],
                    [exp_avg_sqs[i] for i in slow], [state_steps[i] for i in slow],
                    clip=clip, ok=ok, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                    bias_correction=bias_correction, adapt=adapt, phi_bounds=phi_bounds,
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
        found_inf = None if ok is None else (~ok).to(device=device, dtype=torch.float32)
        ok_dev = None if ok is None else ok.to(device)
        increment_steps(steps, ok_dev)
        # sharded tensors: one chunk, so that their norms take one collective
        limit = None if any(is_dtensor(params[i]) for i in idx) else chunk_numel

        for chunk in chunk_indices([x.numel() for x in xs], limit):
            cx = [xs[k] for k in chunk]
            cg = [gs[k] for k in chunk]
            cm = [ms[k] for k in chunk]
            cv = [vs[k] for k in chunk]
            cs = [steps[k] for k in chunk]
            if use_fused:
                us = scratch.views(cx)
                if weight_decay != 0:
                    for x, u in zip(cx, us, strict=True):  # (the _foreach out= variants copy on CPU)
                        torch.mul(x, weight_decay, out=u)
                else:
                    torch._foreach_zero_(us)
                if clip is not None:
                    # the kernel's own grad_scale would write the unscaled gradient back into p.grad
                    g_in = scratch.views(cg, slot=1)
                    clip_c = clip.to(device=device, dtype=cdt)
                    for g, out in zip(cg, g_in, strict=True):
                        torch.div(g, clip_c, out=out)
                else:
                    g_in = cg
                if bias_correction:
                    kernel_steps = cs
                else:  # the kernel always divides by 1 - beta**step; beta**inf == 0 makes that 1
                    kernel_steps = [torch.full((), math.inf, dtype=torch.float32, device=device)] * len(cs)
                torch._fused_adam_(
                    us, g_in, cm, cv, [], kernel_steps, lr=-1.0, beta1=beta1, beta2=beta2, weight_decay=0.0,
                    eps=eps, amsgrad=False, maximize=False, found_inf=found_inf,
                )
            else:
                g_in = cg
                if ok_dev is not None:
                    g_in = [torch.where(ok_dev, g, torch.zeros_like(g)) for g in g_in]
                if clip is not None:
                    g_in = torch._foreach_div(g_in, clip.to(device=device, dtype=cdt))
                if ok_dev is None:
                    b1: float | Tensor = beta1
                    b2: float | Tensor = beta2
                else:
                    b1 = where_ok(ok_dev, beta1, cdt)
                    b2 = where_ok(ok_dev, beta2, cdt)
                torch._foreach_mul_(cm, b1)
                torch._foreach_add_(cm, g_in, alpha=1 - beta1)
                torch._foreach_mul_(cv, b2)
                torch._foreach_addcmul_(cv, g_in, g_in, value=1 - beta2)
                if bias_correction:
                    t = steps_for_bias_correction(torch.stack(cs))
                    bc1 = list((1 - beta1**t).to(cdt).unbind())
                    bc2 = list((1 - beta2**t).to(cdt).unbind())
                    us = torch._foreach_div(cm, bc1)
                    denom = torch._foreach_div(cv, bc2)
                else:
                    us = [m.clone() for m in cm]
                    denom = [v.clone() for v in cv]
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, eps)
                torch._foreach_div_(us, denom)
                if weight_decay != 0:
                    torch._foreach_add_(us, cx, alpha=weight_decay)

            scale = torch.full((len(chunk),), -1.0, dtype=torch.float64, device=device) * lr
            if adapt:
                n = len(chunk)
                sq = NormReducer([params[idx[k]] for k in chunk] * 2)(torch.cat([sq_norms(cx), sq_norms(us)]))
                scale = scale * trust_ratios(sq[:n], sq[n:], phi_bounds)
            if ok_dev is not None:
                scale = scale * ok_dev
            torch._foreach_addcmul_(cx, us, list(scale.to(cdt).unbind()))
        if low:
            torch._foreach_copy_(p_loc, xs)


def _fused_lamb(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor], *, clip: Tensor | None, ok: Tensor | None, lr: float | Tensor, beta1: float,
    beta2: float, eps: float, weight_decay: float, bias_correction: bool, adapt: bool,
    phi_bounds: tuple[float, float] | None, cache: Any,
) -> None:
    """Same math by the Triton kernels of :mod:`._fused`: two launches per (device, dtypes)."""
    from ._fused import lamb_fused

    if not params:
        return
    for (device, _), idx in fused_subgroups(params, grads).items():
        slow = [i for i in idx if not fused_takes(device, local(params[i]), local(grads[i]), local(exp_avgs[i]),
                                                   local(exp_avg_sqs[i]))]
        if slow:  # the kernels walk memory linearly: other layouts (and dtypes they lack) take the reference
            _single_tensor_lamb(
                [params[i] for i in slow], [grads[i] for i in slow], [exp_avgs[i] for i in slow],
                [exp_avg_sqs[i] for i in slow], [state_steps[i] for i in slow], clip=clip, ok=ok, lr=lr,
                beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                adapt=adapt, phi_bounds=phi_bounds,
            )
            idx = [i for i in idx if i not in set(slow)]
            if not idx:
                continue
        steps = [state_steps[i] for i in idx]
        ok_dev = None if ok is None else ok.to(device)
        increment_steps(steps, ok_dev)
        t = steps_for_bias_correction(torch.stack(steps))
        members = [params[i] for i in idx]
        reduce = RowsReducer(members) if any(is_dtensor(m) for m in members) else None
        lamb_fused(
            [local(params[i]) for i in idx], [local(grads[i]) for i in idx], [local(exp_avgs[i]) for i in idx],
            [local(exp_avg_sqs[i]) for i in idx], bc1=1 - beta1**t, bc2=1 - beta2**t, ok=ok_dev,
            clip=None if clip is None else clip.to(device), beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, bias_correction=bias_correction, adapt=adapt, phi_bounds=phi_bounds,
            cache=cache, reduce=reduce, lr=lr,
        )


