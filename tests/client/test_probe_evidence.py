"""``job.branch_probe`` sends what it measured as study evidence (a real torch probe on a tiny model, the real
client and service): the service stores it, and the study's critical batch is calibrated by it."""

from __future__ import annotations

import asyncio
import logging

import pytest

torch = pytest.importorskip("torch")

from largebatch.client import AsyncClient, Client, errors  # noqa: E402
from largebatch.client._reporter import seen  # noqa: E402
from largebatch.scaling_rules.wire import MeasuredCriticalBatchIn  # noqa: E402

from ._training import BATCH, REFERENCE, Data  # noqa: E402
from .test_branch_probe import FAST, loss_fn, make_model, stream  # noqa: E402


def small_stream():
    data = Data(7)
    while True:
        yield data.batch(8)


def _train(job, model, data, steps: range) -> None:
    for step in steps:
        for _ in range(2):
            x, y = data.batch(BATCH // 2)
            (torch.nn.functional.mse_loss(model(x), y) / 2).backward()
        job.optimizer.step()
        job.scheduler.step()
        job.optimizer.zero_grad()
        job.report(step, 0.5)


def test_the_probe_is_sent_stored_and_calibrates_the_study(service, caplog):
    caplog.set_level(logging.INFO, logger="largebatch.client")
    study = "probe-evidence"
    with Client(service.url) as client:
        model = make_model()
        job = client.autoconfigure(model, study=study, reference=REFERENCE, target_batch_size=BATCH,
                                   job_options=FAST)
        noise = job.measure_noise(model, job.batch_plan(per_device_batch_size=BATCH // 2))
        data = Data(1)
        with job:
            _train(job, model, data, range(20))
            # this model's critical batch is ~10-20 examples (far below its batch of 128): branches from B = 8 span it
            result = job.branch_probe(model, small_stream, loss_fn, ks=(1, 2, 4, 8), steps=16, micro_batches=1,
                                      batch_size=8)
            _train(job, model, data, range(20, 24))
            job.complete(0.0)
        assert result.critical_batch is not None, (result.note, result.examples_ratios)
        assert result.step == 19 and result.examples_seen == seen(job.recipe.stages, 19)[0] == 20 * BATCH
        assert result.noise_scale == pytest.approx(noise.value, rel=0.5) and result.noise_scale > 0
        stored = result.stored
        assert stored is not None and stored.run_id == job.run.id and stored.step == 19
        assert stored.critical_batch == result.critical_batch and stored.noise_scale == result.noise_scale
        assert stored.ks == [1, 2, 4, 8] and stored.batch_size == 8 and stored.window_examples == 16 * 8
        assert stored.critical_batch_low <= stored.critical_batch
        out = client.critical_batch(study)
        assert out.calibration.measured == 1
        assert out.calibration.factor == pytest.approx(result.critical_batch / result.noise_scale)
    # What the store holds, read directly.
    total, [row] = service.store.measured_critical_batches("default", study)
    assert total == 1 and row == stored


def test_a_probe_before_any_step_is_not_sent_and_the_async_client_sends(service, caplog):
    caplog.set_level(logging.INFO, logger="largebatch.client")
    with Client(service.url) as client:
        model = make_model()
        job = client.autoconfigure(model, study="probe-evidence-early", reference=REFERENCE,
                                   target_batch_size=BATCH, job_options=FAST)
        with job:
            result = job.branch_probe(model, stream, loss_fn, ks=(1, 2), steps=4, micro_batches=2)
            job.fail("test over")
        assert result.stored is None and result.examples_seen is None
        assert any("not sent" in r.getMessage() for r in caplog.records)
        run_id = job.run.id

    async def send() -> None:
        async with AsyncClient(service.url) as ac:
            body = MeasuredCriticalBatchIn(step=3, examples_seen=512.0, critical_batch=300.0, critical_batch_low=200.0,
                                           batch_size=BATCH, ks=[1, 2])
            run = await ac.create_run("probe-evidence-early", recipe=job.recipe)
            stored = await ac.report_critical_batch(run.id, body)
            assert stored.run_id == run.id and stored.critical_batch_high is None
            assert await ac.report_critical_batch(run.id, body.model_dump()) == stored  # a resend: the stored one
            with pytest.raises(errors.ConflictError):  # the failed run takes no more evidence
                await ac.report_critical_batch(run_id, body)

    asyncio.run(send())
