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

from typing import Any

from torch import Tensor

from ._checks import DEFAULT_NONFINITE
from ._layerwise_adam import ARGS_DOC, LayerwiseAdam, functional_step

__all__ = ["LAMB", "lamb"]


class LAMB(LayerwiseAdam):
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
        super().__init__(
            params, lr, betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
            layer_adaptation=layer_adaptation, phi_bounds=phi_bounds, max_grad_norm=max_grad_norm,
            skip_adaptation_without_decay=skip_adaptation_without_decay, nonfinite=nonfinite, foreach=foreach,
            fused=fused, capturable=capturable,
        )

    @classmethod
    def from_apex_defaults(cls, params: Any, lr: float = 1e-3, **overrides: Any) -> LAMB:
        """NVIDIA apex ``FusedLAMB()`` with its defaults: eps 1e-6, weight decay 0.01, global gradient
        clipping at 1.0, and no trust ratio for groups without weight decay (``use_nvlamb=False``)."""
        kwargs: dict[str, Any] = dict(betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                                      max_grad_norm=1.0, skip_adaptation_without_decay=True)
        kwargs.update(overrides)
        return cls(params, lr, **kwargs)


LAMB.__doc__ = rf"""LAMB (Algorithm 2 of You et al. 2020), exactly, with apex's variants as named options.

    Args:
        {ARGS_DOC["params"]}
        {ARGS_DOC["lr"]}
        betas: :math:`(\beta_1, \beta_2)`.
        {ARGS_DOC["eps"]}
        weight_decay: :math:`\lambda`, decoupled: inside the update whose norm is taken.
        {ARGS_DOC["bias_correction"]}
        layer_adaptation: apply the trust ratio (``False`` for a group: a plain AdamW-like step).
        {ARGS_DOC["phi_bounds"]}
        max_grad_norm: global gradient-norm clipping before the moments (apex), or ``None``.
        skip_adaptation_without_decay: no trust ratio where ``weight_decay == 0`` (apex's default,
            timm's ``always_adapt=False``; ``False`` is NVLAMB, apex's ``use_nvlamb=True``).
        {ARGS_DOC["nonfinite"]}
        {ARGS_DOC["foreach"]}
        {ARGS_DOC["fused"]}
        {ARGS_DOC["capturable"]}

    {ARGS_DOC["state"]}
    """


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
    return functional_step(
        "lamb", False, params, grads, exp_avgs, exp_avg_sqs, state_steps, foreach, fused,
        max_grad_norm=max_grad_norm, nonfinite=nonfinite,
        adapt=layer_adaptation and not (skip_adaptation_without_decay and weight_decay == 0),
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
        phi_bounds=phi_bounds,
    )
