r"""One layer-wise Adam skeleton, of which LAMB and LANS are variants (as ``torch.optim`` makes AdamW a
flag on Adam).

Per parameter tensor ``x`` (a "layer" or "block") with gradient ``g`` at step ``t``:

.. math::
    g' = g / s, \qquad m_t = \beta_1 m_{t-1} + (1-\beta_1) g', \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g'^2 \\
    d = \sqrt{v_t/(1-\beta_2^t)} + \epsilon, \qquad r = \frac{m_t/(1-\beta_1^t)}{d} + \lambda x \\
    x \leftarrow x - \eta \sum_k a_k\,\frac{\phi(\lVert x\rVert)}{\lVert u_k\rVert}\,u_k

LAMB: ``s`` is the global clip factor (1 without ``max_grad_norm``) and one direction ``u = r``, ``a = 1``.
LANS (``nesterov``): ``s = ||g||`` per tensor (the normalised gradient ``g̃``), and two directions,
``r`` with ``a = β1`` and ``c = g̃/d + λx`` with ``a = 1-β1``. Everything else (the moments, the
bias correction, the decoupled weight decay inside each direction, the trust ratio of each direction,
the skip of non-finite steps, the three code paths) is this module's, once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._core import (
    DEFAULT_CHUNK_NUMEL,
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
    check_max_grad_norm,
    check_nonfinite,
    check_nonnegative,
    chunk_indices,
    compute_dtype,
    fused_kernel_ok,
    fused_layout_ok,
    fused_slow,
    fused_subgroups,
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

__all__ = ["ARGS_DOC", "LayerwiseAdam", "functional_step"]

# Docstring fragments shared by LAMB and LANS (``{name}`` is the optimizer's).
ARGS_DOC = {
    "params": "params: parameters or parameter groups (see :func:`param_groups_for`).",
    "lr": r"lr: learning rate :math:`\eta`.",
    "eps": r"eps: added to :math:`\sqrt{\hat v}` (outside the square root).",
    "bias_correction": r"bias_correction: divide the moments by :math:`1-\beta^t`.",
    "phi_bounds": r"phi_bounds: ``(lower, upper)`` clamp of :math:`\lVert x\rVert` (the paper's φ), or ``None``.",
    "nonfinite": """nonfinite: ``"skip"`` (default): a step with a NaN/Inf gradient leaves parameters and state
            untouched, decided on the device without a host sync (torch's ``GradScaler`` convention), and
            is counted in :attr:`skip_counter` (a device tensor; :attr:`skipped_steps` reads it as an
            int); ``"raise"``: raise :class:`NonFiniteGradientError` before anything changes, a
            debugging mode that synchronises with the device on every step.""",
    "foreach": "foreach: ``False``: the single-tensor reference loop; ``None``/``True``: a multi-tensor path.",
    "fused": """fused: the fused multi-tensor kernels (two passes over all tensors): Triton on CUDA (see
            ``_fused``), C on CPU (see ``_cpu_fused``; compiled on first use, fp32/fp64). ``None``
            (default): the fastest exact path of the device, the fused kernels wherever they run
            natively, else the ``torch._foreach_*`` path, with one log line saying why (no C compiler;
            no Triton); ``True``: required (an error where no kernel can run); ``False``: never.""",
    "capturable": """capturable: keep ``lr`` as a float64 tensor on the parameters' device (step counters always
            are), so that ``step()`` can be captured in a CUDA graph and LR schedulers still work.""",
    "state": """State per parameter: ``step`` (0-d float32 tensor on the parameter's device), ``exp_avg`` and
    ``exp_avg_sq`` (fp32 for bf16/fp16 parameters). ``p.grad`` is never modified.""",
}


def _normaliser(g_sq: Tensor) -> Tensor:
    """||g||, or 1 for an all-zero (or non-finite, then skipped) block: dividing leaves it as it is."""
    norm = g_sq.sqrt()
    return torch.where(norm > 0, norm, torch.ones_like(norm))


class LayerwiseAdam(LayerwiseOptimizer):
    """The skeleton: construction, validation and the step of one group. A variant sets ``_nesterov``
    (LANS's normalised gradient and two directions) and lists its options in ``__init__``."""

    _state_keys = ("exp_avg", "exp_avg_sq")
    _nesterov = False

    def __init__(self, params: Any, lr: float | Tensor, betas: Any, **options: Any):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, **options)
        self.chunk_numel: int | None = DEFAULT_CHUNK_NUMEL
        # the foreach path's moment update by torch's fused Adam kernel (a test switches it off)
        self._torch_fused_adam = True
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonnegative("epsilon", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_bool("bias_correction", group["bias_correction"])
        if "max_grad_norm" in group:
            check_max_grad_norm(group["max_grad_norm"])
        if "skip_adaptation_without_decay" in group:
            check_bool("skip_adaptation_without_decay", group["skip_adaptation_without_decay"])
        check_common_options(group)

    @staticmethod
    def _adapts(group: dict[str, Any]) -> bool:
        return group["layer_adaptation"] and not (
            group.get("skip_adaptation_without_decay", False) and group["weight_decay"] == 0)

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    states: list[dict[str, Any]], prologue: Prologue, gi: int, path: str) -> None:
        beta1, beta2 = group["betas"]
        g_norm = _normaliser(prologue.g_sq[gi]) if self._nesterov else None
        run_group(
            _multi_tensor, _single_tensor, _fused, params, grads, [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
            clip=prologue.clip[gi], g_norm=g_norm, ok=prologue.ok, path=path, lr=group["lr"], beta1=beta1,
            beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            bias_correction=group["bias_correction"], adapt=self._adapts(group), phi_bounds=group["phi_bounds"],
            nesterov=self._nesterov, scratch=self._scratch, chunk_numel=self.chunk_numel,
            torch_fused_adam=self._torch_fused_adam, cache=self.fused_cache() if path == "fused" else None,
        )


def functional_step(owner: str, nesterov: bool, params: list[Tensor], grads: list[Tensor],
                    exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], state_steps: list[Tensor],
                    foreach: bool | None, fused: bool | None, *, max_grad_norm: float | None, nonfinite: str,
                    adapt: bool, **hyper: Any) -> Tensor | None:
    """The functional forms :func:`lamb` and :func:`lans`: the prologue and one group's update."""
    check_nonfinite(nonfinite)
    path = pick_path(foreach, fused, params)
    cache = None
    if path == "fused":
        from ._fused import FusedCache

        cache = FusedCache()
    prologue = run_prologue(owner, [list(params)], [list(grads)], max_grad_norm=[max_grad_norm],
                            nonfinite=nonfinite)
    run_group(
        _multi_tensor, _single_tensor, _fused, params, grads, exp_avgs, exp_avg_sqs, state_steps,
        clip=prologue.clip[0], g_norm=_normaliser(prologue.g_sq[0]) if nesterov else None, ok=prologue.ok,
        path=path, adapt=adapt, nesterov=nesterov, scratch=Scratch(), chunk_numel=DEFAULT_CHUNK_NUMEL,
        torch_fused_adam=True, cache=cache, **hyper,
    )
    return prologue.ok


def _coefficients(nesterov: bool, beta1: float) -> tuple[float, ...]:
    return (beta1, 1 - beta1) if nesterov else (1.0,)


def _single_tensor(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor], *, clip: Tensor | None, g_norm: Tensor | None, ok: Tensor | None,
    lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction: bool,
    adapt: bool, phi_bounds: tuple[float, float] | None, nesterov: bool,
) -> None:
    """The reference: the algorithms written out per tensor."""
    coefs = _coefficients(nesterov, beta1)
    for i, param in enumerate(params):
        p = local(param)
        m, v, step = local(exp_avgs[i]), local(exp_avg_sqs[i]), state_steps[i]
        low = p.dtype in LOW_PRECISION
        x = p.float() if low else p
        g = local(grads[i]).to(x.dtype)
        if ok is not None:  # nonfinite="skip": a skipped step must leave everything untouched
            g = torch.where(ok, g, torch.zeros_like(g))
        divisor = g_norm[i] if g_norm is not None else clip
        if divisor is not None:
            g = g / divisor.to(g.dtype)

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
        denom = v_hat.sqrt() + eps
        directions = [m_hat / denom, g / denom] if nesterov else [m_hat / denom]
        if weight_decay != 0:
            directions = [u + weight_decay * x for u in directions]

        scales = [-lr * a * torch.ones((), dtype=torch.float64, device=x.device) for a in coefs]
        if adapt:
            sq = NormReducer([param] * (1 + len(directions)))(torch.stack([sq_norm(x)] + [sq_norm(u) for u in directions]))
            scales = [s * trust_ratios(sq[0], sq[k + 1], phi_bounds) for k, s in enumerate(scales)]
        if ok is not None:
            scales = [s * ok for s in scales]
        update = directions[0] * scales[0].to(x.dtype)
        for u, s in zip(directions[1:], scales[1:], strict=True):
            update = update + u * s.to(x.dtype)
        x.add_(update)
        if low:
            p.copy_(x)


