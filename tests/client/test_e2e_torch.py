"""End to end against a real `largebatch serve`: autoconfigure, train a torch model on CPU with the
recipe's LAMB and scheduler, report, complete; then read the study store itself."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

torch = pytest.importorskip("torch")

from largebatch.client import AsyncClient, Client, JobError, recommend_local  # noqa: E402
from largebatch.scaling_rules.schedule import lr_at  # noqa: E402

from ._training import BATCH, REFERENCE, Data, evaluate, make_model, train  # noqa: E402

pytestmark = pytest.mark.slow  # against a `largebatch serve` subprocess (conftest.py)

FAST = {"flush_interval": 0.1, "heartbeat_interval": 30.0, "close_timeout": 30.0}


@pytest.fixture
def client(service):
    with Client(service.url) as c:
        yield c


def test_three_lines_train_for_real_and_everything_lands_in_the_store(service, client):
    model = make_model()
    job = client.autoconfigure(model, study="mlp-e2e", reference=REFERENCE, target_batch_size=BATCH,
                               job_options=FAST)
    recipe = job.recipe
    # The recipe the engine computes for this setup, and the optimizer it names.
    assert recipe.total_steps == 300 and recipe.stages[0].batch_size == BATCH
    assert recipe.optimizer.name == "lamb" and type(job.optimizer).__name__ == "LAMB"
    assert job.run is not None and job.run.state == "running" and job.run.study == "mlp-e2e"

    with job:
        lrs, losses = train(job, model, recipe.total_steps)
        metric = evaluate(model)
        run = job.complete(metric)

    assert len(losses) == 300 and not job.should_stop
    assert losses[-1] < losses[0] / 3, (losses[0], losses[-1])  # it learned
    # The LR the optimizer ran each step with is the recipe's schedule, in every param group.
    for step, group_lrs in enumerate(lrs):
        assert group_lrs == [lr_at(recipe, step)] * len(group_lrs), step
    assert lrs[0][0] == pytest.approx(recipe.stages[0].peak_lr / recipe.stages[0].warmup_steps)
    assert max(g[0] for g in lrs) == pytest.approx(recipe.stages[0].peak_lr)

    # What the service answered, and what the store really holds.
    assert run.state == "completed" and run.metric == metric
    stored = service.store.get_run(run.id)
    assert stored.state == "completed" and stored.metric == metric
    assert stored.recipe_hash == recipe.fingerprint()
    assert stored.environment["torch"] == torch.__version__
    reports = service.store.reports(run.id)
    assert [r.step for r in reports] == list(range(300))
    assert [r.loss for r in reports] == losses  # exactly the values, each step once
    assert all(r.grad_norm is not None and r.grad_norm > 0 for r in reports)
    assert job.delivered == 300 and job.pending == 0
    assert client.get_run(run.id).last_step == 299


def test_local_recipe_equals_the_service_recipe_for_an_empty_study(client):
    request = {"model": {"params": 340_000_000}, "reference": {"batch_size": 512, "lr": 6.25e-4,
               "warmup_ratio": 0.003125, "steps": 1_000_000}, "target": {"batch_size": 32768}}
    client.create_study("empty-study", model_params=340_000_000)
    for filing in ({}, {"study": "empty-study"}):
        remote = client.recommend(request, **filing)
        local = recommend_local(request, **filing)
        assert local.model_dump() == remote.model_dump()
        assert local.total_steps == 15625 and local.stages[0].peak_lr == pytest.approx(5e-3)


def test_same_idempotency_key_same_run_and_async_client(service, client):
    model = make_model()
    first = client.autoconfigure(model, study="idem", reference=REFERENCE, target_batch_size=BATCH,
                                 idempotency_key="job-7", job_options=FAST)

    async def again():
        async with AsyncClient(service.url) as ac:
            return await ac.autoconfigure(model, study="idem", reference=REFERENCE, target_batch_size=BATCH,
                                          idempotency_key="job-7", job_options=FAST)

    second = asyncio.run(again())
    assert second.run.id == first.run.id
    assert client.get_study("idem").n_runs == 1
    first.close()
    train(second, model, 20)
    assert second.complete(evaluate(model)).state == "completed"
    assert [r.step for r in service.store.reports(second.run.id)] == list(range(20))


def test_an_exception_marks_the_run_failed_after_delivering_its_reports(service, client):
    model = make_model()
    job = client.autoconfigure(model, study="crash", reference=REFERENCE, target_batch_size=BATCH,
                               job_options={**FAST, "flush_interval": 3600})

    def boom(step):
        if step == 24:
            raise RuntimeError("CUDA out of memory (pretend)")

    with pytest.raises(RuntimeError, match="out of memory"), job:
        train(job, model, 100, on_step=boom)
    run = service.store.get_run(job.run.id)
    assert run.state == "failed" and "RuntimeError: CUDA out of memory" in run.reason
    assert [r.step for r in service.store.reports(run.id)] == list(range(25))
    with pytest.raises(JobError):
        job.report(25, 1.0)


def test_a_nan_loss_stops_the_job_and_the_run_is_diverged(service, client):
    model = make_model()
    job = client.autoconfigure(model, study="nan", reference=REFERENCE, target_batch_size=BATCH, job_options=FAST)
    with job:
        for step in range(100):
            job.report(step, 1.0 / (step + 1) if step < 30 else float("nan"))
            job.flush(10)  # here only to know exactly when should_stop comes; a loop would not wait
            if job.should_stop:
                break
    assert job.should_stop and "nan" in job.stop_reason.lower()
    assert step == 30
    run = service.store.get_run(job.run.id)
    assert run.state == "diverged" and run.diverged_step == 30
    reports = service.store.reports(run.id)
    assert len(reports) == 31 and math.isnan(reports[-1].loss)


def test_a_step_the_optimizer_skipped_is_divergence_at_that_step(service, client):
    """LAMB skips a step whose gradient is not finite (nonfinite='skip', its default) and counts it:
    the job reports that step as divergence although its loss was finite, and stops."""
    model = make_model()
    job = client.autoconfigure(model, study="skipped", reference=REFERENCE, target_batch_size=BATCH,
                               job_options=FAST)
    data, loss_fn = Data(), torch.nn.MSELoss()
    with job:
        for step in range(50):
            x, y = data.batch()
            loss = loss_fn(model(x), y)
            job.optimizer.zero_grad()
            loss.backward()
            if step == 12:  # one overflowing gradient, as a bad batch under fp16 would give
                next(model.parameters()).grad[0, 0] = math.inf
            before = [p.detach().clone() for p in model.parameters()]
            job.optimizer.step()
            job.scheduler.step()
            job.report(step, loss)
            if step == 12:
                assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
            if job.should_stop:
                break
    assert step == 12 and job.skipped_steps == 1 and job.diverged_step == 12
    assert "step 12 skipped" in job.stop_reason
    run = service.store.get_run(job.run.id)
    assert run.state == "diverged" and run.diverged_step == 12
    reports = service.store.reports(run.id)
    assert math.isfinite(reports[-1].loss) and math.isinf(reports[-1].grad_norm)


def test_a_runs_reports_read_back_sync_and_async(service, client):
    model = make_model()
    job = client.autoconfigure(model, study="readback", reference=REFERENCE, target_batch_size=BATCH,
                               job_options=FAST)
    with job:
        for step in range(5):
            job.report(step, 2.0 - step / 10 if step < 4 else float("nan"), 0.5)
    run = service.store.get_run(job.run.id)
    assert run.state == "diverged" and run.diverged_step == 4
    page = client.list_reports(run.id, limit=3)
    assert page.total == 5 and [p.step for p in page.items] == [0, 1, 2]
    assert page.items[1].loss == pytest.approx(1.9) and page.items[1].grad_norm == 0.5 and page.items[1].finite
    last = client.list_reports(run.id, offset=4).items
    assert len(last) == 1 and last[0].loss is None and not last[0].finite
    csv_text = client.list_reports_csv(run.id)
    assert csv_text.splitlines()[0] == "step,loss,grad_norm" and csv_text.splitlines()[-1] == "4,nan,0.5"

    async def read_async():
        async with AsyncClient(service.url) as ac:
            return await ac.list_reports(run.id), await ac.list_reports_csv(run.id, limit=2)

    apage, acsv = asyncio.run(read_async())
    assert apage == client.list_reports(run.id) and acsv.count("\n") == 3


def train_accumulating(job, model, plan, steps, after_step=lambda: None):
    """``steps`` optimizer steps of ``plan.accumulation`` micro-batches each, a report after each."""
    data, loss_fn = Data(), torch.nn.MSELoss()
    for step in range(steps):
        x, y = data.batch()
        for i in range(plan.accumulation):
            part = slice(i * plan.per_device, (i + 1) * plan.per_device)
            (loss_fn(model(x[part]), y[part]) / plan.accumulation).backward()
        job.optimizer.step()  # the job folds this step's norms in first
        job.scheduler.step()
        job.optimizer.zero_grad()
        with torch.no_grad():
            job.report(step, float(loss_fn(model(x), y)))
        after_step()


def test_a_job_given_a_noise_scale_estimator_reports_it_and_the_run_keeps_it(service, client):
    from largebatch.client.optim import GradientNoiseScale

    model = make_model()
    noise = GradientNoiseScale()
    job = client.autoconfigure(model, study="noise", reference=REFERENCE, target_batch_size=BATCH,
                               job_options={**FAST, "noise": noise})
    plan = job.batch_plan(per_device_batch_size=BATCH // 4)
    assert (plan.per_device, plan.accumulation) == (BATCH // 4, 4)
    noise.attach_accumulation(model.parameters(), micro_batch_size=plan.per_device, grad_scale=plan.accumulation)
    values = []
    with job:
        train_accumulating(job, model, plan, 40, after_step=lambda: values.append(noise.value))
        job.complete(evaluate(model))
    assert noise.n_updates == 40 and values[-1] is not None and values[-1] > 0
    run = service.store.get_run(job.run.id)
    assert run.state == "completed" and run.noise_scale == pytest.approx(values[-1])


def test_job_measure_noise_in_one_process_reports_it(service, client):
    """``job.measure_noise``: the estimator on the accumulation micro-batches, folded in at each step,
    its value with each report, the run keeps the last one."""
    model = make_model()
    job = client.autoconfigure(model, study="noise-auto", reference=REFERENCE, target_batch_size=BATCH,
                               job_options=FAST)
    plan = job.batch_plan(per_device_batch_size=BATCH // 4)
    noise = job.measure_noise(model, plan)
    assert job.noise is noise
    with pytest.raises(ValueError, match="already measures the noise scale"):
        job.measure_noise(model, plan)
    with job:
        train_accumulating(job, model, plan, 30)
        job.complete(evaluate(model))
    assert noise.n_updates == 30 and noise.value is not None and noise.value > 0
    assert service.store.get_run(job.run.id).noise_scale == pytest.approx(noise.value)


def test_measure_noise_without_accumulation_in_one_process_is_a_clear_error(service, client):
    model = make_model()
    job = client.autoconfigure(model, study="noise-none", reference=REFERENCE, target_batch_size=BATCH,
                               job_options=FAST)
    with pytest.raises(ValueError, match="needs gradient accumulation"):
        job.measure_noise(model)  # the default plan: the whole batch in one micro-batch
    assert job.noise is None
    job.fail("test over")


def test_nan_then_exception_is_diverged_not_failed(service, client):
    model = make_model()
    job = client.autoconfigure(model, study="nan2", reference=REFERENCE, target_batch_size=BATCH,
                               job_options={**FAST, "flush_interval": 3600})
    with pytest.raises(FloatingPointError), job:
        for step in range(10):
            job.report(step, 2.0 if step < 7 else float("inf"))
        raise FloatingPointError("non-finite gradients")
    run = service.store.get_run(job.run.id)
    assert run.state == "diverged" and run.diverged_step == 7


def test_heartbeats_renew_the_lease(service, client):
    model = make_model()
    job = client.autoconfigure(model, study="beat", reference=REFERENCE, target_batch_size=BATCH,
                               job_options={**FAST, "heartbeat_interval": 0.2})
    before = service.store.get_run(job.run.id).lease_expires_at
    deadline = time.monotonic() + 10
    while service.store.get_run(job.run.id).lease_expires_at == before:
        assert time.monotonic() < deadline, "no heartbeat arrived"
        time.sleep(0.1)
    job.fail("test over")
    assert service.store.get_run(job.run.id).state == "failed"


def test_ending_without_complete_is_recorded(service, client):
    model = make_model()
    job = client.autoconfigure(model, study="nocomplete", reference=REFERENCE, target_batch_size=BATCH,
                               job_options=FAST)
    with job:
        train(job, model, 5)
    run = service.store.get_run(job.run.id)
    assert run.state == "failed" and "without calling complete()" in run.reason
    with pytest.raises(ValueError, match="final metric"):
        job.complete()


def test_the_job_outlives_the_client_block_that_made_it(service):
    model = make_model()
    with Client(service.url) as c:
        job = c.autoconfigure(model, study="outlive", reference=REFERENCE, target_batch_size=BATCH,
                              job_options=FAST)
    with job:  # the client above is closed: the job has its own connections
        _, losses = train(job, model, 30)
        run = job.complete(evaluate(model))
    assert run.state == "completed"
    assert [r.loss for r in service.store.reports(run.id)] == losses


def test_a_step_reported_again_is_overwritten_not_duplicated(service, client):
    job = client.autoconfigure(make_model(), study="rereport", reference=REFERENCE, target_batch_size=BATCH,
                               job_options=FAST)
    for step in range(10):
        job.report(step, 5.0 - step * 0.1)
    assert job.flush(30)
    job.report(3, 1.5)  # e.g. a job resumed from a checkpoint at step 3
    job.report(4, torch.tensor(1.25))
    run = job.complete(1.0)
    reports = service.store.reports(run.id)
    assert [r.step for r in reports] == list(range(10))
    assert [r.loss for r in reports][2:6] == [4.8, 1.5, 1.25, 4.5]
