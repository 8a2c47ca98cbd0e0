"""One rank of the HF Trainer DDP test (``torchrun --nproc_per_node=2 ddp_hf_worker.py URL STUDY OUT MODE``).

A tiny GPT-2 (from a config, no download) learns to count. Each rank records, from the model's own
logits, the summed token loss and the token count of every training micro-batch: the test computes
the true per-token loss of each optimizer step from these, independently of the Trainer's logging
and of the callback. MODE ``ok`` trains the recipe; ``blowup`` trains with an LR far too large.
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
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from largebatch.client import Client
from largebatch.client.integrations.hf import LargebatchCallback, optimizers, training_args

VOCAB, SEQ, ACCUMULATION = 32, 16, 4
FLUSH = 0.3  # the job's flush interval (seconds)
# Under the test's 300 s: a rank still alive then is hung; it writes its threads' stacks to OUT/rankR.stacks and
# exits, and a rank torchrun ends (SIGTERM) writes them too, so that the test fails saying where each rank was.
WATCHDOG_S = 240


class Counting(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = (torch.randint(0, VOCAB, (n, 1), generator=g) + torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


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


def main(url: str, study: str, out: str, mode: str) -> None:
    watchdog(out)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2))
    # Without a loss type in its config (a model built from a config has none), transformers 5 counts a
    # causal LM's tokens over the unshifted labels: its loss would be SEQ-1/SEQ of the true one.
    model.loss_type = "ForCausalLM"
    micro: list[tuple[float, int]] = []

    def record(module, args, kwargs, output):
        if module.training:  # the true loss of this micro-batch, from the logits
            logits, labels = output.logits[:, :-1].float(), kwargs["labels"][:, 1:]
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")
            micro.append((float(ce.detach()), labels.numel()))

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
        trainer = Trainer(model=model, args=args, train_dataset=Counting(2048, 1), eval_dataset=Counting(64, 2),
                          optimizers=optimizers(job), callbacks=[LargebatchCallback(job), times])
        trainer.train()
    rank = dist.get_rank()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"micro": micro, "accumulation": args.gradient_accumulation_steps, "run": job.run.id,
                   "world": dist.get_world_size(), "global_step": trainer.state.global_step,
                   "step_ends": times.ends, "learned": times.learned, "total_steps": job.recipe.total_steps, "flush": FLUSH}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
