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

from torch import Tensor

from ._checks import DEFAULT_NONFINITE
from ._layerwise_adam import ARGS_DOC, LayerwiseAdam, functional_step

__all__ = ["LANS", "lans"]


class LANS(LayerwiseAdam):
    _owner = "LANS"
    _nesterov = True

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
        super().__init__(
            params, lr, betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
            layer_adaptation=layer_adaptation, phi_bounds=phi_bounds, nonfinite=nonfinite, foreach=foreach,
            fused=fused, capturable=capturable,
        )


LANS.__doc__ = rf"""LANS (Algorithm 2 of Zheng et al. 2020): the layer-wise Adam skeleton of :class:`LAMB` with
    the per-block normalised gradient and two directions (Nesterov's momentum); no gradient clipping.

    Args:
        {ARGS_DOC["params"]}
        {ARGS_DOC["lr"]}
        betas: :math:`(\beta_1, \beta_2)`; :math:`\beta_1` also weighs the two directions.
        {ARGS_DOC["eps"]}
        weight_decay: :math:`\lambda`, inside both directions.
        {ARGS_DOC["bias_correction"]}
        layer_adaptation: apply the two trust ratios (``False``: both are 1).
        {ARGS_DOC["phi_bounds"]}
        {ARGS_DOC["nonfinite"]}
        {ARGS_DOC["foreach"]}
        {ARGS_DOC["fused"]}
        {ARGS_DOC["capturable"]}

    {ARGS_DOC["state"]}
    """


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
    return functional_step(
        "lans", True, params, grads, exp_avgs, exp_avg_sqs, state_steps, foreach, fused, max_grad_norm=None,
        nonfinite=nonfinite, adapt=layer_adaptation, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, bias_correction=bias_correction, phi_bounds=phi_bounds,
    )
