"""PyTorch Lightning: train with the recipe's optimizer and scheduler, report to the run.

::

    from largebatch.client.integrations.lightning import LargebatchCallback, configure_optimizers

    job = client.autoconfigure(module, study="my-model", reference={...}, target_batch_size=512)

    class Module(L.LightningModule):
        def configure_optimizers(self):
            return configure_optimizers(job)      # LR scheduler stepped every optimizer step

    trainer = L.Trainer(max_steps=job.recipe.total_steps, callbacks=[LargebatchCallback(job)])
    trainer.fit(module, train_loader, val_loader)  # losses reported, run completed with val metric

The callback reports each training step's loss (once per optimizer step, at its 0-based index
``global_step - 1``, as in a plain loop), stops the trainer when the service says so, keeps the
study's metric from each validation, completes the run at the end of ``fit`` and, on an
exception (Ctrl-C included), records the run ``failed`` or ``diverged``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from largebatch.client.job import Job

from ._finish import finish

__all__ = ["LargebatchCallback", "configure_optimizers"]


def configure_optimizers(job: Job) -> dict[str, Any]:
    """What ``LightningModule.configure_optimizers`` returns: the recipe's optimizer, and its LR
    scheduler stepped after every optimizer step (``interval="step"``)."""
    return {"optimizer": job.optimizer,
            "lr_scheduler": {"scheduler": job.scheduler, "interval": "step", "frequency": 1, "name": "largebatch"}}


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

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step - 1  # optimizer steps taken so far, minus one: this step's index
        if step < 0 or step == self._last_step:  # gradient accumulation: report once per optimizer step
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is None:
            return
        self._last_step = step
        self.job.report(step, loss.detach() if isinstance(loss, torch.Tensor) else loss, self._norm)
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
