"""PyTorch Lightning end to end: configure_optimizers from the recipe, the callback reporting to a
real service, trained on CPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning.pytorch")

from largebatch.client import Client  # noqa: E402
from largebatch.client.integrations.lightning import (  # noqa: E402
    LargebatchCallback,
    configure_optimizers,
    trainer_args,
)
from largebatch.scaling_rules.schedule import lr_at  # noqa: E402

from ._training import BATCH, REFERENCE, Data, make_model  # noqa: E402

pytestmark = pytest.mark.slow  # against a `largebatch serve` subprocess (conftest.py)


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()
        self.job = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return configure_optimizers(self.job)


class RecordLR(L.Callback):
    def __init__(self) -> None:
        self.lrs: dict[int, list[float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs[trainer.global_step] = [g["lr"] for g in optimizer.param_groups]


def loader(n_batches: int, seed: int) -> torch.utils.data.DataLoader:
    data = Data(seed)
    batches = [data.batch() for _ in range(n_batches)]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def test_lightning_with_the_recipe_reports_and_completes(service):
    module = Regression()
    job = Client(service.url).autoconfigure(module, study="lightning-mlp", reference=REFERENCE,
                                            target_batch_size=BATCH, job_options={"flush_interval": 0.1})
    module.job = job
    total = job.recipe.total_steps
    record, callback = RecordLR(), LargebatchCallback(job, grad_norm=True)
    trainer = L.Trainer(max_steps=total, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[callback, record])
    trainer.fit(module, loader(30, 1), loader(4, 99))  # 10 epochs of 30 steps, validated after each

    assert trainer.global_step == total
    assert sorted(record.lrs) == list(range(total))
    for step, lrs in record.lrs.items():
        assert lrs == [lr_at(job.recipe, step)] * len(lrs), step
    run = service.store.get_run(job.run.id)
    assert run.state == "completed" and run.metric == pytest.approx(float(trainer.callback_metrics["val_loss"]))
    reports = service.store.reports(run.id)
    assert [r.step for r in reports] == list(range(total))
    assert all(r.grad_norm is not None and r.grad_norm > 0 for r in reports)
    assert reports[-1].loss < reports[0].loss / 3


def test_lightning_exception_marks_the_run_failed(service):
    module = Regression()
    job = Client(service.url).autoconfigure(module, study="lightning-crash", reference=REFERENCE,
                                            target_batch_size=BATCH, job_options={"flush_interval": 0.1})
    module.job = job

    class Boom(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 12:
                raise ValueError("bad batch")

    trainer = L.Trainer(max_steps=job.recipe.total_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[LargebatchCallback(job), Boom()])
    with pytest.raises(ValueError, match="bad batch"):
        trainer.fit(module, loader(30, 1))
    run = service.store.get_run(job.run.id)
    assert run.state == "failed" and run.reason == "ValueError: bad batch"
    assert [r.step for r in service.store.reports(run.id)] == list(range(12))


@pytest.mark.parametrize("max_steps", [100, 400])
def test_lightning_max_steps_that_disagree_with_the_recipe_are_refused(service, max_steps):
    module = Regression()
    job = Client(service.url).autoconfigure(module, study="lightning-mismatch", reference=REFERENCE,
                                            target_batch_size=BATCH, job_options={"flush_interval": 0.1})
    module.job = job
    assert trainer_args(job)["max_steps"] == job.recipe.total_steps == 300
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[LargebatchCallback(job)])
    with pytest.raises(ValueError, match=f"max_steps={max_steps}.* recipe has 300 steps"):
        trainer.fit(module, loader(4, 1))
    run = service.store.get_run(job.run.id)
    assert run.state == "failed" and "recipe has 300 steps" in run.reason
    assert service.store.reports(run.id) == []
