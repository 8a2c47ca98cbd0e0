"""Nothing read silently wrong: a loop that does more than the plan (a diagnostic gradient, a zeroed
gradient, another micro-batch count, undivided losses) is read right, or warned about and not measured;
the smoothing's memory is counted in examples."""

from __future__ import annotations

import math
import warnings

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from largebatch.client.optim import GradientNoiseScale  # noqa: E402
from largebatch.client.optim.noise_scale import DEFAULT_MEMORY_STEPS  # noqa: E402

MICRO, N_MICRO, STEPS = 8, 4, 40


def train(extra: str | None = None, *, micro_batches: int | None = N_MICRO, divided: bool = True,
          **kwargs) -> tuple[GradientNoiseScale, list[float | None]]:
    """SGD on a noisy linear regression, N_MICRO micro-batches of MICRO per step, the same data and
    parameters whatever ``extra`` does (a diagnostic that leaves .grad as training needs it)."""
    torch.manual_seed(0)
    model = nn.Linear(6, 1).double()
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 1, generator=g, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    est = GradientNoiseScale(**kwargs)
    est.attach_accumulation(model.parameters(), MICRO, grad_scale=N_MICRO if divided else 1.0,
                            micro_batches=micro_batches)
    values = []
    for _ in range(STEPS):
        x = torch.randn(N_MICRO * MICRO, 6, generator=g, dtype=torch.float64)
        y = x @ w + torch.randn(N_MICRO * MICRO, 1, generator=g, dtype=torch.float64)
        if extra == "backward-then-zero":  # a diagnostic gradient through .grad, zeroed before training
            nn.functional.mse_loss(model(x), y).backward()
            opt.zero_grad()
        for i in range(N_MICRO):
            sl = slice(i * MICRO, (i + 1) * MICRO)
            loss = nn.functional.mse_loss(model(x[sl]), y[sl])
            (loss / N_MICRO if divided else loss).backward()
            if extra == "autograd.grad" and i == 1:  # a diagnostic gradient mid-step, never in .grad
                torch.autograd.grad(nn.functional.mse_loss(model(x), y), list(model.parameters()))
        if extra == "extra-backward":  # one more pass into .grad: not what the plan trains
            (nn.functional.mse_loss(model(x[:MICRO]), y[:MICRO]) / N_MICRO).backward()
        if extra == "clip":  # clipped before the step (HF's Trainer does), then put back for the same update
            saved = [p.grad.clone() for p in model.parameters()]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        values.append(est.step())
        if extra == "clip":
            for p, grad in zip(model.parameters(), saved, strict=True):
                p.grad.copy_(grad)
        if not divided:  # the same step as the divided run's
            for p in model.parameters():
                p.grad.div_(N_MICRO)
        if extra == "extra-backward":
            opt.zero_grad()  # the parameters follow the clean run's
            for i in range(N_MICRO):
                sl = slice(i * MICRO, (i + 1) * MICRO)
                (nn.functional.mse_loss(model(x[sl]), y[sl]) / N_MICRO).backward()
        opt.step()
        opt.zero_grad()
    est.detach()
    return est, values


def test_a_diagnostic_gradient_or_clipping_changes_nothing():
    clean, expected = train()
    assert clean.n_updates == STEPS and expected[-1] is not None and expected[-1] > 0
    for extra in ("autograd.grad", "backward-then-zero", "clip"):
        est, values = train(extra)
        assert values == expected, extra  # the same numbers, bit for bit
        assert est.n_updates == STEPS and est.skipped_steps == 0


def test_a_step_off_the_plan_is_warned_about_and_not_measured():
    with pytest.warns(RuntimeWarning, match="5] backward pass.*plan trains 4 micro-batch"):
        est, values = train("extra-backward")
    assert est.n_updates == 0 and est.skipped_steps == STEPS and all(v is None for v in values)
    # without a plan the count is what the step had, and the extra pass is read as a micro-batch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est, _ = train("extra-backward", micro_batches=None)
    assert est.n_updates == STEPS


