"""PyTorch Lightning: train with the whole recipe, report to the run, one run per job.

::

    from largebatch.client.integrations.lightning import LargebatchCallback, configure_optimizers, trainer_args

    job = client.autoconfigure(module, study="my-model", reference={...}, target_batch_size=512)
    plan = job.batch_plan(per_device_batch_size=64, world_size=2)   # devices x num_nodes

    class Module(L.LightningModule):
        def configure_optimizers(self):
            return configure_optimizers(job)      # LR scheduler stepped every optimizer step

    trainer = L.Trainer(devices=2, strategy="ddp", callbacks=[LargebatchCallback(job)], **trainer_args(job, plan))
    trainer.fit(module, DataLoader(train, batch_size=plan.per_device), val_loader)

Under ``strategy="ddp"`` Lightning re-runs the script for the other ranks: their ``autoconfigure``
asks nothing of the service and takes rank 0's recipe (see :mod:`largebatch.client._autoconfigure`),
so there is one run per job; the callback checks at ``setup`` that every rank has the same.

:func:`trainer_args` sets the step budget, gradient accumulation, no clipping by Lightning (the
optimizer clips when the recipe says so) and the logging cadence. The callback refuses to train
(``ValueError`` before the first step) when the trainer disagrees with the recipe on steps or batch.
It reports, once per optimizer step at its 0-based index ``global_step - 1``, the per-example loss of
that step: the mean over its micro-batches (Lightning hands each one divided by the accumulation) and
over the ranks. It stops the trainer when the service says so (divergence included, on every rank at
the same step), keeps the study's metric from each validation, completes the run at the end of
``fit`` (``diverged``/``pruned`` when it was stopped) and, on an exception (Ctrl-C included), records
the run ``failed`` or ``diverged``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from largebatch.client._dist import BatchPlan
from largebatch.client.job import Job

from ._finish import finish

__all__ = ["LargebatchCallback", "configure_optimizers", "trainer_args"]


def configure_optimizers(job: Job) -> dict[str, Any]:
    """What ``LightningModule.configure_optimizers`` returns: the recipe's optimizer, and its LR
    scheduler stepped after every optimizer step (``interval="step"``)."""
    job.sync()
    return {"optimizer": job.optimizer,
            "lr_scheduler": {"scheduler": job.scheduler, "interval": "step", "frequency": 1, "name": "largebatch"}}


def trainer_args(job: Job, plan: BatchPlan | None = None) -> dict[str, Any]:
    """``L.Trainer`` arguments the recipe decides: ``max_steps``, ``accumulate_grad_batches`` (from
    ``plan``, default :meth:`Job.batch_plan`), no gradient clipping, ``log_every_n_steps=1``. Give
    the DataLoaders ``batch_size=plan.per_device``."""
    plan = plan or job.batch_plan()
    return {"max_steps": job.recipe.total_steps, "accumulate_grad_batches": plan.accumulation,
            "gradient_clip_val": None, "log_every_n_steps": 1}


def _total_grad_norm(module: torch.nn.Module) -> torch.Tensor | None:
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))


class LargebatchCallback(pl.Callback):
    """Reports Lightning training losses to ``job``; completes the run with the final metric.

    Args:
        job: The job from :meth:`Client.autoconfigure`.
        metric: Key in ``trainer.callback_metrics`` of the final metric (default: the study's
            metric, e.g. ``eval_loss``, or ``val_loss`` if that is what was logged).
        grad_norm: Also report the gradient norm (before clipping), computed on the device
            without waiting for it.
        complete_on_fit_end: Complete the run when ``fit`` ends.
    """

    def __init__(self, job: Job, *, metric: str | None = None, grad_norm: bool = False,
                 complete_on_fit_end: bool = True) -> None:
        self.job = job
        self.metric = metric
        self.grad_norm = grad_norm
        self.complete_on_fit_end = complete_on_fit_end
        self.last_metric: float | None = None
        self._last_step = -1
        self._norm: torch.Tensor | None = None
        self._micro: list[torch.Tensor] = []  # this optimizer step's micro-batch losses so far

    def _metric_keys(self) -> list[str]:
        if self.metric:
            return [self.metric]
        name = self.job.metric_name
        keys = [name]
        if name.startswith("eval_"):
            keys += ["val_" + name[5:], "val/" + name[5:]]
        return keys

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.grad_norm:
            self._norm = _total_grad_norm(pl_module)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.job.sync()  # the process group exists now: rank 0's recipe and run reach every rank

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        recipe = self.job.recipe
        if trainer.max_steps != recipe.total_steps:
            raise ValueError(f"Trainer(max_steps={trainer.max_steps}) but the recipe has {recipe.total_steps} "
                             "steps: use trainer_args(job)")
        loader = trainer.train_dataloader
        per_device = getattr(loader, "batch_size", None)
        if per_device is not None:
            trained = per_device * trainer.accumulate_grad_batches * trainer.world_size
            wanted = recipe.stages[0].batch_size
            if trained != wanted:
                raise ValueError(
                    f"the trainer would train batches of {trained} ({per_device} per device x "
                    f"{trainer.accumulate_grad_batches} accumulation x {trainer.world_size} ranks) but the recipe "
                    f"is for {wanted}: use job.batch_plan() and trainer_args(job, plan)")
        if trainer.gradient_clip_val:
            raise ValueError(f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips although the recipe "
                             "does not say so: use trainer_args(job)")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None:
            # Lightning hands each micro-batch's loss divided by the accumulation: undone here.
            loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
            self._micro.append(loss * trainer.accumulate_grad_batches)
        step = trainer.global_step - 1  # optimizer steps taken so far, minus one: this step's index
        if step < 0 or step == self._last_step or not self._micro:  # mid-accumulation: wait for the step
            return
        self._last_step = step
        mean = torch.stack(self._micro).mean()
        self._micro = []
        self.job.report(step, mean, self._norm)
        self._norm = None
        if self.job.should_stop:
            trainer.should_stop = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for key in self._metric_keys():
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.last_metric = float(value)
                return

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.complete_on_fit_end or not trainer.is_global_zero:
            return
        finish(self.job, self.last_metric,
               missing=f"fit ended without a validation value of {' or '.join(self._metric_keys())}: the run "
                       "stays open; call job.complete(metric)")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            self.job.abort(exception)
