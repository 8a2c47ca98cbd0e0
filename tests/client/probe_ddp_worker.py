"""One of two gloo ranks for the branch-probe test: a job trains a DDP model, once plainly and once with
a probe in the middle; both runs' parameters, losses and the probe's result are saved."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from largebatch.client import Client
from tests.client._training import BATCH, REFERENCE, Data
from tests.client.test_branch_probe import loss_fn, make_model

FAST = {"flush_interval": 0.1, "heartbeat_interval": 30.0, "close_timeout": 30.0}


def stream(rank: int):
    def batches():
        data = Data(7 + rank)
        while True:
            yield data.batch(BATCH // 4)

    return batches


def run(url: str, rank: int, study: str, probe: bool) -> dict:
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    job = Client(url).autoconfigure(model.module, study=study, reference=REFERENCE, target_batch_size=BATCH,
                                    job_options=FAST)
    data, losses, result = Data(1 + rank), [], None
    with job:
        for step in range(16):
            if probe and step == 8:
                result = job.branch_probe(model, stream(rank), loss_fn, ks=(1, 2), steps=4, micro_batches=2)
            x, y = data.batch(BATCH // 2)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            job.optimizer.step()
            job.scheduler.step()
            job.optimizer.zero_grad()
            job.report(step, loss.detach())
            losses.append(loss.item())
        job.complete(0.0)
    return {"params": [p.detach().clone() for p in model.module.parameters()], "losses": losses,
            "result": None if result is None else (result.losses, result.gains, result.loss_before)}


def worker(rank: int, url: str, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        out = {"plain": run(url, rank, "probe-ddp-none", False), "probed": run(url, rank, "probe-ddp", True)}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()
