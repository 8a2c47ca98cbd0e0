"""One rank of the Lightning DDP test (``python ddp_lightning_worker.py URL STUDY OUT MODE``; Lightning
starts the second rank by running this script again).

A tiny MLP regression. Each rank records, in ``training_step``, the summed squared error and the
example count of every micro-batch: the test computes the true per-example loss of each optimizer
step from these, independently of Lightning and of the callback. MODE ``ok`` trains the recipe;
``blowup`` trains with an LR far too large.
"""

from __future__ import annotations

import json
import os
import sys
import time

import lightning.pytorch as L
import torch
import torch.distributed as dist

from largebatch.client import Client
from largebatch.client.integrations.lightning import LargebatchCallback, configure_optimizers, trainer_args

IN, HIDDEN, ACCUMULATION = 8, 16, 4
FLUSH = 0.3  # the job's flush interval (seconds)


class Regression(L.LightningModule):
    def __init__(self, job) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))
        self.job = job
        self.micro: list[tuple[float, int]] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        err = (self(x) - y).pow(2)
        self.micro.append((float(err.detach().sum()), len(x)))
        return err.mean()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return configure_optimizers(self.job)


def data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(IN, 1, generator=torch.Generator().manual_seed(7))
    x = torch.randn(n, IN, generator=g)
    return torch.utils.data.TensorDataset(x, torch.tanh(x @ w) + 0.1 * torch.randn(n, 1, generator=g))


class Times(L.Callback):
    """When each optimizer step ended, and the step of the first vote at which this rank's job
    already knew that the service said stop; with ``pause``, steps slow enough for the service to
    answer before the blown-up loss turns NaN (so that the stop comes from the service)."""

    def __init__(self, pause: float, job) -> None:
        self.ends: list[tuple[int, float]] = []
        self.pause = pause
        self.job = job
        self.learned: int | None = None
        self._seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._seen:
            self._seen = trainer.global_step
            time.sleep(self.pause)
            self.ends.append((trainer.global_step, time.time()))
            if self.learned is None and self.job.stop_reason is not None:
                self.learned = trainer.global_step + 1  # this step's vote is behind (the callback before this one)


def main(url: str, study: str, out: str, mode: str) -> None:
    torch.set_num_threads(1)
    reference = ({"batch_size": 8, "lr": 2e-2, "steps": 48, "warmup_ratio": 0.1} if mode == "ok" else
                 {"batch_size": 8, "lr": 30.0, "steps": 160, "warmup_ratio": 0.25})
    probe = torch.nn.Linear(IN * HIDDEN + HIDDEN * 2, 1)  # the module's size, for the request
    module = Regression(None)
    job = Client(url).autoconfigure(module, study=study, target_batch_size=32, reference=reference,
                                    model_params=sum(p.numel() for p in probe.parameters()),
                                    job_options={"flush_interval": FLUSH})
    module.job = job
    plan = job.batch_plan(per_device_batch_size=32 // 2 // ACCUMULATION, world_size=2)
    times = Times(0.0 if mode == "ok" else 0.1, job)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=None, val_check_interval=job.recipe.total_steps * ACCUMULATION,
                        callbacks=[LargebatchCallback(job), times], **trainer_args(job, plan))
    # No shuffling: each rank's micro-batches are a fixed slice, in order.
    loader = torch.utils.data.DataLoader(data(4096, 1), batch_size=plan.per_device)
    trainer.fit(module, loader, torch.utils.data.DataLoader(data(64, 2), batch_size=32))
    rank = trainer.global_rank
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"micro": module.micro, "accumulation": trainer.accumulate_grad_batches,
                   "run": job.run.id if job.run is not None else None, "world": trainer.world_size,
                   "global_step": trainer.global_step, "step_ends": times.ends, "learned": times.learned,
                   "total_steps": job.recipe.total_steps, "flush": FLUSH}, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
