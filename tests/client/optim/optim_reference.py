"""Float64 references written from the papers' pseudo-code, in NumPy (no torch, no code shared with ours).

* LAMB: You et al. 2020, Algorithm 2 (+ the apex options: global clipping, no trust ratio without
  weight decay, bias correction off, phi bounds).
* LANS: Zheng et al. 2020, Algorithm 2.
* LARS: You et al. 2020, Algorithm 1.

Each takes the initial tensors, a list of per-step gradient lists and per-step learning rates, and
returns the tensors after the last step. Per-tensor settings (``wd``, ``adapt``) are lists.
"""

from __future__ import annotations

import numpy as np


def _norm(a: np.ndarray) -> float:
    return float(np.sqrt(np.sum(a.astype(np.float64) ** 2)))


def _phi(z: float, bounds) -> float:
    return z if bounds is None else min(max(z, bounds[0]), bounds[1])


def _ratio(x_norm: float, u_norm: float, bounds, coefficient: float = 1.0, eps: float = 0.0) -> float:
    if x_norm == 0.0 or u_norm == 0.0:
        return 1.0
    return coefficient * _phi(x_norm, bounds) / (u_norm + eps)


def lamb_reference(x0, grads, lrs, *, beta1, beta2, eps, wd, adapt, bias_correction=True, phi_bounds=None,
                   max_grad_norm=None):
    x = [np.array(a, dtype=np.float64) for a in x0]
    m = [np.zeros_like(a) for a in x]
    v = [np.zeros_like(a) for a in x]
    for t, (gs, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        gs = [np.array(g, dtype=np.float64) for g in gs]
        if max_grad_norm is not None:
            total = float(np.sqrt(sum(np.sum(g**2) for g in gs)))
            if total > max_grad_norm:
                gs = [g / (total / max_grad_norm) for g in gs]
        for i, g in enumerate(gs):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            if bias_correction:
                m_hat = m[i] / (1 - beta1**t)
                v_hat = v[i] / (1 - beta2**t)
            else:
                m_hat, v_hat = m[i], v[i]
            r = m_hat / (np.sqrt(v_hat) + eps)
            u = r + wd[i] * x[i]
            ratio = _ratio(_norm(x[i]), _norm(u), phi_bounds) if adapt[i] else 1.0
            x[i] = x[i] - lr * ratio * u
    return x


def lans_reference(x0, grads, lrs, *, beta1, beta2, eps, wd, adapt, bias_correction=True, phi_bounds=None):
    x = [np.array(a, dtype=np.float64) for a in x0]
    m = [np.zeros_like(a) for a in x]
    v = [np.zeros_like(a) for a in x]
    for t, (gs, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        for i, g in enumerate(gs):
            g = np.array(g, dtype=np.float64)
            g_norm = _norm(g)
            g_tilde = g / g_norm if g_norm > 0 else np.zeros_like(g)  # the zero-gradient block
            m[i] = beta1 * m[i] + (1 - beta1) * g_tilde
            v[i] = beta2 * v[i] + (1 - beta2) * g_tilde * g_tilde
            if bias_correction:
                m_hat = m[i] / (1 - beta1**t)
                v_hat = v[i] / (1 - beta2**t)
            else:
                m_hat, v_hat = m[i], v[i]
            r = m_hat / (np.sqrt(v_hat) + eps) + wd[i] * x[i]
            c = g_tilde / (np.sqrt(v_hat) + eps) + wd[i] * x[i]
            x_norm = _norm(x[i])
            if adapt[i]:
                d = (beta1 * _ratio(x_norm, _norm(r), phi_bounds) * r
                     + (1 - beta1) * _ratio(x_norm, _norm(c), phi_bounds) * c)
            else:
                d = beta1 * r + (1 - beta1) * c
            x[i] = x[i] - lr * d
    return x


def lars_reference(x0, grads, lrs, *, momentum, wd, adapt, trust_coefficient=1.0, eps=0.0, phi_bounds=None):
    x = [np.array(a, dtype=np.float64) for a in x0]
    m = [np.zeros_like(a) for a in x]
    for gs, lr in zip(grads, lrs, strict=True):
        for i, g in enumerate(gs):
            g = np.array(g, dtype=np.float64)
            m[i] = momentum * m[i] + (1 - momentum) * (g + wd[i] * x[i])
            ratio = _ratio(_norm(x[i]), _norm(m[i]), phi_bounds, trust_coefficient, eps) if adapt[i] else 1.0
            x[i] = x[i] - lr * ratio * m[i]
    return x