def _subset(idx: list[int], *lists: list[Tensor]) -> list[list[Tensor]]:
    return [[values[i] for i in idx] for values in lists]


def _reference_for(slow: list[int], tensors: tuple[list[Tensor], ...], g_norm: Tensor | None,
                   hyper: dict[str, Any]) -> None:
    """The parameters a multi-tensor path cannot take (a layout or dtype it lacks) by the reference."""
    _single_tensor(*_subset(slow, *tensors), g_norm=None if g_norm is None else g_norm[slow], **hyper)


def _multi_tensor(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor], *, clip: Tensor | None, g_norm: Tensor | None, ok: Tensor | None,
    torch_fused_adam: bool, lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
    bias_correction: bool, adapt: bool, phi_bounds: tuple[float, float] | None, nesterov: bool,
    scratch: Scratch, chunk_numel: int | None,
) -> None:
    """Same math with ``torch._foreach_*`` over chunks of tensors, the moments by torch's fused Adam.

    Per chunk: ``g' = g/s`` into scratch slot 1 (when there is an ``s``); ``r = λx`` into slot 0, to
    which the fused Adam kernel with ``lr = -1`` adds ``m̂/d`` while it updates ``m`` and ``v`` (one
    pass over g, m, v, r); LANS's second direction ``c = g̃/d + λx`` in place of ``g̃``, with ``d``
    recomputed into slot 2 (two passes: torch has no kernel that returns it); the norms; then
    ``x += -η·a·τ·u`` per direction in one ``addcmul``. A chunk is small enough to stay in cache
    between passes. Without torch's fused Adam kernel (an unsupported device, or while
    ``torch.compile`` traces) the moments and directions come from stock ``torch._foreach_*`` ops.
    """
    if not params:
        return
    tensors = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    hyper = dict(clip=clip, ok=ok, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                 bias_correction=bias_correction, adapt=adapt, phi_bounds=phi_bounds, nesterov=nesterov)
    coefs = _coefficients(nesterov, beta1)
    for (device, dtype), idx in group_by_device_dtype(len(params), params).items():
        cdt = compute_dtype(dtype)
        low = dtype in LOW_PRECISION
        use_fused = torch_fused_adam and fused_kernel_ok(device)
        if use_fused:  # the kernel walks memory linearly: other layouts take the reference path
            slow = [i for i in idx if not fused_layout_ok(
                local(params[i]), local(grads[i]), local(exp_avgs[i]), local(exp_avg_sqs[i]))]
            if slow:
                _reference_for(slow, tensors, g_norm, hyper)
                idx = [i for i in idx if i not in set(slow)]
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
        if g_norm is not None:
            divisors = list(g_norm[idx].to(device=device, dtype=cdt).unbind())
        elif clip is not None:
            divisors = [clip.to(device=device, dtype=cdt)] * len(idx)
        else:
            divisors = None
        found_inf = None if ok is None else (~ok).to(device=device, dtype=torch.float32)
        ok_dev = None if ok is None else ok.to(device)
        increment_steps(steps, ok_dev)
        # sharded tensors: one chunk, so that their norms take one collective
        limit = None if any(is_dtensor(params[i]) for i in idx) else chunk_numel

        for chunk in chunk_indices([x.numel() for x in xs], limit):
            cx = [xs[k] for k in chunk]
            cm = [ms[k] for k in chunk]
            cv = [vs[k] for k in chunk]
            cs = [steps[k] for k in chunk]
            g_in = [gs[k] for k in chunk]
            if divisors is not None:
                # (into scratch: the kernel's own grad_scale would write the result back into p.grad)
                g_in = scratch.views(cx, slot=1)
                for k, out in zip(chunk, g_in, strict=True):  # (the _foreach out= variants copy on CPU)
                    torch.div(gs[k], divisors[k], out=out)
            if ok_dev is not None and (nesterov or not use_fused):  # a skipped step's g' must be finite
                if divisors is not None:  # (scratch: in place)
                    for g in g_in:
                        g.masked_fill_(~ok_dev, 0.0)
                else:
                    g_in = [torch.where(ok_dev, g, torch.zeros_like(g)) for g in g_in]
            if bias_correction:
                t = steps_for_bias_correction(torch.stack(cs))
                bc1, bc2 = 1 - beta1**t, 1 - beta2**t
            if use_fused:
                r = scratch.views(cx)
                if weight_decay != 0:
                    for x, out in zip(cx, r, strict=True):
                        torch.mul(x, weight_decay, out=out)
                else:
                    torch._foreach_zero_(r)
                # without bias correction: the kernel always divides by 1 - beta**step; beta**inf == 0
                kernel_steps = cs if bias_correction else [
                    torch.full((), math.inf, dtype=torch.float32, device=device)] * len(cs)
                torch._fused_adam_(r, g_in, cm, cv, [], kernel_steps, lr=-1.0, beta1=beta1, beta2=beta2,
                                   weight_decay=0.0, eps=eps, amsgrad=False, maximize=False, found_inf=found_inf)
                if nesterov:
                    denom = scratch.views(cx, slot=2)
                    inv_sqrt_bc2 = (bc2.rsqrt() if bias_correction else torch.ones(len(chunk), dtype=torch.float64,
                                                                                    device=device)).to(cdt)
                    eps_t = torch.full((), eps, dtype=cdt, device=device)
                    for k, (v, d) in enumerate(zip(cv, denom, strict=True)):
                        torch.sqrt(v, out=d)
                        torch.addcmul(eps_t, d, inv_sqrt_bc2[k], out=d)
            else:
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
                    r = torch._foreach_div(cm, list(bc1.to(cdt).unbind()))
                    denom = torch._foreach_div(cv, list(bc2.to(cdt).unbind()))
                else:
                    r = [m.clone() for m in cm]
                    denom = [v.clone() for v in cv]
                torch._foreach_sqrt_(denom)
                torch._foreach_add_(denom, eps)
                torch._foreach_div_(r, denom)
                if weight_decay != 0:
                    torch._foreach_add_(r, cx, alpha=weight_decay)
            directions = [r]
            if nesterov:
                c = g_in  # c = g̃/d + λx, in place of g̃ (in scratch)
                torch._foreach_div_(c, denom)
                if weight_decay != 0:
                    torch._foreach_add_(c, cx, alpha=weight_decay)
                directions.append(c)

            n = len(chunk)
            scales = [torch.full((n,), -a, dtype=torch.float64, device=device) * lr for a in coefs]
            if adapt:
                sq = NormReducer([params[idx[k]] for k in chunk] * (1 + len(directions)))(
                    torch.cat([sq_norms(cx)] + [sq_norms(u) for u in directions]))
                scales = [s * trust_ratios(sq[:n], sq[(j + 1) * n:(j + 2) * n], phi_bounds)
                          for j, s in enumerate(scales)]
            for u, s in zip(directions, scales, strict=True):
                if ok_dev is not None:
                    s = s * ok_dev
                torch._foreach_addcmul_(cx, u, list(s.to(cdt).unbind()))
        if low:
            torch._foreach_copy_(p_loc, xs)


