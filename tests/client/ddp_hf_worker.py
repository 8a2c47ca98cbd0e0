"""One rank of the HF Trainer DDP test
(``torchrun --nproc_per_node=2 ddp_hf_worker.py URL STUDY OUT MODE [MODEL]``).

MODEL ``gpt2`` (default): a tiny GPT-2 (from a config, no download, no ``loss_type``: as users build
it) learns to count, on padded sequences of random lengths (labels -100 on the padding). ``bert``: a
tiny BERT sequence classifier. Each rank records, from the model's own logits, the summed loss and
the example (token) count of every training micro-batch and of every evaluation batch: the test
computes the true per-example loss of each optimizer step, and the true evaluation loss, from these,
independently of the Trainer's logging. MODE ``ok`` trains the recipe; ``blowup`` trains with an LR
far too large.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from largebatch.client import Client
from largebatch.client.integrations.hf import LargebatchCallback, optimizers, training_args

VOCAB, SEQ, ACCUMULATION, CLASSES = 32, 16, 4, 3
FLUSH = 0.3  # the job's flush interval (seconds)
# Under the test's 300 s: a rank still alive then is hung; it writes its threads' stacks to OUT/rankR.stacks and
# exits, and a rank torchrun ends (SIGTERM) writes them too, so that the test fails saying where each rank was.
WATCHDOG_S = 240


class Counting(torch.utils.data.Dataset):
    """Sequences counting from a random start, padded after a random length (4..SEQ); for ``bert``,
    labelled with their start modulo CLASSES."""

    def __init__(self, n: int, seed: int, model: str) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = (torch.randint(0, VOCAB, (n, 1), generator=g) + torch.arange(SEQ)) % VOCAB
        self.mask = (torch.arange(SEQ) < torch.randint(4, SEQ + 1, (n, 1), generator=g)).long()
        self.model = model

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, mask = self.ids[i] * self.mask[i], self.mask[i]
        labels = self.ids[i][0] % CLASSES if self.model == "bert" else ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build(model: str) -> torch.nn.Module:
    if model == "bert":
        return BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=SEQ, num_labels=CLASSES))
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2))


def true_loss(model: str, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(summed loss, examples) of a batch: per example for the classifier, per predicted token for GPT-2."""
    if model == "bert":
        ce = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        return float(ce), len(labels)
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")
    return float(ce), int((labels != -100).sum())


class Times(TrainerCallback):
    """When each optimizer step ended, and the first step at whose end this rank's job already knew
    that the service said stop; with ``pause``, steps slow enough for the service to answer before
    the blown-up loss turns NaN (so that the stop comes from the service)."""

    def __init__(self, pause: float, job) -> None:
        self.ends: list[tuple[int, float]] = []
        self.pause = pause
        self.job = job
        self.learned: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.pause)
        self.ends.append((state.global_step, time.time()))
        if self.learned is None and self.job.stop_reason is not None:
            self.learned = state.global_step


def watchdog(out: str) -> None:
    global _stacks
    _stacks = open(os.path.join(out, f"rank{os.environ.get('RANK', '?')}.stacks"), "w")  # open until exit
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True, file=_stacks)
    faulthandler.register(signal.SIGTERM, file=_stacks, chain=True)


def main(url: str, study: str, out: str, mode: str, name: str = "gpt2") -> None:
    watchdog(out)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(name)
    micro: list[tuple[float, int]] = []
    evals: list[tuple[float, int]] = []

    def record(module, args, kwargs, output):
        with torch.no_grad():  # the true loss of this batch, from the logits
            (micro if module.training else evals).append(true_loss(name, output.logits, kwargs["labels"]))

    model.register_forward_hook(record, with_kwargs=True)
    reference = ({"batch_size": 8, "lr": 2e-2, "steps": 48, "warmup_ratio": 0.1} if mode == "ok" else
                 {"batch_size": 8, "lr": 30.0, "steps": 160, "warmup_ratio": 0.25})
    job = Client(url).autoconfigure(model, study=study, target_batch_size=32, reference=reference,
                                    job_options={"flush_interval": FLUSH})
    args = TrainingArguments(
        output_dir=out, per_device_eval_batch_size=32, eval_strategy="steps", eval_steps=job.recipe.total_steps,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
        **training_args(job, per_device_batch_size=32 // 2 // ACCUMULATION))
    times = Times(0.0 if mode == "ok" else 0.1, job)
    with job:
        trainer = Trainer(model=model, args=args, train_dataset=Counting(2048, 1, name),
                          eval_dataset=Counting(64, 2, name),
                          optimizers=optimizers(job), callbacks=[LargebatchCallback(job), times])
        trainer.train()
    rank = dist.get_rank()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"micro": micro, "evals": evals, "accumulation": args.gradient_accumulation_steps, "run": job.run.id,
                   "world": dist.get_world_size(), "global_step": trainer.state.global_step,
                   "step_ends": times.ends, "learned": times.learned, "total_steps": job.recipe.total_steps, "flush": FLUSH}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])
