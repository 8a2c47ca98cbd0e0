"""A study worth looking at, made through the API: a U-shaped LR sweep at three batch sizes whose
optimum moves as batch^0.5, two divergences and one run still training (the explorer's tests)."""

from __future__ import annotations

import math

import httpx

from .conftest import LAMB_512

# A U-shaped sweep whose optimum moves as batch^0.5: eval_loss = m_B + 0.08 * ln(lr / lr*(B))^2.
SWEEP = {8192: (1.62, (1.5e-3, 2.5e-3, 4e-3, 6e-3)), 16384: (1.64, (2e-3, 3.5e-3, 5.5e-3, 8e-3)),
         32768: (1.67, (3e-3, 5e-3, 7.5e-3, 1.1e-2))}
DIVERGED = {32768: 1.6e-2, 16384: 1.3e-2}  # in this order: a divergence caps every larger batch's LR


def _lr_star(batch: int) -> float:
    return 4.2e-3 * math.sqrt(batch / 16384)


def loss_curve(steps: int, final: float, n: int = 40) -> list[dict]:
    return [{"step": round(i * (steps - 1) / (n - 1)), "loss": final + 6.5 * math.exp(-5 * i / (n - 1))}
            for i in range(n)]


def _open_run(c: httpx.Client, study: str, batch: int, lr: float) -> dict:
    # lr_cap: the sweep tries LRs past the model-size prior's cap on purpose.
    req = {"model": {"params": 340_000_000}, "reference": LAMB_512,
           "stages": [{"batch_size": batch, "lr": lr, "lr_cap": 1.0}]}
    r = c.post(f"/v1/studies/{study}/runs", json={"request": req})
    assert r.status_code == 201, r.text
    assert r.json()["peak_lr"] == lr
    return r.json()


def seed_study(c: httpx.Client, study: str) -> int:
    """A finished sweep, two divergences and one run still training; returns the running run's id."""
    assert c.post("/v1/studies", json={"name": study, "model_params": 340_000_000}).status_code == 201
    for batch, (level, lrs) in SWEEP.items():
        for lr in lrs:
            run = _open_run(c, study, batch, lr)
            final = level + 0.08 * math.log(lr / _lr_star(batch)) ** 2
            assert c.post(f"/v1/runs/{run['id']}/reports",
                          json={"reports": loss_curve(run["steps"], final)}).status_code == 200
            assert c.post(f"/v1/runs/{run['id']}/complete",
                          json={"outcome": "completed", "metric": final}).status_code == 200
    for batch, lr in DIVERGED.items():
        run = _open_run(c, study, batch, lr)
        r = c.post(f"/v1/runs/{run['id']}/reports", json={"reports": [
            *loss_curve(run["steps"] // 3, 4.0, 12), {"step": run["steps"] // 3 + 1, "loss": 1e6}]})
        assert r.json()["should_stop"], r.text
    running = _open_run(c, study, 32768, 6e-3)
    curve = loss_curve(running["steps"], 1.7)
    assert c.post(f"/v1/runs/{running['id']}/reports", json={"reports": curve[:15]}).status_code == 200
    return running["id"]
