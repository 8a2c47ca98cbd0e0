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
(``global_step - 1``, as in a plain loop). It measures that loss itself (:mod:`._hf_loss`): the
per-example (for a language model, per-token) loss of the optimizer step over all its micro-batches
and ranks, whatever the model and whatever the Trainer logs (its ``loss`` is 8x too large for a
sequence classifier trained with accumulation 4 on 2 ranks, and too small for a padded causal LM
without ``loss_type``). It stops training when the service says so (``should_stop``; divergence
included, on every rank at the same step), keeps the study's metric from each evaluation (the
evaluation loss measured the same way: the true per-example loss over the whole evaluation set) and,
when training ends, completes the run with it (``diverged``/``pruned`` when it was stopped). Without
an evaluation during training, ``trainer.evaluate()`` after ``train()`` completes the run; a
``with job:`` block left without one records the run ``failed``, and a warning says so when training
ends.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from largebatch.client import _dist
from largebatch.client.job import Job

from ._finish import finish
from ._hf_loss import LossMeter

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
        self.meter: LossMeter | None = None
        self._trained = False  # training has ended: an evaluation now completes the run

    def _metric_keys(self) -> list[str]:
        name = self.metric or self.job.metric_name
        return [name] if name.startswith("eval_") else [name, f"eval_{name}"]

    def _measure(self, model: Any) -> None:
        if self.meter is not None or model is None:
            return
        self.meter = LossMeter(model)
        if self.meter.kind is None:
            log.warning("largebatch: the callback cannot measure the loss of a %s (not a causal/masked LM, token, "
                        "seq2seq or sequence classifier head): it reports the Trainer's logged loss, which is not "
                        "the per-example loss for every model", type(model).__name__)

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: Any = None, **kwargs: Any) -> None:
        self._measure(model)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, **kwargs: Any) -> None:
        self._measure(model)
        self._trained = False
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
        loss: Any = logs["loss"]
        examples: Any = None
        measured = self.meter.take(training=True) if self.meter is not None else None
        if measured is not None:  # this rank's micro-batches since the last log
            loss, examples = measured[0] / measured[1], measured[1]
        # Every rank logs at the same step: the job agrees on the loss (weighted by examples) there.
        self.job.report(state.global_step - 1, loss, logs.get("grad_norm"), examples=examples)
        if self.job.should_stop:
            control.should_training_stop = True

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.job.should_stop:
            control.should_training_stop = True

    def on_predict(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                   **kwargs: Any) -> None:
        if self.meter is not None:
            self.meter.take(training=False)  # predictions are not an evaluation

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        keys = self._metric_keys()
        key = next((k for k in keys if metrics and k in metrics), None)
        value = float(metrics[key]) if metrics and key is not None else None
        if self.meter is not None and self.meter.kind is not None:
            measured = self.meter.take(training=False)
            loss_sum, count = (float(measured[0]), float(measured[1])) if measured is not None else (0.0, 0.0)
            if self.job.world_size > 1:  # every rank evaluates: each has its share of the set
                loss_sum, count = _dist.total([loss_sum, count])
            if key == "eval_loss" and count > 0:
                value = loss_sum / count
        if value is None:
            return
        self.last_metric = value
        if self._trained and self.complete_on_train_end and state.is_world_process_zero and not self.job.finished:
            finish(self.job, value, missing="")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._trained = True
        if not self.complete_on_train_end or not state.is_world_process_zero:
            return
        finish(self.job, self.last_metric,
               missing=f"training ended without an evaluation of {' or '.join(self._metric_keys())}: call "
                       "trainer.evaluate() inside `with job:` (the callback completes the run with it) or "
                       "job.complete(metric); a `with job:` block left without either records the run failed")