def _fused(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor], *, clip: Tensor | None, g_norm: Tensor | None, ok: Tensor | None,
    lr: float | Tensor, beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction: bool,
    adapt: bool, phi_bounds: tuple[float, float] | None, nesterov: bool, cache: Any,
) -> None:
    """Same math by the kernels of :mod:`._fused` (Triton; on CPU C): two launches per (device, dtypes)."""
    from ._fused import lamb_fused, lans_fused

    if not params:
        return
    tensors = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    hyper = dict(clip=clip, ok=ok, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                 bias_correction=bias_correction, adapt=adapt, phi_bounds=phi_bounds, nesterov=nesterov)
    for (device, _), idx in fused_subgroups(params, grads).items():
        slow = [idx[k] for k in fused_slow(device, [[local(values[i]) for i in idx] for values in tensors[:4]])]
        if slow:  # the kernels walk memory linearly: other layouts (and dtypes they lack) take the reference
            _reference_for(slow, tensors, g_norm, hyper)
            idx = [i for i in idx if i not in set(slow)]
            if not idx:
                continue
        steps = [state_steps[i] for i in idx]
        ok_dev = None if ok is None else ok.to(device)
        increment_steps(steps, ok_dev)
        t = steps_for_bias_correction(torch.stack(steps))
        members = [params[i] for i in idx]
        operands = [[local(values[i]) for i in idx] for values in tensors[:4]]
        common = dict(bc1=1 - beta1**t, bc2=1 - beta2**t, ok=ok_dev, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay, bias_correction=bias_correction, adapt=adapt,
                      phi_bounds=phi_bounds, cache=cache,
                      reduce=RowsReducer(members) if any(is_dtensor(m) for m in members) else None)
        if nesterov:
            lans_fused(*operands, g_norm=g_norm[idx].to(device), **common)
        else:
            lamb_fused(*operands, clip=None if clip is None else clip.to(device), **common)
