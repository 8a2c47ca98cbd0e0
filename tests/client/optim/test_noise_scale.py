"""The gradient noise scale estimator (issue #11): McCandlish et al. 2018, Appendix A.

* on synthetic gradients with a known tr(Sigma)/|G|^2 it recovers the ratio within a few %;
* through real backward passes (gradient accumulation), on a linear model whose per-example
  gradients give the exact answer;
* DDP on 2 gloo processes (local vs all-reduced norms, read by a comm hook) agrees with one process
  fed the same data through gradient accumulation (micro-batch norms read by tensor hooks).
"""

from __future__ import annotations

import math
import multiprocessing as mp

import pytest
import torch
from torch import nn

from largebatch.client.optim.noise_scale import GradientNoiseScale, grad_sq_norm


def synthetic_run(trace: float, g_sq: float, small: int, big: int, steps: int, seed: int = 0,
                  ema: float = 0.998) -> GradientNoiseScale:
    """Per-example gradients g_i = G + e_i with E|e_i|^2 = trace; feed the means of the first
    ``small`` and of all ``big`` examples, as the accumulation and DDP paths do."""
    gen = torch.Generator().manual_seed(seed)
    dim = 64
    G = torch.randn(dim, generator=gen, dtype=torch.float64)
    G *= math.sqrt(g_sq) / G.norm()
    scales = torch.rand(dim, generator=gen, dtype=torch.float64) + 0.5  # anisotropic noise
    scales *= math.sqrt(trace / float((scales**2).sum()))
    est = GradientNoiseScale(ema=ema)  # a long memory: the test wants the mean, not the noise
    for _ in range(steps):
        per_example = G + torch.randn(big, dim, generator=gen, dtype=torch.float64) * scales
        est.update(per_example[:small].mean(0).square().sum(), per_example.mean(0).square().sum(), small, big)
    return est


@pytest.mark.slow  # statistical: thousands of steps until the estimate settles
@pytest.mark.parametrize("trace, g_sq, small, big", [(100.0, 1.0, 8, 64), (40.0, 2.0, 4, 16), (1000.0, 1.0, 16, 256)])
def test_recovers_known_noise_scale(trace, g_sq, small, big):
    est = synthetic_run(trace, g_sq, small, big, steps=8000)
    truth = trace / g_sq
    assert est.value == pytest.approx(truth, rel=0.05)
    assert est.trace_sigma == pytest.approx(trace, rel=0.05)
    assert est.grad_sq == pytest.approx(g_sq, rel=0.05)


def test_estimate_is_the_value_as_a_tensor_and_left_out_while_unresolved():
    """What a job reports each step without a host sync: the same number as ``value``; while |G|^2
    is not resolved (negative) the report leaves it out, as ``value`` says None."""
    from largebatch.client._reporter import _noise

    est = GradientNoiseScale()
    assert est.estimate is None
    est.update(2.0, 1.0, 4, 32)  # |G|^2 = (32 - 8)/28 > 0
    assert isinstance(est.estimate, torch.Tensor) and float(est.estimate) == pytest.approx(est.value)
    assert _noise(est.estimate) == pytest.approx(est.value)
    unresolved = GradientNoiseScale()
    unresolved.update(2.0, 0.01, 4, 32)  # 32 * 0.01 < 4 * 2: a negative |G|^2 estimate
    assert unresolved.value is None and _noise(unresolved.estimate) is None


@pytest.mark.slow  # statistical: thousands of steps until the estimate settles
def test_ratio_of_emas_not_ema_of_ratios():
    """Far below B_noise the per-step |G|^2 estimates are often negative; the separate EMAs still
    converge (per-step ratios, with their sign flips, would not)."""
    trace, small, big = 500.0, 4, 32
    gen = torch.Generator().manual_seed(3)
    G = torch.zeros(16, dtype=torch.float64)
    G[0] = 1.0
    est, negative = GradientNoiseScale(ema=0.998), 0
    for _ in range(8000):
        per_example = G + torch.randn(big, 16, generator=gen, dtype=torch.float64) * math.sqrt(trace / 16)
        s_sq, b_sq = per_example[:small].mean(0).square().sum(), per_example.mean(0).square().sum()
        negative += float(big * b_sq - small * s_sq) < 0
        est.update(s_sq, b_sq, small, big)
    assert negative > 0.2 * 8000
    assert est.value == pytest.approx(trace, rel=0.2)


