"""The preconditioned gradient noise scale B_pre = tr(P Sigma) / (G^T P G) (issue #11).

* through real backward passes (gradient accumulation hooks, and measure_small/measure_big) on a
  linear loss whose per-example gradient is the example itself, G + s * noise, so tr(P Sigma) and
  G^T P G are known in closed form for a fixed diagonal P;
* P = identity reproduces the plain estimator exactly;
* P from an Adam optimizer: 1/(sqrt(v_hat)+eps), 0 where v is still 0, no measurement before the
  first optimizer step;
* argument validation names ``preconditioner``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from largebatch.client.optim import GradientNoiseScale
from largebatch.client.optim.noise_scale import adam_preconditioner

DIM = 32


def problem(seed: int = 0):
    """Per-example gradient of ``<w, x>`` is ``x = G + s * eps``: Sigma = diag(s^2). Returns G, s, P."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(DIM, generator=gen, dtype=torch.float64) * 0.3
    s = torch.rand(DIM, generator=gen, dtype=torch.float64) * 3 + 0.2  # anisotropic noise
    P = (torch.rand(DIM, generator=gen, dtype=torch.float64) + 0.5) / s**2  # fixed, Adam-like: large where s is small
    return G, s, P


def run_accumulation(est: GradientNoiseScale, steps: int, micro: int = 4, n_micro: int = 8, seed: int = 0,
                     hooks: bool = True) -> list[float | None]:
    G, s, _ = problem()
    w = nn.Parameter(torch.zeros(DIM, dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed + 1)
    if hooks:
        est.attach_accumulation([w], micro, grad_scale=n_micro)
    values = []
    for _ in range(steps):
        x = G + s * torch.randn(micro * n_micro, DIM, generator=gen, dtype=torch.float64)
        for i in range(n_micro):
            ((x[i * micro:(i + 1) * micro] @ w).mean() / n_micro).backward()
            if not hooks and i == 0:
                est.measure_small([w], micro, grad_scale=n_micro)
        if not hooks:
            est.measure_big([w], micro * n_micro)
        values.append(est.step())
        w.grad = None
    est.detach()
    return values


@pytest.mark.slow  # statistical: thousands of steps until the estimate settles
@pytest.mark.parametrize("hooks", [True, False])
def test_recovers_the_analytic_preconditioned_noise_scale(hooks):
    G, s, P = problem()
    truth = float((P * s * s).sum() / (P * G * G).sum())
    plain_truth = float((s * s).sum() / (G * G).sum())
    assert abs(truth / plain_truth - 1) > 0.3  # P matters here: the test tells the two apart
    est = GradientNoiseScale(ema=0.998, preconditioner=lambda p: P)
    run_accumulation(est, 4000, hooks=hooks)
    assert est.preconditioned
    assert est.value == pytest.approx(truth, rel=0.07)
    assert est.trace_sigma == pytest.approx(float((P * s * s).sum()), rel=0.07)
    assert est.grad_sq == pytest.approx(float((P * G * G).sum()), rel=0.07)


def test_identity_preconditioner_is_the_plain_estimator_exactly():
    plain = GradientNoiseScale(ema=0.9)
    ident = GradientNoiseScale(ema=0.9, preconditioner=lambda p: torch.ones_like(p))
    a, b = run_accumulation(plain, 60), run_accumulation(ident, 60)
    assert not plain.preconditioned and ident.preconditioned
    # the same estimator to rounding (a norm squared vs a sum of squares: the last bit may differ)
    assert all((x is None and y is None) or x == pytest.approx(y, rel=1e-12) for x, y in zip(a, b, strict=True))
    assert plain.n_updates == ident.n_updates == 60
    for key, value in plain.state_dict().items():
        assert ident.state_dict()[key] == (value if value is None else pytest.approx(value, rel=1e-12)), key


def test_adam_weights_and_the_first_step_is_not_measured():
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-6)
    est = GradientNoiseScale(preconditioner=opt)
    est.attach_accumulation(model.parameters(), 2, grad_scale=2)
    for step in range(3):
        for _ in range(2):
            (model(torch.randn(2, 4)).pow(2).mean() / 2).backward()
        est.step()
        assert est.n_updates == max(0, step)  # step 0: Adam has no second moment yet, nothing is measured
        opt.step()
        opt.zero_grad()
    est.detach()
    weights = adam_preconditioner(opt)
    v = opt.state[model.weight]["exp_avg_sq"]
    v[0, 0] = 0.0  # a coordinate with no second moment yet: weight 0, not 1/eps
    expected = 1 / ((v / (1 - 0.99 ** 3)).sqrt() + 1e-6)
    got = weights(model.weight)
    assert got[0, 0] == 0
    assert torch.allclose(got.flatten()[1:], expected.flatten()[1:].float())
    assert weights(nn.Parameter(torch.ones(2))) is None  # not the optimizer's parameter


def test_preconditioner_validation_names_the_argument():
    with pytest.raises(TypeError, match="preconditioner"):
        GradientNoiseScale(preconditioner=3)
    with pytest.raises(ValueError, match=r"preconditioner.*betas"):
        GradientNoiseScale(preconditioner=torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1))
    est = GradientNoiseScale(preconditioner=lambda p: -torch.ones_like(p))
    with pytest.raises(ValueError, match="preconditioner returned negative weights"):
        run_accumulation(est, 1)
    with pytest.raises(ValueError, match="preconditioner is not supported by attach_ddp"):
        GradientNoiseScale(preconditioner=lambda p: torch.ones_like(p)).attach_ddp(None, 4)