def test_undivided_losses_read_the_same_as_divided_ones():
    _, divided = train()
    _, undivided = train(divided=False)
    assert all(a == pytest.approx(b, rel=1e-9) for a, b in zip(divided, undivided, strict=True))


def test_memory_in_examples():
    est, default = train()
    assert est.ema is None and est.memory_examples == DEFAULT_MEMORY_STEPS * N_MICRO * MICRO
    assert est.examples == STEPS * N_MICRO * MICRO and est.batch_sizes == (MICRO, N_MICRO * MICRO)
    # the same memory given in examples, or per step at this batch
    _, values = train(memory_examples=DEFAULT_MEMORY_STEPS * N_MICRO * MICRO)
    assert values == default
    _, per_step = train(ema=math.exp(-1 / DEFAULT_MEMORY_STEPS))
    assert all(a == pytest.approx(b, rel=1e-12) for a, b in zip(default, per_step, strict=True))
    # a twice longer memory in examples is a twice longer memory at this batch
    _, longer = train(memory_examples=2 * DEFAULT_MEMORY_STEPS * N_MICRO * MICRO)
    assert longer != default
    again = GradientNoiseScale()
    again.load_state_dict(est.state_dict())
    assert again.value == est.value and again.memory_examples == est.memory_examples
    old = {"ema": 0.95, "trace_sum": 1.0, "grad_sq_sum": 0.5, "weight": 0.5, "n_updates": 3}  # saved before
    again.load_state_dict(old)
    assert again.ema == 0.95 and again.memory_examples is None and again.value == 2.0


def test_bad_smoothing_arguments():
    with pytest.raises(ValueError, match="not both"):
        GradientNoiseScale(ema=0.9, memory_examples=100)
    with pytest.raises(ValueError, match="memory_examples"):
        GradientNoiseScale(memory_examples=0)
    with pytest.raises(ValueError, match="micro_batches"):
        GradientNoiseScale().attach_accumulation(nn.Linear(2, 1).parameters(), 4, micro_batches=0)


def test_paused_reads_nothing():
    model = nn.Linear(3, 1)
    est = GradientNoiseScale()
    est.attach_accumulation(model.parameters(), 2, grad_scale=2, micro_batches=2)
    with est.paused():
        for _ in range(2):
            (model(torch.randn(2, 3)).pow(2).mean() / 2).backward()
        est.step()
    assert est.n_updates == 0
    model.zero_grad()
    for _ in range(2):
        (model(torch.randn(2, 3)).pow(2).mean() / 2).backward()
    est.step()
    assert est.n_updates == 1


@pytest.mark.slow  # two gloo processes
def test_ddp_bare_module_clipping_unsynced_gradients_and_no_no_sync(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    import multiprocessing as mp

    from noise_dist_worker import STEPS, train_single
    from noise_guard_worker import worker

    init_file, out_file = str(tmp_path / "init"), str(tmp_path / "out.pt")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(rank, 2, init_file, out_file)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail("a DDP worker hung")
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    out = torch.load(out_file, weights_only=False)
    # the bare module reads what one process accumulating both ranks' micro-batches reads
    single = train_single()
    assert all(v is not None for v in single[5:])
    for at in range(5, STEPS):
        assert out["bare"][at] == pytest.approx(single[at], rel=1e-6), at
        assert out["clipped"][at] == pytest.approx(single[at], rel=1e-6), at  # read before the clipping
    assert "differs between ranks" in out["unsynced"] and "DistributedDataParallel" in out["unsynced"]
    values, expected, caught = out["no_sync"]
    assert any("no no_sync" in m for m in caught) and len(caught) == 1
    assert all(v is not None for v in expected[5:])
    for at in range(5, STEPS):
        assert values[at] == pytest.approx(expected[at], rel=1e-6), at
