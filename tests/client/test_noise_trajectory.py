"""A job that measures the noise scale sends the estimator's components and the examples seen with each
report; the study's critical batch is fitted from them (real torch training, a real service)."""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")

from largebatch.client import AsyncClient, Client  # noqa: E402
from largebatch.client._reporter import seen  # noqa: E402
from largebatch.client.errors import NotFoundError  # noqa: E402
from largebatch.scaling_rules.recipe import Recipe  # noqa: E402

from ._training import BATCH, REFERENCE, evaluate, make_model  # noqa: E402
from .test_e2e_torch import FAST, train_accumulating  # noqa: E402


def test_a_measured_run_sends_its_trajectory_and_the_study_fits_it(service):
    steps = 60
    with Client(service.url) as client:
        model = make_model()
        job = client.autoconfigure(model, study="noise-trajectory", reference=REFERENCE, target_batch_size=BATCH,
                                   job_options=FAST)
        plan = job.batch_plan(per_device_batch_size=BATCH // 4)
        noise = job.measure_noise(model, plan)
        with job:
            train_accumulating(job, model, plan, steps)
            job.report(10 * steps, 1.0)  # alone in its bin of examples seen: the values as sent
            job.complete(evaluate(model))
    assert noise.value is not None
    total, [traj] = service.store.noise_trajectories("default", "noise-trajectory")
    assert total == 1 and traj.run_id == job.run.id
    for p in traj.points:
        # examples seen = (step + 1) x the global batch, the bin's mean over its steps
        assert (p.first_step + 1) * BATCH <= p.examples_seen <= (p.last_step + 1) * BATCH
        assert p.grad_sq is not None and p.trace_sigma is not None and p.tokens_seen is None
        assert p.trace_sigma / p.grad_sq == pytest.approx(p.noise_scale, rel=0.5)  # a bin's ratio of means
    *_, before, last = traj.points
    assert before.last_step == steps - 1 and (last.first_step, last.last_step, last.reports) == (10 * steps,) * 2 + (1,)
    assert last.examples_seen == (10 * steps + 1) * BATCH
    assert last.noise_scale == pytest.approx(noise.value, rel=1e-9)
    assert (last.grad_sq, last.trace_sigma) == pytest.approx((noise.grad_sq, noise.trace_sigma), rel=1e-9)
    assert sum(p.reports for p in traj.points) <= steps + 1
    with Client(service.url) as client:
        out = client.critical_batch("noise-trajectory")
        with pytest.raises(NotFoundError):
            client.critical_batch("no-such-study")

    async def read_async():
        async with AsyncClient(service.url) as ac:
            return await ac.critical_batch("noise-trajectory")

    assert asyncio.run(read_async()) == out
    assert out.runs == 1 and out.fit is not None and out.fit.points[-1].noise_scale > 0
    assert sum(p.reports for p in out.points) == sum(p.reports for p in traj.points)


def test_examples_and_tokens_seen_follow_the_recipes_stages():
    stage = {"peak_lr": 1e-3, "warmup_steps": 0, "const_steps": 0, "warmup_ratio": 0.0, "const_ratio": 0.0}
    recipe = Recipe.model_validate({"optimizer": {"name": "adamw", "lr": 1e-3}, "total_steps": 30, "stages": [
        {**stage, "batch_size": 8, "steps": 10, "decay_steps": 10, "seq_len": 128},
        {**stage, "batch_size": 16, "steps": 20, "decay_steps": 20, "seq_len": 128}]})
    assert seen(recipe.stages, 0) == (8, 1024)
    assert seen(recipe.stages, 9) == (80, 80 * 128)
    assert seen(recipe.stages, 10) == (96, 96 * 128)
    assert seen(recipe.stages, 39) == (80 + 30 * 16, (80 + 30 * 16) * 128)  # past the end: the last batch
    no_len = Recipe.model_validate({**recipe.model_dump(), "stages": [
        {**s.model_dump(), "seq_len": None} for s in recipe.stages]})
    assert seen(no_len.stages, 10) == (96, None)
