"""Hugging Face ``Trainer``: train with the whole recipe, report to the run, one run per job.

::

    from largebatch.client.integrations.hf import LargebatchCallback, optimizers, training_args

    job = client.autoconfigure(model, study="gpt-tiny", reference={...}, target_batch_size=512)
    args = TrainingArguments("out", eval_strategy="steps", eval_steps=job.recipe.total_steps,
                             **training_args(job, per_device_batch_size=16))
    with job:
        trainer = Trainer(model=model, args=args, train_dataset=..., eval_dataset=...,
                          optimizers=optimizers(job), callbacks=[LargebatchCallback(job)])
        trainer.train()          # the callback reports the losses and completes the run

The same script runs under ``torchrun --nproc_per_node=N``: rank 0 asks for the recipe and owns the
run, every rank trains with it, and :func:`training_args` splits the recipe's (global) batch into
per-device batch x gradient accumulation x N.

:func:`training_args` sets everything of the recipe the ``Trainer`` would otherwise decide: the step
budget, the batch plan, the logging cadence (every optimizer step by default: reports are batched,
so this costs one HTTP request per second at most) and no ``Trainer`` clipping (``max_grad_norm=0``:
the recipe's clipping, when it has one, is done by the optimizer itself). The callback refuses to
train (``ValueError`` before the first step) when the arguments disagree with the recipe on steps
or batch.

The callback reports each logged training loss at the index of the optimizer step it belongs to
(``global_step - 1``, as in a plain loop). That loss is the Trainer's: the mean per-example (for a
language model, per-token) loss of the optimizer step over all micro-batches and ranks. It stops
training when the service says so (``should_stop``; divergence included, on every rank at the same
step), keeps the last value of the study's metric from each evaluation and, when training ends,
completes the run with it (``diverged``/``pruned`` when it was stopped). The final metric comes from
evaluation: without an evaluation set the run stays open and a warning says to call
``job.complete(metric)`` after ``trainer.evaluate()``.
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
    job.sync()
    return job.optimizer, job.scheduler


def training_args(job: Job, *, per_device_batch_size: int | None = None, logging_steps: int = 1) -> dict[str, Any]:
    """``TrainingArguments`` fields the recipe decides.

    Args:
        job: The job from :meth:`Client.autoconfigure`.
        per_device_batch_size: The most examples one device holds at once (default: a rank's whole
            share of the recipe's batch); the rest is gradient accumulation.
        logging_steps: Report every this many optimizer steps.

    Raises:
        ValueError: the recipe's batch does not split over the ranks, or it has stages at several
            batch sizes (run one Trainer per stage).
    """
    job.sync()
    recipe = job.recipe
    plan = job.batch_plan(per_device_batch_size)
    return {"max_steps": recipe.total_steps, "learning_rate": recipe.stages[0].peak_lr,
            "per_device_train_batch_size": plan.per_device, "gradient_accumulation_steps": plan.accumulation,
            "logging_steps": logging_steps, "logging_strategy": "steps",
            # The optimizer clips when the recipe says so; the Trainer's default 1.0 would clip again.
            "max_grad_norm": 0.0,
            # NaN losses must reach the service (the Trainer would replace them by the running mean).
            "logging_nan_inf_filter": False}


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

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        job = self.job.sync()
        recipe = job.recipe
        if args.max_steps != recipe.total_steps:
            raise ValueError(f"TrainingArguments.max_steps is {args.max_steps} but the recipe has "
                             f"{recipe.total_steps} steps: use training_args(job)")
        trained = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        wanted = recipe.stages[0].batch_size
        if trained != wanted:
            raise ValueError(
                f"the Trainer would train batches of {trained} ({args.per_device_train_batch_size} per device x "
                f"{args.gradient_accumulation_steps} accumulation x {args.world_size} ranks) but the recipe is "
                f"for {wanted}: use training_args(job)")
        if args.max_grad_norm and args.max_grad_norm > 0:
            log.warning("largebatch: the Trainer clips gradients at %g, which the recipe does not say: "
                        "use training_args(job)", args.max_grad_norm)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs or state.global_step < 1:
            return
        # Every rank logs the same (gathered) loss at the same step: the job agrees on it there.
        self.job.report(state.global_step - 1, logs["loss"], logs.get("grad_norm"))
        if self.job.should_stop:
            control.should_training_stop = True

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
