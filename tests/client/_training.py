"""A tiny regression model trained for real on CPU: what the end-to-end tests train."""

from __future__ import annotations

import torch

from largebatch.client import Job

IN, HIDDEN = 16, 32
BATCH = 128
# A setup that works at batch 16; the recipe scales it to BATCH (k = 8: 2400 -> 300 steps).
REFERENCE = {"batch_size": 16, "lr": 2e-3, "steps": 2400, "warmup_ratio": 0.02, "optimizer": "lamb"}


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))


class Data:
    """y = tanh(x @ w) + noise, fresh batches from a seeded generator."""

    def __init__(self, seed: int = 1) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.w = torch.randn(IN, 1, generator=torch.Generator().manual_seed(12345)) / IN**0.5  # the same task

    def batch(self, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, IN, generator=self.gen)
        return x, torch.tanh(3 * x @ self.w) + 0.05 * torch.randn(n, 1, generator=self.gen)


def grad_norm(model: torch.nn.Module) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in model.parameters()]))


def train(job: Job, model: torch.nn.Module, steps: int, data: Data | None = None, *, on_step=None, start: int = 0):
    """The three-line loop, for real, from step ``start`` (a resumed job) to ``steps``. Returns (LR of
    every group at each step, losses reported)."""
    data = data or Data()
    loss_fn = torch.nn.MSELoss()
    lrs, losses = [], []
    for step in range(start, steps):
        x, y = data.batch()
        loss = loss_fn(model(x), y)
        job.optimizer.zero_grad()
        loss.backward()
        lrs.append([g["lr"] for g in job.optimizer.param_groups])  # the LR this step runs with
        job.optimizer.step()
        job.scheduler.step()
        job.report(step, loss, grad_norm(model))  # tensors as they are: detached, converted off the loop
        losses.append(loss.item())
        if on_step is not None:
            on_step(step)
        if job.should_stop:
            break
    return lrs, losses


def evaluate(model: torch.nn.Module, seed: int = 99) -> float:
    x, y = Data(seed).batch(2048)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))
