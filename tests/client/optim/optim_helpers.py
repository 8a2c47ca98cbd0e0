"""The test problem shared by the optimizer tests: tensors that break naive implementations."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# name, shape, init scale (0: zero-initialised), gradient scale, in the weight-decay group
TENSORS = [
    ("weight", (64, 48), 0.1, 1e-2, True),
    ("big", (512, 256), 0.02, 1e-3, True),  # 131072 elements: several norm blocks, several chunks
    ("bias", (64,), 0.1, 1.0, False),  # no weight decay
    ("zero_init", (5,), 0.0, 0.1, True),  # ||x|| = 0 on the first step
    ("scalar", (1,), 0.5, 5.0, True),  # a 1-element tensor
]
WD = 0.01


@dataclass
class Problem:
    x0: list[np.ndarray]  # float64 values, already representable in the test dtype
    grads: list[list[np.ndarray]]  # per step, per tensor; representable in the test dtype
    lrs: list[float]
    decay: list[bool]

    def params(self, dtype: torch.dtype) -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(torch.tensor(a, dtype=dtype)) for a in self.x0]

    def groups(self, params, **no_decay_options):
        decay = [p for p, d in zip(params, self.decay, strict=True) if d]
        no_decay = [p for p, d in zip(params, self.decay, strict=True) if not d]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, **no_decay_options}]

    def wd(self, value: float = WD) -> list[float]:
        return [value if d else 0.0 for d in self.decay]


def make_problem(dtype: torch.dtype, steps: int = 20, seed: int = 0, zero_grad_steps: int = 0) -> Problem:
    """``zero_grad_steps``: the zero-initialised tensor gets all-zero gradients for its first steps."""
    rng = np.random.default_rng(seed)

    def representable(a: np.ndarray) -> np.ndarray:
        return torch.tensor(a).to(dtype).to(torch.float64).numpy()

    x0 = [representable(rng.standard_normal(shape) * scale) for _, shape, scale, _, _ in TENSORS]
    grads = []
    for t in range(steps):
        wave = 3.0 if t % 3 == 0 else 0.3  # global gradient norm above and below 1 (clipping on and off)
        step = []
        for name, shape, _, gscale, _ in TENSORS:
            g = rng.standard_normal(shape) * gscale * wave
            if name == "zero_init" and t < zero_grad_steps:
                g = np.zeros(shape)
            step.append(representable(g))
        grads.append(step)
    lrs = [float(0.02 * (1.0 + 0.5 * np.sin(t))) for t in range(steps)]
    return Problem(x0, grads, lrs, [d for *_, d in TENSORS])


def run(optimizer, params, problem: Problem, steps: int | None = None, start: int = 0):
    """Feed the problem's gradients and learning rates to ``optimizer`` for steps [start, start+steps)."""
    end = len(problem.grads) if steps is None else start + steps
    for t in range(start, end):
        for p, g in zip(params, problem.grads[t], strict=True):
            p.grad = torch.tensor(g, dtype=p.dtype)
        for group in optimizer.param_groups:
            group["lr"] = problem.lrs[t]
        optimizer.step()
    return params


def max_rel_err(actual: list[torch.Tensor], expected: list[np.ndarray]) -> float:
    """max over tensors of max|actual - expected| / max|expected|."""
    worst = 0.0
    for a, e in zip(actual, expected, strict=True):
        a64 = a.detach().to(torch.float64).numpy()
        scale = max(float(np.max(np.abs(e))), 1e-30)
        worst = max(worst, float(np.max(np.abs(a64 - e))) / scale)
    return worst


# The code paths; "fused" (the Triton kernels) runs under Triton's interpreter on CPU, "cpu_kernel" is
# the same fused=True on the C kernels of _cpu_fused (conftest.py picks the backend per test).
PATHS = {
    "single": dict(foreach=False),
    "foreach": dict(foreach=True, fused=False),
    "fused": dict(fused=True),
    "cpu_kernel": dict(fused=True),
}