@pytest.mark.slow  # statistical: thousands of steps until the estimate settles
def test_accumulation_path_matches_per_example_truth():
    """Real backward passes on a fixed linear least-squares model: the truth comes from the exact
    per-example gradients over the whole data set, the estimate from the two norms of accumulation."""
    gen = torch.Generator().manual_seed(0)
    n, dim, micro, n_micro = 4096, 8, 4, 8
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(dim, 1, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(n, 1, generator=gen,
                                                                                         dtype=torch.float64)
    model = nn.Linear(dim, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    # per-example gradient of (w.x - y)^2 is 2 (w.x - y) x
    per_example = 2 * (model(x) - y).detach() * x
    G = per_example.mean(0)
    truth = float((per_example - G).square().sum(1).mean() * n / (n - 1)) / float(G.square().sum())

    est = GradientNoiseScale(ema=0.999)
    for _ in range(3000):
        idx = torch.randint(0, n, (micro * n_micro,), generator=gen)
        for i in range(n_micro):
            part = idx[i * micro:(i + 1) * micro]
            (nn.functional.mse_loss(model(x[part]), y[part], reduction="mean") / n_micro).backward()
            if i == 0:
                est.measure_small(model.parameters(), micro, grad_scale=n_micro)
        est.measure_big(model.parameters(), micro * n_micro)
        est.step()
        model.zero_grad()
    assert est.value == pytest.approx(truth, rel=0.08)


def test_grad_sq_norm_is_the_squared_norm_without_touching_gradients():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model(torch.randn(5, 3)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    expected = sum(float(g.double().square().sum()) for g in before)
    assert float(grad_sq_norm(model.parameters())) == pytest.approx(expected, rel=1e-6)
    assert float(grad_sq_norm(model.parameters(), scale=3.0)) == pytest.approx(9 * expected, rel=1e-6)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters(), strict=True))


def test_state_dict_round_trip_and_bad_input():
    est = synthetic_run(100.0, 1.0, 8, 64, steps=50)
    again = GradientNoiseScale()
    again.load_state_dict(est.state_dict())
    assert again.value == est.value and again.n_updates == 50 and again.ema == est.ema
    assert GradientNoiseScale().value is None
    with pytest.raises(ValueError, match="big_batch"):
        est.update(1.0, 0.5, 8, 8)
    with pytest.raises(ValueError, match="small_batch"):
        est.update(1.0, 0.5, 0, 8)
    with pytest.raises(ValueError, match="ema"):
        GradientNoiseScale(ema=1.0)
    with pytest.raises(ValueError, match="small_sq_norm"):
        est.update(torch.ones(2), 0.5, 2, 8)
    with pytest.raises(ValueError, match="missing"):
        again.load_state_dict({"ema": 0.9})


def test_step_without_both_norms_is_skipped():
    est = GradientNoiseScale()
    model = nn.Linear(2, 1)
    model(torch.randn(4, 2)).sum().backward()
    est.measure_big(model.parameters(), 4)
    assert est.step() is None and est.n_updates == 0


@pytest.mark.slow
def test_ddp_two_processes_equals_single_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    from noise_dist_worker import STEPS, train_single, worker

    init_file, out_file = str(tmp_path / "init"), str(tmp_path / "ddp.pt")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(rank, 2, init_file, out_file)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail("a DDP worker hung")
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    ddp = torch.load(out_file, weights_only=False)
    single = train_single()
    assert ddp["state"]["n_updates"] == STEPS
    assert all(v is not None for v in single[5:])
    # The issue asks for 10%; the two paths compute the same quantities from the same gradients, so
    # they agree to rounding (DDP's all-reduced gradient is accumulation's, step after step).
    for at in range(5, STEPS):
        assert ddp["values"][at] == pytest.approx(single[at], rel=1e-6), (at, ddp["values"][at], single[at])


def test_accumulation_hooks_skip_single_micro_batch_and_detach():
    model = nn.Linear(3, 1)
    est = GradientNoiseScale()
    est.attach_accumulation(model.parameters(), 4)
    model(torch.randn(4, 3)).sum().backward()
    assert est.step() is None and est.n_updates == 0  # one micro-batch: no small/big pair
    model.zero_grad()
    for _ in range(3):
        model(torch.randn(4, 3)).sum().backward()
    est.step()
    assert est.n_updates == 1
    est.detach()
    model.zero_grad()
    for _ in range(2):
        model(torch.randn(4, 3)).sum().backward()
    est.step()
    assert est.n_updates == 1
    with pytest.raises(ValueError, match="micro_batch_size"):
        GradientNoiseScale().attach_accumulation(model.parameters(), 0)


def _least_squares(seed: int = 0, n: int = 4096, dim: int = 8):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(dim, 1, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(n, 1, generator=gen,
                                                                                         dtype=torch.float64)
    model = nn.Linear(dim, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.3)
    per_example = 2 * (model(x) - y).detach() * x  # the gradient of (w.x - y)^2
    G = per_example.mean(0)
    trace = float((per_example - G).square().sum(1).mean() * n / (n - 1))
    return gen, x, y, model, trace, float(G.square().sum())


@pytest.mark.slow  # statistical: 2,000 micro-batches against the exact values
def test_probe_matches_per_example_truth_at_fixed_parameters():
    """probe_noise_scale at one point: the exact tr(Sigma) and |G|^2 of the data set, from i.i.d. micro-batches."""
    from largebatch.client.optim import probe_noise_scale

    gen, x, y, model, trace, g_sq = _least_squares()

    def batches(k, b):
        for _ in range(k):
            idx = torch.randint(0, len(x), (b,), generator=gen)
            yield x[idx], y[idx]

    def loss_fn(m, batch):
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    runs = [probe_noise_scale(model, loss_fn, batches(400, 16), 16) for _ in range(5)]
    assert sum(r.trace_sigma for r in runs) / 5 == pytest.approx(trace, rel=0.05)
    assert sum(r.grad_sq for r in runs) / 5 == pytest.approx(g_sq, rel=0.05)
    assert runs[0].value == pytest.approx(runs[0].trace_sigma / runs[0].grad_sq)
    assert (runs[0].batches, runs[0].batch_size) == (400, 16)


def test_probe_leaves_grads_and_the_streaming_hooks_alone():
    """The probe's backward passes neither touch .grad nor reach attach_accumulation's hooks."""
    from largebatch.client.optim import probe_noise_scale

    _, x, y, model, *_ = _least_squares(1)
    est = GradientNoiseScale()
    est.attach_accumulation(model.parameters(), 8)
    nn.functional.mse_loss(model(x[:8]), y[:8]).backward()
    before = model.weight.grad.clone()
    seen = max(est._accumulation._count.values())
    probe = probe_noise_scale(model, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]),
                              [(x[i:i + 8], y[i:i + 8]) for i in range(0, 256, 8)], 8)
    assert probe.value is not None and probe.value > 0
    assert torch.equal(model.weight.grad, before)
    assert max(est._accumulation._count.values()) == seen == 1
    assert model.weight.requires_grad and model.weight.grad_fn is None
    est.detach()


def test_probe_bad_input():
    from largebatch.client.optim import probe_noise_scale

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    batch = torch.randn(4, 3)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        probe_noise_scale(model, lambda m, b: m(b).mean(), [batch, batch], 0)
    with pytest.raises(ValueError, match="at least 2 micro-batches, got 1"):
        probe_noise_scale(model, lambda m, b: m(b).mean(), [batch], 4)
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        probe_noise_scale(model, lambda m, b: m(b), [batch, batch], 4)
    frozen = nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        probe_noise_scale(frozen, lambda m, b: m(b).mean(), [batch, batch], 4)
    # identical batches: no noise, |G|^2 resolved exactly (to float32 rounding of the norms)
    for scale in (1.0, 100.0):
        probe = probe_noise_scale(model, lambda m, b, s=scale: m(b).mean() * s, [batch, batch, batch], 4)
        assert probe.grad_sq > 0 and abs(probe.trace_sigma) <= 1e-5 * 4 * probe.grad_sq, probe
        assert probe.value == pytest.approx(0.0, abs=1e-5)
