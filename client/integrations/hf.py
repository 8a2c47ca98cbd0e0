"""Hugging Face ``Trainer``: train with the recipe's optimizer and scheduler, report to the run.

::

    from largebatch.client.integrations.hf import LargebatchCallback, optimizers, training_args

    job = client.autoconfigure(model, study="gpt-tiny", reference={...}, target_batch_size=512)
    args = TrainingArguments("out", per_device_train_batch_size=512, eval_strategy="steps",
                             eval_steps=job.recipe.total_steps, **training_args(job))
    with job:
        trainer = Trainer(model=model, args=args, train_dataset=..., eval_dataset=...,
                          optimizers=optimizers(job), callbacks=[LargebatchCallback(job)])
        trainer.train()          # the callback reports the losses and completes the run

The callback reports each logged training loss (and gradient norm) at the index of the optimizer
step it belongs to (``global_step - 1``, as in a plain loop), stops training when the service
says so (``should_stop``), keeps the last value of the study's metric from each evaluation and,
when training ends, completes the run with it.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from largebatch.client.job import Job

from ._finish import finish

__all__ = ["LargebatchCallback", "optimizers", "training_args"]

log = logging.getLogger("largebatch.client")


def optimizers(job: Job) -> tuple[Any, Any]:
    """``Trainer(optimizers=...)``: the recipe's optimizer and LR scheduler."""
    return job.optimizer, job.scheduler


def training_args(job: Job) -> dict[str, Any]:
    """``TrainingArguments`` fields the recipe decides: the step budget, the gradient clipping (if
    the recipe has one), and NaN losses passed through to the logs (the service must see them)."""
    recipe = job.recipe
    sizes = {s.batch_size for s in recipe.stages}
    if len(sizes) > 1:
        log.warning("largebatch: the recipe has stages at batch sizes %s; Trainer trains at one batch size: "
                    "run one Trainer per stage", sorted(sizes))
    args: dict[str, Any] = {"max_steps": recipe.total_steps, "logging_nan_inf_filter": False,
                            "learning_rate": recipe.stages[0].peak_lr}
    if recipe.optimizer.max_grad_norm is not None:
        args["max_grad_norm"] = recipe.optimizer.max_grad_norm
    return args


class LargebatchCallback(TrainerCallback):
    """Reports ``Trainer`` losses to ``job``; completes the run with the final metric.

    Args:
        job: The job from :meth:`Client.autoconfigure`.
        metric: Key of the final metric in the evaluation metrics (default: the study's metric,
            e.g. ``eval_loss``).
        complete_on_train_end: Complete the run when training ends (with the last evaluated
            metric; as ``diverged``/``pruned`` when the loss went NaN or the service stopped it).
    """

    def __init__(self, job: Job, *, metric: str | None = None, complete_on_train_end: bool = True) -> None:
        self.job = job
        self.metric = metric
        self.complete_on_train_end = complete_on_train_end
        self.last_metric: float | None = None

    def _metric_keys(self) -> list[str]:
        name = self.metric or self.job.metric_name
        return [name] if name.startswith("eval_") else [name, f"eval_{name}"]

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs or state.global_step < 1:
            return
        self.job.report(state.global_step - 1, logs["loss"], logs.get("grad_norm"))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.job.should_stop:
            control.should_training_stop = True

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        for key in self._metric_keys():
            if metrics and key in metrics:
                self.last_metric = float(metrics[key])
                return

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if not self.complete_on_train_end or not state.is_world_process_zero:
            return
        finish(self.job, self.last_metric,
               missing=f"training ended without an evaluation of {' or '.join(self._metric_keys())}: the run "
                       "stays open; call job.complete(metric) after trainer.evaluate()")
