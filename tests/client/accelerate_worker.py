"""One rank of the Accelerate test (``torchrun --nproc_per_node=2 accelerate_worker.py URL OUT``): the
job's scheduler handed to ``accelerator.prepare`` (refused), then the way the refusal names (the
scheduler left out of ``prepare``, stepped once per optimizer step), recording the LR of every step."""

from __future__ import annotations

import json
import os
import sys

import torch
from accelerate import Accelerator

from largebatch.client import Client, JobError
from largebatch.scaling_rules.schedule import lr_at

REFERENCE = {"batch_size": 8, "lr": 1e-2, "steps": 80, "warmup_ratio": 0.1}


def model_and_data() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    return torch.nn.Linear(8, 1), x, x.sum(1, keepdim=True)


def main(url: str, out: str) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    result: dict = {}
    model, x, y = model_and_data()
    job = Client(url).autoconfigure(model, study="accelerate", reference=REFERENCE, target_batch_size=16)
    model, optimizer, scheduler = accelerator.prepare(model, job.optimizer, job.scheduler)
    try:
        with job:
            for step in range(job.recipe.total_steps):
                i = torch.randint(0, len(x), (8,))
                accelerator.backward(torch.nn.functional.mse_loss(model(x[i]), y[i]))
                result["refused_at"] = step
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                job.report(step, 0.0)
    except JobError as e:
        result["refused"] = str(e)

    model, x, y = model_and_data()
    job = Client(url).autoconfigure(model, study="accelerate", reference=REFERENCE, target_batch_size=16)
    model, optimizer = accelerator.prepare(model, job.optimizer)
    result["lrs"], result["recipe_lrs"] = [], []
    with job:
        for step in range(job.recipe.total_steps):
            i = torch.randint(0, len(x), (8,))
            accelerator.backward(torch.nn.functional.mse_loss(model(x[i]), y[i]))
            result["lrs"].append(job.optimizer.param_groups[0]["lr"])
            result["recipe_lrs"].append(lr_at(job.recipe, step))
            optimizer.step()
            job.scheduler.step()
            optimizer.zero_grad()
            job.report(step, 0.0)
        job.complete(0.0)
    with open(os.path.join(out, f"rank{accelerator.process_index}.json"), "w") as f:
        json.dump(result, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:3])
