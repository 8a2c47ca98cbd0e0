"""The noise scale under HF Accelerate's ``accumulate()`` in one process: read as a plain accumulation
loop reads it, and an Accelerator accumulating otherwise than the plan is warned about, not misread."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
accelerate = pytest.importorskip("accelerate")

from largebatch.client._dist import BatchPlan  # noqa: E402
from largebatch.client._measure import attach_noise  # noqa: E402

MICRO, N_MICRO, STEPS = 8, 4, 30
PLAN = BatchPlan(MICRO * N_MICRO, 1, MICRO, N_MICRO)


def data():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 1, generator=g)
    for _ in range(STEPS * N_MICRO):
        x = torch.randn(MICRO, 6, generator=g)
        yield x, x @ w + torch.randn(MICRO, 1, generator=g)


def measured(model, optimizer):
    noise = attach_noise(model, PLAN, ema=None, grad_scale=None)
    def fold(*_):  # what a Job does with its optimizer (a pre-hook must return None)
        noise.step()

    optimizer.register_step_pre_hook(fold)
    return noise


def plain() -> list[float | None]:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    noise, values = measured(model, opt), []
    for i, (x, y) in enumerate(data()):
        (torch.nn.functional.mse_loss(model(x), y) / N_MICRO).backward()
        if (i + 1) % N_MICRO == 0:
            opt.step()
            opt.zero_grad()
            values.append(noise.value)
    return values


def accelerated(steps: int):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=steps)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    inner = torch.optim.SGD(model.parameters(), lr=0.01)
    noise = measured(model, inner)
    model, opt = accelerator.prepare(model, inner)
    values = []
    for x, y in data():
        with accelerator.accumulate(model):
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            opt.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            values.append(noise.value)
    return noise, values


def test_accelerate_accumulate_reads_as_a_plain_loop():
    expected = plain()
    noise, values = accelerated(N_MICRO)
    assert noise.n_updates == STEPS and expected[-1] is not None
    assert values == pytest.approx(expected, rel=1e-9)


def test_accelerate_accumulating_otherwise_than_the_plan_is_warned_about():
    with pytest.warns(RuntimeWarning, match="plan trains 4 micro-batch"):
        noise, _ = accelerated(2)
    assert noise.n_updates == 0 and noise.skipped_steps == 2 * STEPS
