"""The per-example loss of a Hugging Face model, measured from its own logits and labels.

What the ``Trainer`` logs as ``loss`` depends on the model and on what the Trainer did: a model that
takes ``num_items_in_batch`` but ignores it (a sequence classifier) is summed over the accumulation
steps and multiplied by the ranks; a causal LM without ``loss_type`` is divided by a token count
taken before the shift. So the callback measures the loss itself: a forward hook on the model adds
up, for every micro-batch, the summed loss of its examples (tokens for a language model) and their
count, the way the model's head defines its loss; the loss of a step is the sum over its
micro-batches and ranks divided by the count. Evaluation forwards are added up apart, for the true
evaluation loss.

Heads measured: causal LM (``...ForCausalLM``, ``...LMHeadModel``: the next-token loss), masked LM,
token classification and seq2seq (``...ForConditionalGeneration``: a loss per label token), sequence
classification (regression, single- and multi-label, as ``config.problem_type`` says or the labels
imply). Other models, and batches without ``labels``, are not measured: the callback then reports
the Trainer's loss and says so once.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["LossMeter", "head_kind"]

log = logging.getLogger("largebatch.client")

IGNORE = -100  # the label HF models leave out of their loss


def head_kind(model: Any) -> str | None:
    """``causal``, ``token``, ``sequence`` or None (not measured), from the model's class (and its
    ``loss_type`` where it has one)."""
    name = type(model).__name__
    loss_type = getattr(model, "loss_type", None) or getattr(getattr(model, "config", None), "loss_type", None)
    if loss_type == "ForCausalLM" or name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    if name.endswith(("ForMaskedLM", "ForTokenClassification", "ForConditionalGeneration")):
        return "token"
    if name.endswith("ForSequenceClassification"):
        return "sequence"
    return None


def _sequence(logits: torch.Tensor, labels: torch.Tensor, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    num_labels = getattr(config, "num_labels", logits.shape[-1])
    problem = getattr(config, "problem_type", None)
    if problem is None:  # as the model infers it
        problem = ("regression" if num_labels == 1 else
                   "single_label_classification" if labels.dtype in (torch.long, torch.int) else
                   "multi_label_classification")
    if problem == "regression":
        pred, target = (logits.squeeze(), labels.squeeze()) if num_labels == 1 else (logits, labels)
        return F.mse_loss(pred, target.float(), reduction="sum"), torch.tensor(target.numel())
    if problem == "single_label_classification":
        flat = labels.reshape(-1)
        return (F.cross_entropy(logits.reshape(-1, num_labels), flat, ignore_index=IGNORE, reduction="sum"),
                (flat != IGNORE).sum())
    return (F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum"),
            torch.tensor(labels.numel()))


def loss_sum(kind: str, logits: torch.Tensor, labels: torch.Tensor, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, examples) of one batch, as the head defines its loss."""
    logits = logits.detach().float()
    if kind == "sequence":
        return _sequence(logits, labels, config)
    if kind == "causal":  # token t predicts token t + 1
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    flat = labels.reshape(-1)
    return (F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat, ignore_index=IGNORE, reduction="sum"),
            (flat != IGNORE).sum())


class LossMeter:
    """Adds up (summed loss, examples) of the training and of the evaluation forwards of ``model``,
    on the model's device (no synchronisation with the training loop)."""

    def __init__(self, model: Any) -> None:
        self.kind = head_kind(model)
        self.config = getattr(model, "config", None)
        self.missed = False  # a forward that could not be measured (no labels or logits)
        self._sums: dict[bool, list[torch.Tensor] | None] = {True: None, False: None}  # by model.training
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True) if self.kind else None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        labels = kwargs.get("labels")
        logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
        if labels is None or logits is None or self.kind is None:
            self.missed = True
            return
        with torch.no_grad():
            total, count = loss_sum(self.kind, logits, labels.to(logits.device), self.config)
            pair = [total, count.to(total.device, torch.float64)]
            acc = self._sums[module.training]
            self._sums[module.training] = pair if acc is None else [acc[0] + pair[0], acc[1] + pair[1]]

    def take(self, training: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(summed loss, examples) of this rank since the last call (None: nothing measured)."""
        acc, self._sums[training] = self._sums[training], None
        return (acc[0], acc[1]) if acc is not None else None
